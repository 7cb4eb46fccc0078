"""CUB-200-2011 with Reed et al.'s captions (text_c10) and class-disjoint split."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from t2i_fast.data.alphabet import DEFAULT_DOC_LENGTH
from t2i_fast.data.writer import DatasetWriter
from t2i_fast.errors import DataError
from t2i_fast.prepare.captions import read_captions, read_class_list, read_lines
from t2i_fast.prepare.images import ImageJob, write_images

SPLITS = ("trainval", "test", "all")
SPLIT_FILES = {"trainval": "trainvalclasses.txt", "test": "testclasses.txt"}


def make_cub(*, root: str | Path, out: str | Path, split: str = "trainval",
             bbox_crop: bool = False, image_size: int = 76, encoding: str = "raw",
             doc_length: int = DEFAULT_DOC_LENGTH, overwrite: bool = False,
             workers: int = 1) -> int:
    """Write the images of ``split``'s classes; returns how many."""
    root = Path(root)
    classes, jobs = scan_cub(root, split=split, bbox_crop=bbox_crop)
    writer = DatasetWriter(out, image_size=image_size, classes=classes, source="cub",
                           split=split, encoding=encoding, doc_length=doc_length,
                           overwrite=overwrite, extra_meta={"bbox_crop": bbox_crop})
    with writer:
        write_images(writer, jobs, workers=workers, label=f"cub {split}")
    return len(jobs)


def scan_cub(root: Path, *, split: str, bbox_crop: bool) -> tuple[list[str], list[ImageJob]]:
    """The split's classes that have images (sorted folder names, so a subset such as
    cub_mini gets no empty classes) and one checked job per image, in images.txt order."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    base = root / "CUB_200_2011"
    class_names = _id_table(base / "classes.txt")
    labels = _id_table(base / "image_class_labels.txt")
    images = _id_table(base / "images.txt")
    boxes = _id_table(base / "bounding_boxes.txt") if bbox_crop else {}
    known = {name for _, name in class_names.values()}
    wanted = known if split == "all" else set(read_class_list(root / SPLIT_FILES[split], known))

    chosen = []  # (image id, class name, relative path)
    for image_id, (line_no, rel) in images.items():
        where = f"{base / 'images.txt'}: line {line_no}"
        if image_id not in labels:
            raise DataError(f"{where}: image id {image_id} has no entry in "
                            f"{base / 'image_class_labels.txt'}")
        label_line, label = labels[image_id]
        if not label.isdigit() or int(label) not in class_names:
            raise DataError(f"{base / 'image_class_labels.txt'}: line {label_line}: class id "
                            f"{label!r} is not in {base / 'classes.txt'}")
        class_name = class_names[int(label)][1]
        if PurePosixPath(rel).parts[0] != class_name:
            raise DataError(f"{where}: {rel} is not in the folder of its class {class_name}")
        if class_name in wanted:
            chosen.append((image_id, class_name, rel))
    if not chosen:
        raise DataError(f"{root}: no images of split '{split}' listed in {base / 'images.txt'}")

    classes = sorted({class_name for _, class_name, _ in chosen})
    class_ids = {name: i for i, name in enumerate(classes)}
    jobs = []
    for image_id, class_name, rel in chosen:
        path = base / "images" / rel
        if not path.is_file():
            raise DataError(f"{path}: image missing (listed in {base / 'images.txt'})")
        stem = PurePosixPath(rel).stem
        text = root / "text_c10" / class_name / f"{stem}.txt"
        if not text.is_file():
            raise DataError(f"{text}: caption file missing (for image {path})")
        jobs.append(ImageJob(path=path, captions=read_captions(text),
                             class_id=class_ids[class_name], name=f"{class_name}/{stem}",
                             bbox=_bbox(boxes, image_id, base) if bbox_crop else None))
    return classes, jobs


def _id_table(path: Path) -> dict[int, tuple[int, str]]:
    """CUB's '<id> <value>' files: id → (line number, value)."""
    if not path.is_file():
        raise DataError(f"{path}: missing (--root must hold CUB_200_2011/ and text_c10/)")
    table = {}
    for line_no, line in read_lines(path):
        key, _, value = line.partition(" ")
        if not key.isdigit() or not value.strip():
            raise DataError(f"{path}: line {line_no}: expected '<id> <value>', got {line!r}")
        if int(key) in table:
            raise DataError(f"{path}: line {line_no}: id {key} listed twice")
        table[int(key)] = (line_no, value.strip())
    return table


def _bbox(boxes: dict[int, tuple[int, str]], image_id: int, base: Path
          ) -> tuple[float, float, float, float]:
    path = base / "bounding_boxes.txt"
    if image_id not in boxes:
        raise DataError(f"{path}: no bounding box for image id {image_id}")
    line_no, text = boxes[image_id]
    try:
        x, y, w, h = (float(v) for v in text.split())
    except ValueError:
        raise DataError(f"{path}: line {line_no}: expected '<id> <x> <y> <width> <height>', "
                        f"got {text!r}") from None
    if w <= 0 or h <= 0:
        raise DataError(f"{path}: line {line_no}: empty bounding box {text!r}")
    return x, y, w, h
