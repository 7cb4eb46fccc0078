"""Files a user did not make: checkpoints and encoders are read without running code, and a
file of the wrong kind is named with what it lacks; a run samples at its own caption length."""

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_run

from t2i_fast.cli import main
from t2i_fast.errors import T2IError
from t2i_fast.generate import TrainedModel
from t2i_fast.models import TextEncoder, preset
from t2i_fast.prepare.shapes import make_shapes
from t2i_fast.train.checkpoint import latest_checkpoint, load_checkpoint

DOC_LENGTH = 150  # not the default 201


class _RunsCode:
    """Pickles as a call that creates ``marker``: loading it with full pickle runs that call."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("untrusted")
    make_shapes(out=root / "shapes.lmdb", n=16, doc_length=DOC_LENGTH)
    return tiny_run(root / "shapes.lmdb", root / "run")


def invoke(*args):
    return CliRunner().invoke(main, [*map(str, args)])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert str(fragment) in lines[0], result.output


def test_forged_pickle_is_refused_without_running_its_code(tmp_path):
    marker = tmp_path / "ran"
    forged = tmp_path / "downloaded.pt"
    torch.save({"G": _RunsCode(marker)}, forged)
    with pytest.raises(T2IError, match=f"{forged}: refused: .*could run code") as caught:
        load_checkpoint(forged)
    assert "GLOBAL io.open" in str(caught.value) and "\n" not in str(caught.value)
    assert not marker.exists()
    assert_one_line_error(invoke("sample", "--run", forged, "--text", "a red circle",
                                 "--out", tmp_path / "x.png"), forged, "refused")
    assert not marker.exists()


def test_forged_text_encoder_is_refused_by_train(run, tmp_path):
    marker = tmp_path / "ran"
    forged = tmp_path / "text_encoder.pt"
    torch.save({"text_encoder": _RunsCode(marker), "text_config": {}}, forged)
    data = run.parent / "shapes.lmdb"
    result = invoke("train", "--data", data, "--run", tmp_path / "r", "--batch-size", 8,
                    "--max-steps", 1, "--text-encoder", forged)
    assert_one_line_error(result, forged, "refused")
    assert not marker.exists() and not (tmp_path / "r").exists()


def test_file_of_another_kind_is_named_with_what_it_lacks(run, tmp_path):
    listed = tmp_path / "list.pt"
    torch.save([1, 2, 3], listed)
    with pytest.raises(T2IError, match=r"list.pt: not a checkpoint \(holds a list"):
        load_checkpoint(listed)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(T2IError, match="garbage.pt: (refused|cannot read)"):
        load_checkpoint(garbage)

    text = tmp_path / "text_encoder.pt"  # what pretrain-text writes, networks aside
    models = preset("small")
    torch.save({"text_encoder": TextEncoder(models.text).state_dict(), "preset": "small",
                "text_config": {}}, text)
    assert_one_line_error(invoke("sample", "--run", text, "--text", "a", "--out",
                                 tmp_path / "x.png"),
                          text, "not a training checkpoint", "'step', 'G'")

    state = load_checkpoint(latest_checkpoint(run))
    del state["G"]
    no_g = tmp_path / "no_g.pt"
    torch.save(state, no_g)
    assert_one_line_error(invoke("interpolate", "--run", no_g, "--text", "a", "--out",
                                 tmp_path / "x.png"), no_g, "no 'G' in it")

    state = load_checkpoint(latest_checkpoint(run))
    state["G"] = state["G_ema"] = {"weight": torch.zeros(3)}
    wrong = tmp_path / "wrong.pt"
    torch.save(state, wrong)
    assert_one_line_error(invoke("sample", "--run", wrong, "--text", "a", "--out",
                                 tmp_path / "x.png"), wrong, "cannot load its networks")


@pytest.fixture()
def lengths(monkeypatch):
    """The caption length of every call of a text encoder."""
    seen = []
    forward = TextEncoder.forward

    def spy(self, captions):
        seen.append(captions.shape[-1])
        return forward(self, captions)

    monkeypatch.setattr(TextEncoder, "forward", spy)
    return seen


def test_sampling_encodes_captions_at_the_runs_length(run, tmp_path, lengths):
    assert load_checkpoint(latest_checkpoint(run))["doc_length"] == DOC_LENGTH
    assert invoke("sample", "--run", run, "--text", "a red circle", "--n", 2,
                  "--out", tmp_path / "grid.png").exit_code == 0
    assert invoke("interpolate", "--run", run, "--text", "a red circle", "--text",
                  "a blue square", "--out", tmp_path / "walk.png").exit_code == 0
    result = invoke("eval", "attributes", "--run", run, "--n", 4)
    assert result.exit_code == 0, result.output
    assert lengths and set(lengths) == {DOC_LENGTH}


def test_checkpoint_without_a_length_takes_its_runs_dataset(run, tmp_path, lengths):
    old = tmp_path / "run"
    shutil.copytree(run, old)
    path = latest_checkpoint(old)
    state = load_checkpoint(path)
    del state["doc_length"]  # as written before checkpoints recorded it
    torch.save(state, path)
    TrainedModel.load(old).embed(["a red circle"])
    assert lengths == [DOC_LENGTH]
    alone = tmp_path / "alone.pt"
    shutil.copy(path, alone)
    with pytest.raises(T2IError, match="alone.pt: records no caption length"):
        TrainedModel.load(alone)

