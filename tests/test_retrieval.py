"""R-precision: the ranking, the trials it ranks, the encoders it loads, and the CLI."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_run, write_random_dataset

from t2i_fast.cli import main
from t2i_fast.data import Dataset
from t2i_fast.data.alphabet import decode, encode
from t2i_fast.data.writer import DatasetWriter
from t2i_fast.errors import DataError
from t2i_fast.eval.retrieval import evaluate_retrieval, r_precision, retrieval_trials
from t2i_fast.prepare.cub import make_cub
from t2i_fast.prepare.shapes import make_shapes


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retrieval")
    make_shapes(out=tmp / "shapes.lmdb", n=48)
    return tiny_run(tmp / "shapes.lmdb", tmp / "run", train_text_encoder=False,
                    pretrain_epochs=1)


def test_r_precision_perfect_constant_and_ties():
    texts = torch.randn(50, 16)
    candidates = torch.stack([torch.randperm(50)[:10] for _ in range(30)])  # [30, 10]
    assert r_precision(images=texts[candidates[:, 0]], texts=texts,
                       candidates=candidates) == pytest.approx(1.0)
    assert r_precision(images=-texts[candidates[:, 0]], texts=texts,
                       candidates=candidates) == 0.0
    same = torch.ones(50, 16)
    assert r_precision(images=torch.randn(30, 16), texts=same,
                       candidates=candidates) == pytest.approx(0.1)  # chance: 1 of 10
    # Tied at the top with one other caption: half a hit, what a coin toss scores.
    tied = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert r_precision(images=torch.tensor([[1.0, 0.0]]), texts=tied,
                       candidates=torch.tensor([[0, 1, 2]])) == pytest.approx(0.5)


def _classes_of_captions(path):
    """Encoded caption bytes → the classes of the records that have that caption."""
    owners = {}
    with Dataset(path) as ds:
        for i in range(len(ds)):
            record = ds.record(i)
            for row in record.char_indices:
                owners.setdefault(row.tobytes(), set()).add(record.class_id)
    return owners


def test_trials_pair_each_caption_with_other_classes_only(tmp_path):
    path = write_random_dataset(tmp_path / "random.lmdb", n=40, classes=4)
    owners = _classes_of_captions(path)
    trials = retrieval_trials(path, n=25, distractors=30, seed=3)
    assert trials.candidates.shape == (25, 31) and len(trials.captions) == 25
    assert len(trials.indices) == trials.candidates.max() + 1, "every row ranked, once each"
    with Dataset(path) as ds:
        doc_length = ds.meta["doc_length"]
    for caption, row in zip(trials.captions, trials.candidates, strict=True):
        own = trials.indices[row[0]]
        assert np.array_equal(own, encode(caption, doc_length))
        (image_class,) = owners[own.tobytes()]
        for other in row[1:]:
            assert image_class not in owners[trials.indices[other].tobytes()]
    again = retrieval_trials(path, n=25, distractors=30, seed=3)
    assert again.captions == trials.captions
    assert np.array_equal(again.candidates, trials.candidates)
    assert len(retrieval_trials(path, n=1000, distractors=2, seed=0).captions) == 40


def test_without_classes_distractors_are_other_images_captions(tmp_path):
    path = tmp_path / "one.lmdb"
    with DatasetWriter(path, image_size=8, classes=["coco"], source="test", split="all") as w:
        for i in range(6):
            w.add(np.zeros((8, 8, 3), np.uint8), [f"image {i} caption {j}" for j in range(3)],
                  class_id=0, name=f"{i}")
    trials = retrieval_trials(path, n=6, distractors=20, seed=1)
    owner = {row.tobytes(): int(decode(row).split()[1]) for row in trials.indices}
    for caption, row in zip(trials.captions, trials.candidates, strict=True):
        image = int(caption.split()[1])
        assert owner[trials.indices[row[0]].tobytes()] == image
        distractors = {owner[trials.indices[other].tobytes()] for other in row[1:]}
        assert image not in distractors and len(distractors) > 1
    single = tmp_path / "single.lmdb"
    with DatasetWriter(single, image_size=8, classes=["coco"], source="test", split="all") as w:
        w.add(np.zeros((8, 8, 3), np.uint8), ["alone"], class_id=0, name="0")
    with pytest.raises(DataError, match="at least 2 records"):
        retrieval_trials(single, n=1, distractors=3, seed=0)


class EchoModel:
    """Generates 'images' [3, 4, 4] that carry the first 48 character indices of their
    caption: a generator that draws exactly what it is told."""

    device = torch.device("cpu")

    def embed(self, captions):
        return torch.stack([torch.from_numpy(encode(c)[:48].astype(np.float32))
                            for c in captions])

    def noise(self, n, seed):
        return torch.zeros(n, 1)

    def generate(self, text, z):
        return text.view(-1, 3, 4, 4)


class EchoScorer:
    """Reads EchoModel's images back, and captions the same way: perfect judgement."""

    def images(self, images):
        return images.flatten(1)

    def texts(self, indices):
        return torch.from_numpy(indices[:, :48].astype(np.float32))


