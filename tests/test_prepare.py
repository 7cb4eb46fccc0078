"""``t2i-fast prepare``: the shapes generator, CUB, flowers and folder sources, and how they
fail on bad input (one error naming the file, nothing written)."""

import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from t2i_fast.cli import main
from t2i_fast.data import Dataset
from t2i_fast.data.alphabet import encode
from t2i_fast.errors import DataError
from t2i_fast.prepare.captions import read_captions
from t2i_fast.prepare.cub import make_cub
from t2i_fast.prepare.flowers import make_flowers
from t2i_fast.prepare.folder import make_folder
from t2i_fast.prepare.images import load_image
from t2i_fast.prepare.shapes import make_shapes
from t2i_fast.shapes_spec import CLASSES

SIZE_WORDS = {"small": {"small", "tiny", "little"},
              "medium": {"medium", "medium-sized", "mid-sized"},
              "large": {"large", "big", "huge"}}
# Position and background are style that captions must leave to the noise vector.
STYLE_WORDS = re.compile(r"\b(left|right|top|bottom|corner|cent(er|re)|middle|above|below|"
                         r"upper|lower|background|backdrop|gradient|stripe[sd]?|noise|grey|"
                         r"gray|beige|slate)\b")
# For each colour: channels that must exceed the remaining one(s) at a shape's centre.
HIGH_CHANNELS = {"red": [0], "yellow": [0, 1], "green": [1], "cyan": [1, 2], "blue": [2],
                 "purple": [0, 2]}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def records(path):
    with Dataset(path) as ds:
        return ds.meta, [ds[i] for i in range(len(ds))]


def assert_nothing_written(out: Path):
    assert not out.exists()
    strays = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert strays == [], f"temporary left behind: {strays}"


# --- shapes ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "shapes.lmdb"
    assert make_shapes(out=out, n=300, seed=3) == 300
    return records(out)


def test_shapes_deterministic_per_seed(tmp_path):
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        make_shapes(out=tmp_path / f"{name}.lmdb", n=12, seed=seed, image_size=40)
        runs[name] = records(tmp_path / f"{name}.lmdb")[1]

    def same(x, y):
        return all(np.array_equal(p.image, q.image) and p.captions == q.captions
                   and p.attributes == q.attributes and p.class_id == q.class_id
                   for p, q in zip(x, y, strict=True))

    assert same(runs["a"], runs["b"])
    assert not same(runs["a"], runs["c"])
    assert not any(np.array_equal(p.image, q.image)
                   for p, q in zip(runs["a"], runs["c"], strict=True))


def test_shapes_count_and_metadata(shapes_ds):
    meta, recs = shapes_ds
    assert meta["count"] == len(recs) == 300
    assert meta["source"] == "shapes" and meta["split"] == "all"
    assert meta["classes"] == list(CLASSES) and len(CLASSES) == 24 and "red circle" in CLASSES
    assert meta["image_size"] == [76, 76] and meta["captions_per_image"] == 10
    assert [r.name for r in recs[:3]] == ["shape_000000", "shape_000001", "shape_000002"]
    assert len({r.class_id for r in recs}) == 24, "300 images cover every class"


def test_shapes_captions_follow_attributes(shapes_ds):
    _, recs = shapes_ds
    counts = {1: 0, 2: 0}
    for rec in recs:
        shapes = rec.attributes["shapes"]
        counts[len(shapes)] += 1
        first = shapes[0]
        assert rec.attributes["position"] == [first["cx"], first["cy"]]
        assert CLASSES[rec.class_id] == f"{first['color']} {first['shape']}"
        assert first["radius"] >= shapes[-1]["radius"], "the first shape is the largest"
        assert len(rec.captions) == 10
        for caption in rec.captions:
            text = caption.lower()
            words = set(re.findall(r"[a-z-]+", text))
            for shape in shapes:
                assert {shape["color"], shape["shape"]} <= words, (caption, shape)
            assert words & SIZE_WORDS[first["size"]], (caption, first)
            assert not STYLE_WORDS.search(text), caption
    assert counts[1] > 50 and counts[2] > 50, counts
    texts = {c.lower().rstrip(".") for rec in recs for c in rec.captions}
    assert len(texts) > 1000, "templates and synonyms give varied captions"
    assert {"tiny", "little", "big", "huge", "mid-sized", "medium-sized"} <= {
        w for t in texts for w in t.split()}


