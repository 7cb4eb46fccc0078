"""Oxford-102 flowers in Reed et al.'s layout: jpg/image_XXXXX.jpg, captions
text_c10/class_XXXXX/image_XXXXX.txt and class-disjoint split files."""

from __future__ import annotations

from pathlib import Path

from t2i_fast.data.alphabet import DEFAULT_DOC_LENGTH
from t2i_fast.data.writer import DatasetWriter
from t2i_fast.errors import DataError
from t2i_fast.prepare.captions import read_captions, read_class_list
from t2i_fast.prepare.cub import SPLIT_FILES, SPLITS
from t2i_fast.prepare.images import ImageJob, write_images


def make_flowers(*, root: str | Path, out: str | Path, split: str = "trainval",
                 image_size: int = 76, encoding: str = "raw",
                 doc_length: int = DEFAULT_DOC_LENGTH, overwrite: bool = False,
                 workers: int = 1) -> int:
    """Write the images of ``split``'s classes; returns how many."""
    root = Path(root)
    classes, jobs = scan_flowers(root, split=split)
    writer = DatasetWriter(out, image_size=image_size, classes=classes, source="flowers",
                           split=split, encoding=encoding, doc_length=doc_length,
                           overwrite=overwrite)
    with writer:
        write_images(writer, jobs, workers=workers, label=f"flowers {split}")
    return len(jobs)


def scan_flowers(root: Path, *, split: str) -> tuple[list[str], list[ImageJob]]:
    """The classes (sorted text_c10 folder names) and one checked job per captioned image."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    text, jpg = root / "text_c10", root / "jpg"
    for folder in (text, jpg):
        if not folder.is_dir():
            raise DataError(f"{folder}: folder missing (--root must hold jpg/ and text_c10/)")
    known = sorted(d.name for d in text.iterdir() if d.is_dir() and not d.name.startswith("."))
    if split == "all":
        classes = known
    else:
        classes = sorted(set(read_class_list(root / SPLIT_FILES[split], set(known))))
    if not classes:
        raise DataError(f"{text}: no class folders")

    jobs = []
    for class_id, class_name in enumerate(classes):
        captions = sorted(p for p in (text / class_name).iterdir()
                          if p.suffix.lower() == ".txt" and not p.name.startswith("."))
        if not captions:
            raise DataError(f"{text / class_name}: no caption files")
        for caption_file in captions:
            path = jpg / f"{caption_file.stem}.jpg"
            if not path.is_file():
                raise DataError(f"{path}: image missing (captioned by {caption_file})")
            jobs.append(ImageJob(path=path, captions=read_captions(caption_file),
                                 class_id=class_id, name=f"{class_name}/{caption_file.stem}"))
    return classes, jobs
