"""The caption-embedding table of a frozen text encoder against the step's current path: the
encoder run on the loader's character indices."""

import shutil

import numpy as np
import pytest
import torch
from test_loader import rewrite_record

from t2i_fast.data import Dataset, Loader
from t2i_fast.errors import ConfigError, CorruptRecordError, DataError
from t2i_fast.models.config import TextEncoderConfig
from t2i_fast.models.text_encoder import TextEncoder
from t2i_fast.train.caption_table import embed_all_captions, mean_embedding


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    torch.manual_seed(0)
    config = TextEncoderConfig(channels=(24, 32), cnn_dim=16, rnn_dim=16, embedding_dim=12)
    return TextEncoder(config)


def test_rows_are_each_caption_encoded_alone_in_the_loaders_id_order(random_dataset, encoder):
    table = embed_all_captions(dataset_path=random_dataset, text_encoder=encoder, batch_size=7)
    with Dataset(random_dataset) as ds:
        chars = np.concatenate([ds[i].char_indices for i in range(len(ds))])  # [n, L]
    assert table.shape == (len(chars), 12) and table.dtype == torch.float32
    assert len(table) == Loader(random_dataset, batch_size=4).num_captions
    with torch.no_grad():
        together = encoder(torch.from_numpy(chars))  # [n, E]
        torch.testing.assert_close(table, together, rtol=1e-5, atol=1e-6)
        for i in (0, 1, len(chars) // 2, len(chars) - 1):  # no batch-mate changes a row
            alone = encoder(torch.from_numpy(chars[i: i + 1]))[0]
            torch.testing.assert_close(table[i], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_mean_embedding_equals_the_encoder_on_the_loaders_batch(random_dataset, encoder, mode):
    """The frozen step's φ(t) from the table equals today's encode_mean of the same samples'
    characters, in either mode: the encoder holds no batch-dependent layer (no BatchNorm,
    no dropout)."""
    encoder.train(mode == "train")
    table = embed_all_captions(dataset_path=random_dataset, text_encoder=encoder)
    assert encoder.training == (mode == "train"), "the encoder's mode is restored"
    options = {"batch_size": 6, "seed": 5, "epoch": 2, "captions_per_sample": 4}
    by_ids = Loader(random_dataset, caption_format="ids", **options)
    by_chars = Loader(random_dataset, caption_format="indices", **options)
    for ids, chars in zip(by_ids, by_chars, strict=True):
        got = mean_embedding(table, ids.captions)
        with torch.no_grad():
            expected = encoder.encode_mean(chars.captions)
        assert got.shape == expected.shape == (6, 12) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    encoder.eval()


def test_the_table_is_frozen(random_dataset, encoder):
    encoder.requires_grad_(True)
    table = embed_all_captions(dataset_path=random_dataset, text_encoder=encoder)
    assert not table.requires_grad
    assert all(p.grad is None for p in encoder.parameters())


def test_bfloat16_table_and_float32_accumulation(random_dataset, encoder):
    exact = embed_all_captions(dataset_path=random_dataset, text_encoder=encoder, batch_size=32)
    table = embed_all_captions(dataset_path=random_dataset, text_encoder=encoder,
                               dtype=torch.bfloat16, batch_size=32)
    assert table.dtype == torch.bfloat16
    assert torch.equal(table, exact.to(torch.bfloat16))
    ids = torch.tensor([[0, 3, 3, 7], [1, 1, 1, 1]])
    got = mean_embedding(table, ids)
    assert got.dtype == torch.float32
    expected = table.float()[ids].sum(1) / 4  # in float32, not bfloat16
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"ids \[B, k\]"):
        mean_embedding(table, ids[0])


def test_progress_bar_on_stderr_when_asked(random_dataset, encoder, capsys):
    embed_all_captions(dataset_path=random_dataset, text_encoder=encoder)
    assert capsys.readouterr().err == "", "a small dataset shows no bar by default"
    embed_all_captions(dataset_path=random_dataset, text_encoder=encoder, show_progress=True)
    captured = capsys.readouterr()
    assert "embedding captions" in captured.err and captured.out == ""


def test_not_a_dataset_is_one_named_error(tmp_path, encoder):
    with pytest.raises(DataError, match="not a t2i-fast dataset"):
        embed_all_captions(dataset_path=tmp_path / "missing.lmdb", text_encoder=encoder)


def test_a_corrupt_caption_is_one_named_error(random_dataset, tmp_path, encoder):
    path = tmp_path / "bad.lmdb"
    shutil.copytree(random_dataset, path)
    rewrite_record(path, 9, lambda d: d[:70] + bytes([d[70] ^ 0x01]) + d[71:])  # a character
    with pytest.raises(CorruptRecordError, match=r"bad\.lmdb: record '00000009': checksum"):
        embed_all_captions(dataset_path=path, text_encoder=encoder)
    with pytest.raises(ConfigError, match="batch_size must be at least 1"):
        embed_all_captions(dataset_path=random_dataset, text_encoder=encoder, batch_size=0)