def test_shapes_pixels_and_geometry(shapes_ds):
    _, recs = shapes_ds
    backgrounds = set()
    for rec in recs:
        image = rec.image.astype(int)
        backgrounds.add(rec.attributes["background_id"])
        corner = image[0, 0]
        assert corner.max() - corner.min() < 50, "backgrounds are desaturated"
        for shape in rec.attributes["shapes"]:
            cx, cy, r = shape["cx"], shape["cy"], shape["radius"]
            # Every 64-pixel training crop of the 76-pixel image shows the whole shape.
            assert 12 <= cx - r and cx + r <= 64 and 12 <= cy - r and cy + r <= 64
            base = {"small": 7, "medium": 12, "large": 18}[shape["size"]]
            assert abs(r - base) <= 0.1 * base
            pixel = image[int(cy), int(cx)]
            high = HIGH_CHANNELS[shape["color"]]
            low = [c for c in range(3) if c not in high]
            assert pixel[high].min() > pixel[low].max() + 100, (shape, pixel)
        if len(rec.attributes["shapes"]) == 2:
            a, b = rec.attributes["shapes"]
            gap = a["radius"] + b["radius"]
            assert max(abs(a["cx"] - b["cx"]), abs(a["cy"] - b["cy"])) >= gap, "no overlap"
    assert backgrounds == set(range(8))


def test_shapes_scale_with_image_size(tmp_path):
    make_shapes(out=tmp_path / "s.lmdb", n=40, image_size=38)
    meta, recs = records(tmp_path / "s.lmdb")
    assert meta["image_size"] == [38, 38] and recs[0].image.shape == (38, 38, 3)
    for rec in recs:
        for shape in rec.attributes["shapes"]:
            cx, cy, r = shape["cx"], shape["cy"], shape["radius"]
            assert 6 <= min(cx, cy) - r and max(cx, cy) + r <= 32
            assert r <= 0.55 * {"small": 7, "medium": 12, "large": 18}[shape["size"]]


# --- CUB -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cub_sets(cub_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cub")
    out = {}
    for split, bbox, workers in (("trainval", False, 2), ("test", False, 1), ("all", False, 2),
                                 ("test", True, 2)):
        path = tmp / f"{split}{'-bbox' if bbox else ''}.lmdb"
        make_cub(root=cub_root, out=path, split=split, bbox_crop=bbox, workers=workers)
        out[split, bbox] = records(path)
    return out


@pytest.mark.parametrize("split, classes, counts", [
    ("trainval", ["002", "003", "005", "007"], [60, 58, 44, 53]),
    ("test", ["001", "004", "006"], [60, 60, 41]),
    ("all", ["001", "002", "003", "004", "005", "006", "007"], [60, 60, 58, 60, 44, 41, 53]),
])
def test_cub_splits(cub_sets, cub_root, split, classes, counts):
    meta, recs = cub_sets[split, False]
    folders = sorted(p.name for p in (cub_root / "CUB_200_2011/images").iterdir())
    assert meta["classes"] == [f for f in folders if f[:3] in classes]
    assert meta["class_counts"] == counts and len(recs) == sum(counts)
    assert meta["source"] == "cub" and meta["split"] == split
    # Records follow images.txt (through the worker pool too); names are '<class>/<stem>'.
    listed = [line.split()[1].rsplit(".", 1)[0] for line in
              (cub_root / "CUB_200_2011/images.txt").read_text().splitlines()]
    wanted = set(meta["classes"])
    assert [r.name for r in recs] == [n for n in listed if n.split("/")[0] in wanted]
    for rec in recs[::17]:
        assert meta["classes"][rec.class_id] == rec.name.split("/")[0]
        assert rec.image.shape == (76, 76, 3) and len(rec.captions) == 10


