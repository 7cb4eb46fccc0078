"""Files a user did not make: checkpoints and encoders are read without running code, and a
file of the wrong kind is named with what it lacks; a run samples at its own caption length."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_run
from PIL import Image

from t2i_fast.checkpoint_io import load_checkpoint
from t2i_fast.cli import main
from t2i_fast.data import Dataset
from t2i_fast.errors import T2IError
from t2i_fast.generate import TrainedModel
from t2i_fast.models import TextEncoder, preset
from t2i_fast.prepare.files import MAX_CAPTION_BYTES
from t2i_fast.prepare.shapes import make_shapes
from t2i_fast.run import Run

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


def test_forged_style_encoder_is_refused(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    marker = tmp_path / "ran"
    style = copy / "style_encoder.pt"
    torch.save({"style_encoder": _RunsCode(marker), "style_config": {}, "generator_step": 1},
               style)
    transfer = ("style-transfer", "--run", copy, "--image", tmp_path / "query.png", "--text",
                "a red circle", "--out", tmp_path / "x.png")
    assert_one_line_error(invoke(*transfer), style, "refused")
    assert not marker.exists()
    torch.save({"style_encoder": {}}, style)
    assert_one_line_error(invoke(*transfer), style,
                          "not a style encoder: no 'style_config', 'generator_step' in it")


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

    state = load_checkpoint(Run(run).latest_checkpoint())
    del state["G"]
    no_g = tmp_path / "no_g.pt"
    torch.save(state, no_g)
    assert_one_line_error(invoke("interpolate", "--run", no_g, "--text", "a", "--out",
                                 tmp_path / "x.png"), no_g, "no 'G' in it")

    state = load_checkpoint(Run(run).latest_checkpoint())
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
    assert load_checkpoint(Run(run).latest_checkpoint())["doc_length"] == DOC_LENGTH
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
    path = Run(old).latest_checkpoint()
    state = load_checkpoint(path)
    del state["doc_length"]  # as written before checkpoints recorded it
    torch.save(state, path)
    TrainedModel.load(old).embed(["a red circle"])
    assert lengths == [DOC_LENGTH]
    alone = tmp_path / "alone.pt"
    shutil.copy(path, alone)
    with pytest.raises(T2IError, match="alone.pt: records no caption length"):
        TrainedModel.load(alone)


# --- prepare folder: regular files inside the root only ------------------------------------


def captioned_folder(root: Path) -> Path:
    """ROOT/cls/fine.png with its caption file."""
    (root / "cls").mkdir(parents=True)
    Image.new("RGB", (20, 20), (1, 2, 3)).save(root / "cls/fine.png")
    (root / "cls/fine.txt").write_text("a fine caption\n")
    return root


def refuse(root: Path, out: Path, *fragments):
    assert_one_line_error(invoke("prepare", "folder", "--root", root, "--out", out),
                          *fragments)
    assert not out.exists()


def test_links_out_of_the_root_are_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("a private note\n")
    root = captioned_folder(tmp_path / "mine")
    Image.new("RGB", (20, 20)).save(root / "cls/leak.png")
    (root / "cls/leak.txt").symlink_to(secret)
    refuse(root, tmp_path / "a.lmdb", root / "cls/leak.txt", "outside")
    (root / "cls/leak.txt").unlink()
    (root / "cls/leak.txt").symlink_to("/dev/zero")  # read until memory runs out, before
    refuse(root, tmp_path / "b.lmdb", root / "cls/leak.txt", "/dev/zero", "outside")
    (root / "cls/leak.txt").unlink()
    (root / "cls/leak.txt").write_text("a caption\n")
    (root / "cls/leak.png").unlink()
    (root / "cls/leak.png").symlink_to(tmp_path / "elsewhere.png")
    Image.new("RGB", (20, 20)).save(tmp_path / "elsewhere.png")
    refuse(root, tmp_path / "c.lmdb", root / "cls/leak.png", "outside")
    (root / "cls/leak.png").unlink()
    (root / "linked").symlink_to(tmp_path, target_is_directory=True)
    refuse(root, tmp_path / "d.lmdb", root / "linked", "outside")


def test_links_inside_the_root_are_followed(tmp_path):
    root = captioned_folder(tmp_path / "mine")
    Image.new("RGB", (20, 20)).save(root / "cls/twin.png")
    (root / "cls/twin.txt").symlink_to("fine.txt")
    result = invoke("prepare", "folder", "--root", root, "--out", tmp_path / "ok.lmdb")
    assert result.exit_code == 0, result.output
    with Dataset(tmp_path / "ok.lmdb") as ds:
        assert [ds[i].captions for i in range(len(ds))] == [["a fine caption"]] * 2


def test_special_files_and_folders_are_refused(tmp_path):
    root = captioned_folder(tmp_path / "mine")
    Image.new("RGB", (20, 20)).save(root / "cls/odd.png")
    (root / "cls/odd.txt").mkdir()
    refuse(root, tmp_path / "a.lmdb", root / "cls/odd.txt", "not a regular file but a folder")
    (root / "cls/odd.txt").rmdir()
    (root / "cls/odd.txt").write_bytes(b"a caption\n" * (MAX_CAPTION_BYTES // 10 + 1))
    refuse(root, tmp_path / "b.lmdb", root / "cls/odd.txt",
           "more than a caption file may hold (1,048,576)")


@pytest.mark.parametrize("name", ["cls/pipe.txt", "cls/pipe.png"])
def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path, name):
    root = captioned_folder(tmp_path / "mine")
    Image.new("RGB", (20, 20)).save(root / "cls/pipe.png")
    (root / "cls/pipe.txt").write_text("a caption\n")
    (root / name).unlink()
    os.mkfifo(root / name)
    out = tmp_path / "out.lmdb"
    # In a process of its own: a reader that waits for the FIFO's writer must fail the test,
    # not hang it.
    done = subprocess.run([sys.executable, "-m", "t2i_fast", "prepare", "folder", "--root",
                           str(root), "--out", str(out)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)  # not the checkout: the installed package
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and f"{root / name}: not a regular file but a FIFO" \
        in done.stderr
    assert not out.exists()
