"""Datasets: the LMDB format, random access, and the C++ batch loader.

``Dataset`` needs lmdb and ``Loader`` the C++ extension; they load on first use, so that the
modules without native code (the alphabet, the sampling plan) import where neither is built.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from t2i_fast.data.dataset import Dataset, Sample
    from t2i_fast.data.loader import Batch, Loader

_HOMES = {"Dataset": "dataset", "Sample": "dataset", "Batch": "loader", "Loader": "loader"}

__all__ = ["Batch", "Dataset", "Loader", "Sample"]


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
