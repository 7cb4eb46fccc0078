"""``t2i-fast prepare``: turning sources (the synthetic shapes, CUB-200-2011, Oxford-102
flowers, MS-COCO captions, a folder of captioned images) into datasets.

Every source checks all it can (file lists, caption files) before the first record is written,
then feeds a ``DatasetWriter``, which only gives the dataset its name once it is complete.
"""

from __future__ import annotations

import sys

import click


def progress(length: int, label: str):
    """A progress bar on stderr, so that stdout stays free for a command's result."""
    return click.progressbar(length=length, label=label, file=sys.stderr)