def test_cub_text_quirks_kept(cub_sets, cub_root):
    _, recs = cub_sets["all", False]
    by_name = {r.name: r for r in recs}
    odd = by_name["003.Sooty_Albatross/Sooty_Albatross_0029_796357"]
    source = read_captions(cub_root / "text_c10" / f"{odd.name}.txt")
    assert odd.captions == source and any("\ufffd" in c for c in odd.captions)
    long = [(r, i) for r in recs for i, c in enumerate(r.captions) if len(c) > 201]
    assert long, "cub_mini has captions over 201 characters"
    for rec, i in long[:5]:
        assert len(rec.captions[i]) > 201, "stored text is kept whole"
        assert rec.char_indices.shape[1] == 201
        assert np.array_equal(rec.char_indices[i], encode(rec.captions[i]))
        assert rec.char_indices[i, -1] != 0, "full: truncated, not padded"


def test_cub_bbox_crop_changes_images(cub_sets):
    (_, whole), (meta, cropped) = cub_sets["test", False], cub_sets["test", True]
    assert meta["bbox_crop"] is True
    assert [r.name for r in whole] == [r.name for r in cropped]
    diffs = [np.abs(a.image.astype(int) - b.image.astype(int)).mean()
             for a, b in zip(whole, cropped, strict=True)]
    assert np.median(diffs) > 10


