"""Loader throughput: the C++ loader against a conventional PyTorch pipeline, in one run.

The conventional pipeline is what a user would assemble from stock parts: a torch Dataset that
reads each record with py-lmdb, decodes it with numpy (PIL for JPEG), crops, flips and picks
captions and a mismatched image per sample, behind a DataLoader with 2 workers (pinned
memory where CUDA is available). Both produce the same batch: 64 images 64x64 uint8, their
mismatched images, 4 captions each as character indices, class ids and record indices.

    python scripts/bench_loader.py [--data shapes.lmdb] [--epochs 5]

Correctness is checked before timing (the C++ batches equal the reference loader's bit for
bit). The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lmdb
import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from t2i_fast.data import Dataset, Loader
from t2i_fast.data.format import Record, record_key
from t2i_fast.data.loader import onehot
from t2i_fast.data.reference import ReferenceLoader
from t2i_fast.prepare.shapes import make_shapes
from t2i_fast.provenance import commit

BATCH, K, SIZE = 64, 4, 64


class ConventionalDataset(TorchDataset):
    """Per-sample decoding with py-lmdb and numpy, as a stock pipeline does it."""

    def __init__(self, path: Path, size: int, k: int):
        self.path, self.size, self.k = str(path), size, k
        with Dataset(path) as ds:
            self.class_ids = np.array([ds.record(i).class_id for i in range(len(ds))])
        self.env = None  # opened in each worker: LMDB handles do not survive fork

    def __len__(self) -> int:
        return len(self.class_ids)

    def _image(self, txn, index: int, rng: np.random.Generator) -> np.ndarray:
        record = Record.unpack(txn.get(record_key(index)), where=f"record {index}")
        image = record.image(where=f"record {index}")
        y, x = rng.integers(0, image.shape[0] - self.size + 1, 2)
        image = image[y: y + self.size, x: x + self.size]
        if rng.random() < 0.5:
            image = image[:, ::-1]
        return np.ascontiguousarray(image.transpose(2, 0, 1)), record

    def __getitem__(self, index: int):
        if self.env is None:
            self.env = lmdb.open(self.path, readonly=True, lock=False, readahead=False)
        rng = np.random.default_rng()
        with self.env.begin(buffers=True) as txn:
            image, record = self._image(txn, index, rng)
            others = np.flatnonzero(self.class_ids != record.class_id)
            wrong_index = int(others[rng.integers(len(others))])
            wrong, _ = self._image(txn, wrong_index, rng)
        ids = rng.choice(len(record.captions), self.k, replace=len(record.captions) < self.k)
        return {"images": image, "wrong_images": wrong, "captions": record.char_indices[ids],
                "class_ids": record.class_id, "indices": index}


def timed_epochs(batches, epochs: int) -> tuple[float, list[float]]:
    """(cold first-epoch rate, steady rates of the following epochs) in samples/s."""
    rates = []
    for _ in range(epochs + 1):
        n, start = 0, time.perf_counter()
        for batch in batches():
            n += len(batch["indices"] if isinstance(batch, dict) else batch)
        rates.append(n / (time.perf_counter() - start))
    return rates[0], rates[1:]


def cpp_rates(path: Path, epochs: int, **options) -> tuple[float, float]:
    with Loader(path, batch_size=BATCH, captions_per_sample=K, size=SIZE, **options) as loader:
        cold, steady = timed_epochs(lambda: loader, epochs)
    return cold, statistics.median(steady)


def baseline_rates(path: Path, epochs: int) -> tuple[float, float]:
    loader = DataLoader(ConventionalDataset(path, SIZE, K), batch_size=BATCH, shuffle=True,
                        num_workers=2, pin_memory=torch.cuda.is_available(),
                        persistent_workers=True, drop_last=True)
    cold, steady = timed_epochs(lambda: loader, epochs)
    return cold, statistics.median(steady)


def caption_end_to_end(path: Path, epochs: int) -> dict:
    """Captions reach a model as float one-hot [B, k, 70, L]: made by the loader's threads,
    or sent as indices and expanded by torch in the consumer (a scatter into zeros)."""

    def expand(indices: torch.Tensor) -> torch.Tensor:
        return onehot(indices, torch.float32)

    options = dict(batch_size=BATCH, captions_per_sample=K, size=SIZE, dtype=torch.float32)
    with Loader(path, caption_format="onehot", **options) as loader_onehot, \
         Loader(path, caption_format="indices", **options) as loader_indices:
        assert torch.equal(next(iter(loader_onehot)).captions,
                           expand(next(iter(loader_indices)).captions))

        def expanded():
            for batch in loader_indices:
                batch.captions = expand(batch.captions)
                yield batch

        from_loader = statistics.median(timed_epochs(lambda: loader_onehot, epochs)[1])
        from_torch = statistics.median(timed_epochs(expanded, epochs)[1])
    return {"onehot_from_loader": from_loader, "indices_then_torch": from_torch,
            "faster": "indices" if from_torch >= from_loader else "onehot"}


def check_correctness(path: Path) -> None:
    reference = next(ReferenceLoader(path, batch_size=BATCH, captions_per_sample=K,
                                     size=SIZE).epoch(0))
    with Loader(path, batch_size=BATCH, captions_per_sample=K, size=SIZE) as loader:
        batch = next(iter(loader))
        assert np.array_equal(batch.images.permute(0, 2, 3, 1).numpy(), reference["images"])
        assert np.array_equal(batch.wrong_images.permute(0, 2, 3, 1).numpy(),
                              reference["wrong_images"])
        assert np.array_equal(batch.captions.numpy(), reference["captions"])  # one-hot


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores, {cpu}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="raw shapes dataset (made if absent)")
    parser.add_argument("--jpeg-data", type=Path, help="JPEG shapes dataset (made if absent)")
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs after a cold one")
    parser.add_argument("--n", type=int, default=10000, help="images when making a dataset")
    args = parser.parse_args()
    scratch = tempfile.TemporaryDirectory(prefix="bench_loader_")
    raw = args.data or Path(scratch.name) / "shapes.lmdb"
    jpeg = args.jpeg_data or Path(scratch.name) / "shapes_jpeg.lmdb"
    for path, encoding in ((raw, "raw"), (jpeg, "jpeg")):
        if not path.exists():
            print(f"making {path} ({args.n} images, {encoding})", file=sys.stderr)
            make_shapes(out=path, n=args.n, encoding=encoding)

    check_correctness(raw)
    print("correctness: C++ batches equal the reference loader's bit for bit", file=sys.stderr)
    results: dict = {"machine": machine(), "torch": torch.__version__, "commit": commit(),
                     "date": datetime.date.today().isoformat(), "batch_size": BATCH,
                     "captions_per_sample": K, "size": SIZE, "epochs": args.epochs}
    cold, steady = cpp_rates(raw, args.epochs)
    results["cpp_cold_samples_per_s"], results["cpp_samples_per_s"] = cold, steady
    base_cold, base = baseline_rates(raw, args.epochs)
    results["baseline_cold_samples_per_s"], results["baseline_samples_per_s"] = base_cold, base
    results["ratio"] = steady / base
    results["threads"] = {n: cpp_rates(raw, args.epochs, num_threads=n)[1]
                          for n in range(1, (os.cpu_count() or 2) + 1)}
    results["variants"] = {
        name: cpp_rates(raw, args.epochs, **options)[1] for name, options in {
            "nchw uint8": {"layout": "nchw"},
            "nhwc float32": {"dtype": torch.float32},
            "nhwc bfloat16": {"dtype": torch.bfloat16},
            "nchw float32": {"layout": "nchw", "dtype": torch.float32},
        }.items()
    }
    results["captions_end_to_end"] = caption_end_to_end(raw, args.epochs)
    results["jpeg_cold_samples_per_s"], results["jpeg_samples_per_s"] = cpp_rates(jpeg, 2)

    rows = [
        ("C++ loader, cold first epoch", results["cpp_cold_samples_per_s"]),
        ("C++ loader, steady", results["cpp_samples_per_s"]),
        ("conventional DataLoader (2 workers), steady", results["baseline_samples_per_s"]),
        *((f"C++ loader, {n} threads", r) for n, r in results["threads"].items()),
        *((f"C++ loader, {name}", r) for name, r in results["variants"].items()),
        ("float32, one-hot made by the loader",
         results["captions_end_to_end"]["onehot_from_loader"]),
        ("float32, indices expanded by torch",
         results["captions_end_to_end"]["indices_then_torch"]),
        ("C++ loader, JPEG records", results["jpeg_samples_per_s"]),
    ]
    print(f"{'pipeline (batch 64, 64x64, 4 captions)':<48}{'samples/s':>12}")
    for name, rate in rows:
        print(f"{name:<48}{rate:>12,.0f}")
    print(f"ratio C++ / conventional: {results['ratio']:.1f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
