"""MS-COCO: ``prepare coco`` on small folders in the official layout, its errors, and a dataset
without classes through the loader, training, DS-SJE pretraining and retrieval."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import tiny_run
from PIL import Image

from t2i_fast.checkpoint_io import load_checkpoint
from t2i_fast.cli import main
from t2i_fast.data import Dataset, Loader
from t2i_fast.errors import DataError
from t2i_fast.prepare.coco import make_coco
from t2i_fast.run import Run
from t2i_fast.train.pretrain_text import PretrainConfig, pretrain_text

# (image id, captions as COCO writes them: trailing newlines, spaces before periods, doubles)
CAPTIONS = {
    139: ["A woman stands in the dining area at the table.\n", "A room with chairs, a table,"
          " and a woman in it.", "A woman standing in a kitchen by a window ", "A person "
          "standing at a table in a room.", "A living  area with a television and a table"],
    285: ["A big burly grizzly bear is show with grass in the background.",
          "The large brown bear has a black nose .", "Closeup of a brown bear sitting in a "
          "grassy area.", "A large bear that is sitting on grass. ", "A close up picture of a "
          "brown bear's face.", "a brown bear sits\tin the grass", "A big bear.\n\n"],
    632: [" Bedroom scene with a bookcase, blue comforter and window.", "A bedroom with a "
          "bookshelf full of books.", "This room has a bed with blue sheets and a large "
          "bookcase", "A bed and a mirror in a small room.", "a bed room with a neatly made "
          "bed"],
}
GRAY = 632  # stored grayscale, as a few COCO images are
UNCAPTIONED = 724  # listed in 'images', no annotation (its file need not exist)


def file_name(split: str, image_id: int) -> str:
    return f"COCO_{split}_{image_id:012d}.jpg" if split.endswith("2014") \
        else f"{image_id:012d}.jpg"


def make_layout(root: Path, split: str = "val2017", extra: int = 0) -> Path:
    """ROOT/annotations/captions_SPLIT.json and ROOT/SPLIT/*.jpg, annotations interleaved
    across images as in the real files; ``extra`` more images of five plain captions each."""
    captions = dict(CAPTIONS)
    captions.update({1000 + i: [f"picture number {i} of a thing {j}" for j in range(5)]
                     for i in range(extra)})
    (root / "annotations").mkdir(parents=True)
    (root / split).mkdir()
    rng = np.random.default_rng(0)
    for k, image_id in enumerate(captions):
        pixels = rng.integers(0, 256, (30 + k % 3, 40, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        (image.convert("L") if image_id == GRAY else image).save(root / split /
                                                                 file_name(split, image_id))
    annotations = [{"image_id": image_id, "id": 10 * image_id + j, "caption": text}
                   for j in range(7) for image_id, texts in captions.items() if j < len(texts)
                   for text in [texts[j]]]
    images = [{"id": image_id, "file_name": file_name(split, image_id), "height": 30,
               "width": 40} for image_id in [*captions, UNCAPTIONED]]
    document = {"info": {"year": 2017}, "licenses": [], "images": images,
                "annotations": annotations}
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(document))
    return root


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("split", ["val2014", "train2017"])
def test_prepare_coco_keeps_every_caption_normalised(tmp_path, split):
    root = make_layout(tmp_path / "coco", split)
    out = tmp_path / "coco.lmdb"
    result = run("prepare", "coco", "--root", root, "--split", split, "--out", out,
                 "--image-size", 16, "--workers", 2)
    assert result.exit_code == 0, result.output
    assert f"{out}: 3 images" in result.output
    assert "skipped 1 listed images without a caption" in result.output
    with Dataset(out) as ds:
        meta = ds.meta
        samples = [ds[i] for i in range(len(ds))]
    assert meta["classes"] == ["coco"] and meta["class_counts"] == [3]
    assert (meta["source"], meta["split"], meta["uncaptioned_skipped"]) == ("coco", split, 1)
    assert (meta["captions_per_image"], meta["captions_per_image_max"]) == (5, 7)
    assert [s.class_id for s in samples] == [0, 0, 0]
    for sample, (image_id, texts) in zip(samples, CAPTIONS.items(), strict=True):
        assert sample.name == f"{split}/{file_name(split, image_id)}"
        assert sample.captions == [" ".join(t.split()) for t in texts]
        assert sample.image.shape == (16, 16, 3)
    gray = samples[list(CAPTIONS).index(GRAY)].image
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert samples[1].captions[1] == "The large brown bear has a black nose ."
    assert samples[1].captions[5] == "a brown bear sits in the grass"


def _edit_json(root, change):
    path = root / "annotations/captions_val2017.json"
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))
    return path


def _fifo(path):
    path.unlink()
    os.mkfifo(path)


BAD = {
    "malformed": (lambda root: (root / "annotations/captions_val2017.json").write_text(
        '{"images": [}'), "{json}: not valid JSON (line 1 column 13"),
    "not_an_object": (lambda root: (root / "annotations/captions_val2017.json").write_text(
        "[]"), "{json}: expected a JSON object"),
    "no_annotations": (lambda root: _edit_json(root, lambda d: d.pop("annotations")),
                       "{json}: no 'annotations' list"),
    "no_file_name": (lambda root: _edit_json(root, lambda d: d["images"][1].pop("file_name")),
                     "{json}: images[1]: no 'file_name'"),
    "id_not_int": (lambda root: _edit_json(root, lambda d: d["images"][0].update(id="139")),
                   "{json}: images[0]: 'id' is str, expected int"),
    "path_in_name": (lambda root: _edit_json(
        root, lambda d: d["images"][0].update(file_name="../x.jpg")),
        "{json}: images[0]: file_name '../x.jpg' is not a plain file name"),
    "duplicate_id": (lambda root: _edit_json(root, lambda d: d["images"].append(d["images"][0])),
                     "{json}: images[4]: image id 139 listed twice"),
    "unknown_image": (lambda root: _edit_json(
        root, lambda d: d["annotations"][2].update(image_id=5)),
        "{json}: annotations[2]: image id 5 is not in 'images'"),
    "caption_not_text": (lambda root: _edit_json(
        root, lambda d: d["annotations"][0].update(caption=None)),
        "{json}: annotations[0]: 'caption' is NoneType, expected str"),
    "image_missing": (lambda root: (root / "val2017" / file_name("val2017", 285)).unlink(),
                      "{root}/val2017/000000000285.jpg: image missing (listed in {json})"),
    "image_fifo": (lambda root: _fifo(root / "val2017" / file_name("val2017", 285)),
                   "{root}/val2017/000000000285.jpg: not a regular file but a FIFO"),
    "json_fifo": (lambda root: _fifo(root / "annotations/captions_val2017.json"),
                  "{json}: not a regular file but a FIFO"),
    "json_missing": (lambda root: (root / "annotations/captions_val2017.json").unlink(),
                     "{json}: missing (--root must hold annotations/captions_val2017.json and "
                     "val2017/)"),
    "no_captions": (lambda root: _edit_json(root, lambda d: d.update(annotations=[])),
                    "{json}: no image has a caption"),
    "image_unreadable": (lambda root: (root / "val2017" / file_name("val2017", 285))
                         .write_bytes(b"not a jpeg"),
                         "{root}/val2017/000000000285.jpg: cannot read image"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_one_error_naming_the_file_and_nothing_written(tmp_path, name):
    root = make_layout(tmp_path / "coco")
    make_bad, message = BAD[name]
    make_bad(root)
    out = tmp_path / "out" / "coco.lmdb"
    out.parent.mkdir()
    result = run("prepare", "coco", "--root", root, "--split", "val2017", "--out", out)
    assert result.exit_code == 1, result.output
    expected = message.format(root=root, json=root / "annotations/captions_val2017.json")
    assert result.output.strip().splitlines()[-1].startswith(f"Error: {expected}"), \
        result.output
    assert "Traceback" not in result.output
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_the_caption_file_has_a_size_cap(tmp_path, monkeypatch):
    root = make_layout(tmp_path / "coco")
    monkeypatch.setattr("t2i_fast.prepare.coco.MAX_ANNOTATION_BYTES", 1000)
    with pytest.raises(DataError, match="more than a COCO caption file may hold"):
        make_coco(root=root, out=tmp_path / "c.lmdb", split="val2017")


def test_split_is_required_and_named(tmp_path):
    root = make_layout(tmp_path / "coco")
    assert run("prepare", "coco", "--root", root, "--out", tmp_path / "c.lmdb").exit_code == 2
    wrong = run("prepare", "coco", "--root", root, "--split", "train2014", "--out",
                tmp_path / "c.lmdb")
    assert wrong.exit_code == 1
    assert f"{root / 'annotations/captions_train2014.json'}: missing" in wrong.output


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("coco")
    out = tmp / "coco.lmdb"
    make_coco(root=make_layout(tmp / "src", extra=9), out=out, split="val2017", image_size=40)
    return out


def test_mismatched_images_are_any_other_image(coco):
    seen = set()
    for epoch in range(3):
        for batch in Loader(coco, batch_size=4, epoch=epoch, drop_last=False):
            assert (batch.indices != batch.wrong_indices).all()
            assert (batch.wrong_class_ids == 0).all()
            seen.update(zip(batch.indices.tolist(), batch.wrong_indices.tolist(), strict=True))
    assert len({w for _, w in seen}) > 6, "drawn among all the others, not a fixed few"


def test_training_runs_a_step(coco, tmp_path, capsys):
    """The small preset's class loss has no classes to tell apart here: the run says so,
    trains without it (D without a class head) and records that in its config.json."""
    run_dir = tiny_run(coco, tmp_path / "run", max_steps=2)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir())[-1] == \
        "step_00000002.pt"
    assert (run_dir / "samples.png").is_file()
    assert f"{coco}: one class, nothing for the class loss to tell apart" in \
        capsys.readouterr().err
    assert Run(run_dir).config().class_loss == 0.0
    state = load_checkpoint(run_dir / "checkpoints/step_00000002.pt")
    assert not any(key.startswith("classify.") for key in state["D"])


def test_pretraining_matches_images_with_their_own_captions(coco, tmp_path):
    """One class for all would give DS-SJE no pair to tell apart (a zero loss, nothing
    learnt): each image is its own class instead, and zero-shot evaluation says why it is
    skipped."""
    checkpoint = pretrain_text(config=PretrainConfig(data=str(coco), out=str(tmp_path / "t"),
                                                     epochs=2, batch_size=6))
    losses = [json.loads(line)["loss"]
              for line in (tmp_path / "t/metrics.jsonl").read_text().splitlines()]
    assert all(loss > 0 for loss in losses)
    evaluation = json.loads((tmp_path / "t/evaluation.json").read_text())
    assert "has none to tell apart" in evaluation["skipped"]
    assert checkpoint.is_file()


def test_retrieval_on_a_run_without_classes(coco, tmp_path):
    run_dir = tiny_run(coco, tmp_path / "run", train_text_encoder=False, pretrain_epochs=1)
    result = run("eval", "retrieval", "--run", run_dir, "--n", 6, "--distractors", 5, "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert scores["n"] == 6 and scores["chance"] == pytest.approx(1 / 6)
