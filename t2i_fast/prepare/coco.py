"""MS-COCO captions in the official layout: ROOT/annotations/captions_SPLIT.json (the COCO
API's JSON: an ``images`` list and an ``annotations`` list, not grouped by image) and
ROOT/SPLIT/ holding the images under the file names the JSON gives.

COCO has no classes: every record gets class id 0 of the single class ``coco``, which makes the
loader's mismatched image any other image (docs/format.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from t2i_fast.data.alphabet import DEFAULT_DOC_LENGTH
from t2i_fast.data.writer import DatasetWriter
from t2i_fast.errors import DataError
from t2i_fast.prepare.captions import MAX_CAPTIONS
from t2i_fast.prepare.files import MAX_IMAGE_BYTES, inside, open_regular, read_regular
from t2i_fast.prepare.images import ImageJob, write_images

SPLITS = ("train2014", "val2014", "train2017", "val2017")
CLASSES = ["coco"]
# captions_train2017.json, the largest, is 92 MB: room to spare, but not for a runaway file.
MAX_ANNOTATION_BYTES = 512 << 20


@dataclass(frozen=True)
class CocoSummary:
    images: int  # written
    uncaptioned: int  # listed in the JSON without a caption, skipped


def make_coco(*, root: str | Path, out: str | Path, split: str, image_size: int = 76,
              encoding: str = "raw", doc_length: int = DEFAULT_DOC_LENGTH,
              overwrite: bool = False, workers: int = 1) -> CocoSummary:
    """Write every captioned image of ``split`` with all its captions (5 to 7 in COCO)."""
    root = Path(root)
    jobs, uncaptioned = scan_coco(root, split=split)
    writer = DatasetWriter(out, image_size=image_size, classes=CLASSES, source="coco",
                           split=split, encoding=encoding, doc_length=doc_length,
                           overwrite=overwrite, extra_meta={"uncaptioned_skipped": uncaptioned})
    with writer:
        write_images(writer, jobs, workers=workers, label=f"coco {split}")
    return CocoSummary(images=len(jobs), uncaptioned=uncaptioned)


def scan_coco(root: Path, *, split: str) -> tuple[list[ImageJob], int]:
    """One checked job per captioned image, in the JSON's image order, with its captions in
    annotation order, whitespace normalised; and how many listed images have no caption."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    annotations = root / "annotations" / f"captions_{split}.json"
    folder = root / split
    for path, present in ((annotations, annotations.exists()), (folder, folder.is_dir())):
        if not present:
            raise DataError(f"{path}: missing (--root must hold "
                            f"annotations/captions_{split}.json and {split}/)")
    images, captions = _read_annotations(annotations)
    jobs, uncaptioned = [], 0
    for image_id, file_name in images.items():
        texts = captions.get(image_id, [])
        if not texts:
            uncaptioned += 1
            continue
        if len(texts) > MAX_CAPTIONS:
            raise DataError(f"{annotations}: image id {image_id} has {len(texts)} captions, at "
                            f"most {MAX_CAPTIONS} per image")
        path = folder / file_name
        if not path.exists():
            raise DataError(f"{path}: image missing (listed in {annotations})")
        inside(root, path)
        open_regular(path, limit=MAX_IMAGE_BYTES, what="image").close()  # before writing
        jobs.append(ImageJob(path=path, captions=texts, class_id=0, name=f"{split}/{file_name}"))
    if not jobs:
        raise DataError(f"{annotations}: no image has a caption")
    return jobs, uncaptioned


def _read_annotations(path: Path) -> tuple[dict[int, str], dict[int, list[str]]]:
    """image id → file name, in the file's order; image id → its non-blank captions."""
    data = read_regular(path, limit=MAX_ANNOTATION_BYTES, what="COCO caption file")
    try:
        document = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset "
                        f"{exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON (line {exc.lineno} column {exc.colno}: "
                        f"{exc.msg})") from exc
    except RecursionError as exc:  # json nests one Python call deep per bracket
        raise DataError(f"{path}: not valid JSON (nested too deeply)") from exc
    if not isinstance(document, dict):
        raise DataError(f"{path}: expected a JSON object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if not isinstance(document.get(key), list):
            raise DataError(f"{path}: no '{key}' list (not a COCO captions file)")

    images: dict[int, str] = {}
    for i, entry in enumerate(document["images"]):
        where = f"{path}: images[{i}]"
        image_id = _field(entry, "id", int, where)
        file_name = _field(entry, "file_name", str, where)
        # The JSON names files in the split's folder, nothing beside or below it.
        if PurePosixPath(file_name).name != file_name or file_name in ("", ".", "..") \
                or "\\" in file_name:
            raise DataError(f"{where}: file_name {file_name!r} is not a plain file name")
        if image_id in images:
            raise DataError(f"{where}: image id {image_id} listed twice")
        images[image_id] = file_name

    captions: dict[int, list[str]] = {}
    for i, entry in enumerate(document["annotations"]):
        where = f"{path}: annotations[{i}]"
        image_id = _field(entry, "image_id", int, where)
        if image_id not in images:
            raise DataError(f"{where}: image id {image_id} is not in 'images'")
        # Captions come with trailing newlines, spaces before periods, doubled spaces.
        text = " ".join(_field(entry, "caption", str, where).split())
        if text:
            captions.setdefault(image_id, []).append(text)
    return images, captions


def _field(entry: object, key: str, kind: type, where: str):
    if not isinstance(entry, dict) or key not in entry:
        raise DataError(f"{where}: no '{key}'")
    value = entry[key]
    if type(value) is not kind:  # not isinstance: JSON's true is no image id
        raise DataError(f"{where}: '{key}' is {type(value).__name__}, expected "
                        f"{kind.__name__}")
    return value
