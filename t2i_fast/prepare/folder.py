"""A user's own captioned images: every image beside a same-named .txt file of captions,
one per line; the class is the folder holding the image."""

from __future__ import annotations

import os
from pathlib import Path

from t2i_fast.data.alphabet import DEFAULT_DOC_LENGTH
from t2i_fast.data.writer import DatasetWriter
from t2i_fast.errors import DataError
from t2i_fast.prepare.captions import read_captions
from t2i_fast.prepare.files import MAX_IMAGE_BYTES, inside, open_regular
from t2i_fast.prepare.images import IMAGE_EXTENSIONS, ImageJob, write_images


def make_folder(*, root: str | Path, out: str | Path, image_size: int = 76,
                encoding: str = "raw", doc_length: int = DEFAULT_DOC_LENGTH,
                overwrite: bool = False, workers: int = 1) -> int:
    """Write every captioned image under ``root``; returns how many."""
    root = Path(root)
    classes, jobs = scan_folder(root)
    writer = DatasetWriter(out, image_size=image_size, classes=classes, source="folder",
                           split="all", encoding=encoding, doc_length=doc_length,
                           overwrite=overwrite)
    with writer:
        write_images(writer, jobs, workers=workers, label=f"folder {root.name or root}")
    return len(jobs)


def scan_folder(root: Path) -> tuple[list[str], list[ImageJob]]:
    """Classes are folder paths relative to ``root`` ('dogs', 'dogs/puppies'), so that two
    sub-folders of the same name stay apart; images directly in ``root`` take its name. Only
    regular files inside ``root`` are read: links out of it and special files are refused."""
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    found = []  # (class name, image path, caption path)
    for dirpath, dirnames, filenames in os.walk(root):
        # Hidden entries are editor, OS or our own temporary files (e.g. macOS's '._x.jpg').
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        folder = Path(dirpath)
        for name in dirnames:  # os.walk does not follow links to folders: refuse those out
            inside(root, folder / name)
        rel = folder.relative_to(root).as_posix()
        class_name = root.resolve().name if rel == "." else rel
        visible = sorted(f for f in filenames if not f.startswith("."))
        # A folder named like a caption file is named as what it is, not as a missing caption.
        texts = {Path(f).stem: f for f in [*visible, *dirnames]
                 if Path(f).suffix.lower() == ".txt"}
        for name in visible:
            if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            stem = Path(name).stem
            if stem not in texts:
                raise DataError(f"{folder / name}: no caption file (expected "
                                f"{folder / stem}.txt beside it)")
            found.append((class_name, folder / name, folder / texts[stem]))
    if not found:
        raise DataError(f"{root}: no images found (looked for "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))})")

    classes = sorted({class_name for class_name, _, _ in found})
    class_ids = {name: i for i, name in enumerate(classes)}
    jobs = []
    for class_name, path, text in found:
        inside(root, text)
        inside(root, path)
        captions = read_captions(text)
        open_regular(path, limit=MAX_IMAGE_BYTES, what="image").close()  # before writing
        jobs.append(ImageJob(path=path, captions=captions, class_id=class_ids[class_name],
                             name=path.relative_to(root).as_posix()))
    return classes, jobs
