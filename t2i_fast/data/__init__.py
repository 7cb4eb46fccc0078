"""Datasets: the LMDB format, random access, and the C++ batch loader."""

from t2i_fast.data.dataset import Dataset, Sample
from t2i_fast.data.loader import Batch, Loader

__all__ = ["Batch", "Dataset", "Loader", "Sample"]