def make_fake_cub(root: Path) -> Path:
    """Two classes of two solid-colour images each, in CUB's layout."""
    base = root / "CUB_200_2011"
    classes = ["001.Alpha", "002.Beta"]
    lines = {"images": [], "labels": [], "boxes": []}
    for c, cls in enumerate(classes):
        (base / "images" / cls).mkdir(parents=True)
        (root / "text_c10" / cls).mkdir(parents=True)
        for k in range(2):
            image_id = 2 * c + k + 1
            Image.new("RGB", (60, 40), (200 * c, 50, 100 + 50 * k)).save(
                base / "images" / cls / f"img_{k}.jpg")
            (root / "text_c10" / cls / f"img_{k}.txt").write_text(f"bird {c} {k}\nsecond\n")
            lines["images"].append(f"{image_id} {cls}/img_{k}.jpg")
            lines["labels"].append(f"{image_id} {c + 1}")
            lines["boxes"].append(f"{image_id} 10.0 5.0 20.0 30.0")
    (base / "classes.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    (base / "images.txt").write_text("\n".join(lines["images"]) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(lines["labels"]) + "\n")
    (base / "bounding_boxes.txt").write_text("\n".join(lines["boxes"]) + "\n")
    (root / "trainvalclasses.txt").write_text("002.Beta\n")
    (root / "testclasses.txt").write_text("001.Alpha\n")
    return root


def test_cub_layout_without_cub_mini(tmp_path):
    root = make_fake_cub(tmp_path / "cub")
    make_cub(root=root, out=tmp_path / "tv.lmdb", bbox_crop=True)
    meta, recs = records(tmp_path / "tv.lmdb")
    assert meta["classes"] == ["002.Beta"] and [r.class_id for r in recs] == [0, 0]
    assert [r.name for r in recs] == ["002.Beta/img_0", "002.Beta/img_1"]
    assert recs[1].captions == ["bird 1 1", "second"]


# --- flowers -------------------------------------------------------------------------------------


def make_flowers_tree(root: Path) -> Path:
    (root / "jpg").mkdir(parents=True)
    layout = {"class_00001": [1, 2], "class_00002": [3], "class_00003": [4, 5]}
    for cls, numbers in layout.items():
        (root / "text_c10" / cls).mkdir(parents=True)
        for i in numbers:
            Image.new("RGB", (50, 30), (40 * i, 255 - 40 * i, 90)).save(
                root / "jpg" / f"image_{i:05d}.jpg")
            (root / "text_c10" / cls / f"image_{i:05d}.txt").write_text(
                f"flower number {i}\nit has petals\n")
    # Reed's class folders also hold embeddings, which are not captions.
    (root / "text_c10" / "class_00001" / "image_00001.h5").write_bytes(b"\x89HDF")
    (root / "trainvalclasses.txt").write_text("class_00003\nclass_00001\n")
    (root / "testclasses.txt").write_text("class_00002\n")
    return root


@pytest.mark.parametrize("split, classes, names", [
    ("trainval", ["class_00001", "class_00003"], [1, 2, 4, 5]),
    ("test", ["class_00002"], [3]),
    ("all", ["class_00001", "class_00002", "class_00003"], [1, 2, 3, 4, 5]),
])
def test_flowers(tmp_path, split, classes, names):
    root = make_flowers_tree(tmp_path / "flowers")
    count = make_flowers(root=root, out=tmp_path / "f.lmdb", split=split, image_size=32)
    assert count == len(names)
    meta, recs = records(tmp_path / "f.lmdb")
    assert meta["classes"] == classes and meta["source"] == "flowers"
    assert [int(r.name.rsplit("_", 1)[1]) for r in recs] == names
    for rec in recs:
        i = int(rec.name.rsplit("_", 1)[1])
        assert meta["classes"][rec.class_id] == rec.name.split("/")[0]
        assert rec.captions == [f"flower number {i}", "it has petals"]
        assert abs(int(rec.image[16, 16, 0]) - 40 * i) < 12, "the caption's own image"


def test_flowers_errors(tmp_path):
    root = make_flowers_tree(tmp_path / "flowers")
    (root / "testclasses.txt").write_text("class_00002\nclass_00099\n")
    with pytest.raises(DataError, match=r"testclasses\.txt: line 2: unknown class 'class_00099'"):
        make_flowers(root=root, out=tmp_path / "f.lmdb", split="test")
    (root / "jpg" / "image_00004.jpg").unlink()
    with pytest.raises(DataError, match=r"image_00004\.jpg: image missing"):
        make_flowers(root=root, out=tmp_path / "f.lmdb", split="trainval")
    assert_nothing_written(tmp_path / "f.lmdb")


# --- folder: whatever users have -----------------------------------------------------------------


def caption(path: Path, text: str = "a thing\n") -> None:
    path.with_suffix(".txt").write_text(text)


def make_user_folder(root: Path) -> Path:
    for sub in ("gray", "cmyk", "palette", "rgba", "deep", "rotated", "upper/nested", "spaces"):
        (root / sub).mkdir(parents=True)
    Image.new("L", (30, 30), 100).save(root / "gray/g.png")
    Image.new("CMYK", (30, 30), (255, 0, 0, 0)).save(root / "cmyk/c.jpg", quality=95)
    # Palette with a transparent index: the left half shows white once composited.
    pal = Image.new("P", (30, 30), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(0, (0, 0, 15, 30))
    pal.save(root / "palette/p.png", transparency=0)
    rgba = np.zeros((30, 30, 4), np.uint8)
    rgba[:, 15:] = (0, 0, 255, 128)
    Image.fromarray(rgba).save(root / "rgba/a.png")
    Image.fromarray(np.full((30, 30), 128 * 257, np.uint16)).save(root / "deep/d.png")
    # 40 wide, 20 high, red left and blue right; orientation 6 means "rotate 90 degrees
    # clockwise to display", so the viewer sees red on top and blue below.
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :20] = (255, 0, 0)
    wide[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(wide).save(root / "rotated/r.jpg", exif=exif, quality=95)
    Image.new("RGB", (30, 30), (0, 200, 0)).save(root / "upper/nested/U.JPG")
    Image.new("RGB", (30, 30), (10, 20, 30)).save(root / "spaces/my photo.png")
    Image.new("RGB", (30, 30), (90, 90, 0)).save(root / "top.bmp")
    for image in list(root.rglob("*")):
        if image.is_file():
            caption(image, f"a {image.parent.name} image\n")
    # Windows Notepad: byte-order mark, CRLF, blank lines and stray spaces.
    (root / "spaces/my photo.txt").write_bytes(
        "\ufeffA photo of things\r\n\r\n   second caption  \r\n\r\n".encode())
    # Not images: notes, OS litter (a macOS resource fork with an image's extension).
    (root / "README.txt").write_text("notes, not a caption\n")
    (root / "gray/._g.png").write_bytes(b"\x00\x05\x16\x07")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return root


def test_folder_takes_what_users_have(tmp_path):
    root = make_user_folder(tmp_path / "mine")
    result = run("prepare", "folder", "--root", root, "--out", tmp_path / "u.lmdb",
                 "--image-size", 16, "--workers", 2)
    assert result.exit_code == 0, result.output
    meta, recs = records(tmp_path / "u.lmdb")
    assert meta["classes"] == ["cmyk", "deep", "gray", "mine", "palette", "rgba", "rotated",
                               "spaces", "upper/nested"]
    assert meta["source"] == "folder" and meta["split"] == "all"
    by = {r.name: r for r in recs}
    assert sorted(by) == ["cmyk/c.jpg", "deep/d.png", "gray/g.png", "palette/p.png",
                          "rgba/a.png", "rotated/r.jpg", "spaces/my photo.png", "top.bmp",
                          "upper/nested/U.JPG"]
    for name, rec in by.items():
        assert meta["classes"][rec.class_id] == (name.rsplit("/", 1)[0] if "/" in name
                                                 else "mine")

    def near(name, y, x, rgb, tol=12):
        pixel = by[name].image[y, x].astype(int)
        assert np.abs(pixel - rgb).max() <= tol, (name, pixel, rgb)

    near("gray/g.png", 8, 8, (100, 100, 100), 0)
    near("cmyk/c.jpg", 8, 8, (0, 255, 255))
    near("palette/p.png", 8, 2, (255, 255, 255), 0)
    near("palette/p.png", 8, 13, (255, 0, 0), 0)
    near("rgba/a.png", 8, 2, (255, 255, 255), 0)
    near("rgba/a.png", 8, 13, (127, 127, 255), 1)
    near("deep/d.png", 8, 8, (128, 128, 128), 0)
    for x in (2, 13):  # the rotation applied: red on top, blue below, across the whole width
        near("rotated/r.jpg", 2, x, (255, 0, 0), 40)
        near("rotated/r.jpg", 13, x, (0, 0, 255), 40)
    near("upper/nested/U.JPG", 8, 8, (0, 200, 0))
    near("top.bmp", 8, 8, (90, 90, 0), 0)
    assert by["spaces/my photo.png"].captions == ["A photo of things", "second caption"]
    assert by["top.bmp"].captions == ["a mine image"]


def test_folder_bbox_and_jpeg_encoding(tmp_path):
    image = np.zeros((40, 80, 3), np.uint8)
    image[10:20, 50:60] = (250, 250, 0)
    Image.fromarray(image).save(tmp_path / "x.png")
    crop = load_image(tmp_path / "x.png", 12, bbox=(50, 10, 10, 10))
    assert crop[6, 6].tolist() == [250, 250, 0] and crop[0, 0].tolist() == [0, 0, 0]
    root = tmp_path / "one"
    root.mkdir()
    Image.fromarray(image).save(root / "x.png")
    caption(root / "x.png")
    make_folder(root=root, out=tmp_path / "j.lmdb", encoding="jpeg", image_size=40)
    meta, recs = records(tmp_path / "j.lmdb")
    assert meta["encoding"] == "jpeg" and meta["classes"] == ["one"]
    assert np.abs(recs[0].image[15, 27].astype(int) - (250, 250, 0)).max() < 20


# --- bad input: one clear error, nothing written -------------------------------------------------


def one_image_folder(root: Path) -> Path:
    (root / "cls").mkdir(parents=True)
    Image.new("RGB", (20, 20), (1, 2, 3)).save(root / "cls/fine.png")
    caption(root / "cls/fine.png")
    return root


def bad_truncated(root):
    Image.effect_noise((200, 200), 50).convert("RGB").save(root / "cls/broken.jpg")
    data = (root / "cls/broken.jpg").read_bytes()
    (root / "cls/broken.jpg").write_bytes(data[: len(data) // 2])
    caption(root / "cls/broken.jpg")
    return root / "cls/broken.jpg", "cannot read image"


def bad_not_an_image(root):
    (root / "cls/fake.PNG").write_text("this is text")
    caption(root / "cls/fake.PNG")
    return root / "cls/fake.PNG", "cannot read image"


def bad_no_caption_file(root):
    Image.new("RGB", (20, 20)).save(root / "cls/lonely.jpg")
    return root / "cls/lonely.jpg", "no caption file"


def bad_blank_captions(root):
    Image.new("RGB", (20, 20)).save(root / "cls/blank.jpg")
    caption(root / "cls/blank.jpg", "\r\n   \n\n")
    return root / "cls/blank.txt", "no captions"


def bad_latin1(root):
    Image.new("RGB", (20, 20)).save(root / "cls/latin.jpg")
    (root / "cls/latin.txt").write_bytes("a fine caption\nun oiseau brûlé\n".encode("latin-1"))
    return root / "cls/latin.txt", "line 2 is not valid UTF-8"


def bad_too_many(root):
    Image.new("RGB", (20, 20)).save(root / "cls/chatty.jpg")
    caption(root / "cls/chatty.jpg", "".join(f"caption {i}\n" for i in range(256)))
    return root / "cls/chatty.txt", "256 captions, at most 255"


@pytest.mark.parametrize("make_bad", [bad_truncated, bad_not_an_image, bad_no_caption_file,
                                      bad_blank_captions, bad_latin1, bad_too_many])
@pytest.mark.parametrize("workers", [1, 2])
def test_bad_input_is_one_error_and_no_dataset(tmp_path, make_bad, workers):
    root = one_image_folder(tmp_path / "src")
    path, message = make_bad(root)
    out = tmp_path / "out" / "d.lmdb"
    out.parent.mkdir()
    result = run("prepare", "folder", "--root", root, "--out", out, "--workers", workers)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith(f"Error: {path}: {message}"), result.output
    assert "Traceback" not in result.output
    assert_nothing_written(out)


def test_cub_bad_input(tmp_path):
    root = make_fake_cub(tmp_path / "cub")
    out = tmp_path / "c.lmdb"
    result = run("prepare", "cub", "--root", root / "text_c10", "--out", out)
    assert result.exit_code == 1
    assert "CUB_200_2011/classes.txt: missing (--root must hold" in result.output
    (root / "text_c10/002.Beta/img_1.txt").unlink()
    result = run("prepare", "cub", "--root", root, "--out", out)
    assert result.exit_code == 1
    assert f"Error: {root / 'text_c10/002.Beta/img_1.txt'}: caption file missing" in result.output
    (root / "trainvalclasses.txt").write_text("002.Beta\n\n999.Nothing\n")
    result = run("prepare", "cub", "--root", root, "--out", out)
    assert result.exit_code == 1
    assert "trainvalclasses.txt: line 3: unknown class '999.Nothing'" in result.output
    (root / "CUB_200_2011/bounding_boxes.txt").write_text("1 1 2 3 4\n2 1 2 0 4\n")
    result = run("prepare", "cub", "--root", root, "--out", out, "--split", "test",
                 "--bbox-crop")
    assert result.exit_code == 1
    assert "bounding_boxes.txt: line 2: empty bounding box" in result.output
    assert_nothing_written(out)


def test_overwrite(tmp_path):
    out = tmp_path / "s.lmdb"
    assert run("prepare", "shapes", "--out", out, "--n", 4, "--image-size", 16).exit_code == 0
    result = run("prepare", "shapes", "--out", out, "--n", 6, "--image-size", 16)
    assert result.exit_code == 1 and "already exists (pass --overwrite" in result.output
    assert records(out)[0]["count"] == 4, "refused: the old dataset is untouched"
    result = run("prepare", "shapes", "--out", out, "--n", 6, "--image-size", 16, "--overwrite")
    assert result.exit_code == 0, result.output
    assert records(out)[0]["count"] == 6
    # A failed --overwrite run keeps the dataset it would have replaced.
    root = one_image_folder(tmp_path / "src")
    bad_truncated(root)
    result = run("prepare", "folder", "--root", root, "--out", out, "--overwrite")
    assert result.exit_code == 1
    assert records(out)[0]["count"] == 6
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_help_shows_defaults():
    for command, default in (("shapes", "10000"), ("cub", "trainval"), ("flowers", "trainval"),
                             ("folder", "76")):
        result = run("prepare", command, "--help")
        assert result.exit_code == 0
        assert f"[default: {default}" in result.output and "--out" in result.output