class ConstantScorer(EchoScorer):
    def texts(self, indices):
        return torch.ones(len(indices), 48)


def test_perfect_and_constant_scorers(run):
    data = json.loads((run / "config.json").read_text())["data"]
    perfect = evaluate_retrieval(model=EchoModel(), scorer=EchoScorer(), dataset=data, n=40,
                                 distractors=20, batch_size=7)
    assert perfect == {"r_precision": 1.0, "chance": 1 / 21, "n": 40, "distractors": 20}
    constant = evaluate_retrieval(model=EchoModel(), scorer=ConstantScorer(), dataset=data,
                                  n=40, distractors=20)
    assert constant["r_precision"] == pytest.approx(1 / 21)


def invoke(*args):
    return CliRunner().invoke(main, ["eval", "retrieval", *map(str, args)])


def test_cli_scores_a_run_with_its_own_encoders(run):
    result = invoke("--run", run, "--n", 16, "--distractors", 9, "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert scores["n"] == 16 and scores["distractors"] == 9 and scores["chance"] == 0.1
    assert 0 <= scores["r_precision"] <= 1
    checkpoint = next((run / "checkpoints").iterdir())
    again = invoke("--run", checkpoint, "--n", 16, "--distractors", 9, "--json")
    assert json.loads(again.output) == scores, "a checkpoint scores as its run"
    table = invoke("--run", run, "--n", 4).output.splitlines()
    assert [line.split()[0] for line in table] == ["r-precision", "chance", "images"]


def test_cli_on_a_cub_dataset(run, cub_root, tmp_path):
    cub = tmp_path / "cub_test.lmdb"
    make_cub(root=cub_root, out=cub, split="test", workers=2)
    result = invoke("--run", run, "--data", cub, "--n", 12, "--distractors", 99, "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert scores["n"] == 12 and 0 <= scores["r_precision"] <= 1


def test_cli_errors_name_the_file(run, tmp_path):
    scratch = tmp_path / "scratch"
    shutil.copytree(run, scratch, ignore=shutil.ignore_patterns("text"))
    settings = json.loads((scratch / "config.json").read_text())
    settings["text_encoder"] = None
    (scratch / "config.json").write_text(json.dumps(settings))
    result = invoke("--run", scratch, "--n", 4)
    assert result.exit_code == 1
    assert f"{scratch}: no DS-SJE encoders" in result.output and "--encoders" in result.output
    old = tmp_path / "old.pt"
    state = torch.load(run / "text" / "text_encoder.pt")
    torch.save({"text_encoder": state["text_encoder"], "text_config": state["text_config"]},
               old)
    result = invoke("--run", run, "--encoders", old, "--n", 4)
    assert result.exit_code == 1 and f"{old}: holds no DS-SJE image encoder" in result.output
    other = tmp_path / "other.pt"
    torch.save({**state, "preset": "reed"}, other)
    result = invoke("--run", run, "--encoders", other, "--n", 4)
    assert result.exit_code == 1 and "encoders do not fit preset 'reed'" in result.output
