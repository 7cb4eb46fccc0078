"""``Loader``: batches from a dataset, filled by the C++ core's threads into reused slots.

A batch's tensors are views of one slot. The slot goes back to the ring only when every tensor
(and view) of that batch is gone, so a batch a caller keeps stays valid; when the caller keeps
more batches than the ring holds, the ring grows by one slot (allocated once, then reused).
"""

from __future__ import annotations

import collections
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from t2i_fast.data.alphabet import onehot
from t2i_fast.data.format import close_env, open_env, read_metadata
from t2i_fast.errors import ConfigError, DataError
from t2i_fast.native import _C

_ELEM_BYTES = {torch.uint8: 1, torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
LAYOUTS = ("nhwc", "nchw")
CAPTION_FORMATS = ("indices", "onehot", "ids")


def pixel_lut(dtype: torch.dtype) -> torch.Tensor:
    """The 256 output values of each stored byte: itself for uint8, else x / 127.5 - 1."""
    if dtype == torch.uint8:
        return torch.arange(256, dtype=torch.uint8)
    return (torch.arange(256, dtype=torch.float32) / 127.5 - 1).to(dtype)


def normalise(pixels: torch.Tensor, lut: torch.Tensor, layout: str) -> torch.Tensor:
    """uint8 images [B, 3, S, S] → ``lut``'s dtype through the table, keeping the memory
    layout (the gather runs over the contiguous storage order)."""
    if layout == "nhwc":
        return lut[pixels.permute(0, 2, 3, 1).long()].permute(0, 3, 1, 2)
    return lut[pixels.long()]


def default_size(stored: int) -> int:
    """Reed's 64 from 76: the stored image is 76/64 of the training crop."""
    return min(stored, round(stored * 64 / 76))


@dataclass
class Batch:
    """One batch. Images are indexed [B, 3, S, S] in either memory layout (``nhwc`` is
    PyTorch's channels_last); captions are one-hot [B, k, 70, L] in the images' dtype (the
    default: measured faster end to end than expanding indices in the consumer, see
    docs/performance.md), uint8 character indices [B, k, L], or (``caption_format="ids"``)
    int64 global caption ids [B, k] into the dataset's captions in record order, the rows of
    a table of precomputed embeddings (``Loader.num_captions`` rows)."""

    images: torch.Tensor
    wrong_images: torch.Tensor  # a real image of another class for each sample (GAN-CLS)
    captions: torch.Tensor
    caption_ids: torch.Tensor  # int64 [B, k]: which of the record's captions (its own index)
    class_ids: torch.Tensor  # int64 [B]
    wrong_class_ids: torch.Tensor  # int64 [B]
    indices: torch.Tensor  # int64 [B]: record indices
    wrong_indices: torch.Tensor  # int64 [B]
    epoch: int
    batch: int

    @property
    def keys(self) -> list[str]:
        """The records' LMDB keys."""
        return [f"{i:08d}" for i in self.indices.tolist()]

    def __len__(self) -> int:
        return len(self.indices)


_TENSOR_FIELDS = tuple(f.name for f in fields(Batch) if f.name not in ("epoch", "batch"))


class Loader:
    """Iterating yields one epoch of batches: epoch ``loader.epoch`` from batch
    ``loader.position``; after the last batch the epoch advances. ``set_epoch`` chooses an
    epoch (and a batch to resume from); ``state_dict``/``load_state_dict`` checkpoint it.

    Every choice (order, crops, flips, captions, mismatched images) is fixed by ``seed`` and
    the epoch, whatever ``num_threads``; ``rank``/``world_size`` shard each epoch disjointly.
    With ``device`` set, batches arrive there: copied from pinned slots on a side stream one
    batch ahead, converted to ``dtype`` and one-hot on the device.
    """

    def __init__(self, path: str | Path, *, batch_size: int, seed: int = 0, epoch: int = 0,
                 size: int | None = None, captions_per_sample: int = 4,
                 caption_format: str = "onehot", dtype: torch.dtype = torch.uint8,
                 layout: str = "nhwc", random_crop: bool = True, flip: bool = True,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True,
                 num_threads: int | None = None, depth: int | None = None,
                 device: str | torch.device | None = None, pin_memory: bool | None = None,
                 verify: bool = True):
        if dtype not in _ELEM_BYTES:
            raise ConfigError(f"dtype must be one of {list(_ELEM_BYTES)}, got {dtype}")
        if layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if caption_format not in CAPTION_FORMATS:
            raise ConfigError(f"caption_format must be one of {CAPTION_FORMATS}, "
                             f"got {caption_format!r}")
        if seed < 0:
            raise ConfigError(f"seed must be non-negative, got {seed}")
        self.path = Path(path)
        env = open_env(self.path)
        try:
            self.meta = read_metadata(env, self.path)
        finally:
            close_env(env)
        stored = self.meta["image_size"]
        self.size = default_size(min(stored)) if size is None else size
        self.batch_size = batch_size
        self.captions_per_sample = captions_per_sample
        self.caption_format = caption_format
        self.dtype = dtype
        self.layout = layout
        self.device = torch.device(device) if device is not None else None
        if self.device is not None and self.device.type == "cpu":
            self.device = None
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        self.pin_memory = pin_memory
        # On a device the slots hold the compact form (uint8 pixels, caption indices), 4x to
        # 280x fewer bytes to copy; the conversion runs there.
        host_dtype = torch.uint8 if self.device is not None else dtype
        host_onehot = caption_format == "onehot" and self.device is None
        host_captions = "ids" if caption_format == "ids" else "indices"
        self._host_dtype = host_dtype
        elem = _ELEM_BYTES[host_dtype]
        one = torch.ones(1, dtype=host_dtype).view(_BITS[elem]).numpy().tobytes()
        lut = pixel_lut(host_dtype).view(_BITS[elem]).numpy().tobytes()
        num_threads = num_threads or min(os.cpu_count() or 1, 8)
        try:
            height, width = stored
            self._core = _C.Loader(
                str(self.path), count=self.meta["count"], num_classes=len(self.meta["classes"]),
                image_height=height, image_width=width, doc_length=self.meta["doc_length"],
                encoding=self.meta["encoding"], batch_size=batch_size, size=self.size,
                captions_per_sample=captions_per_sample,
                caption_format="onehot" if host_onehot else host_captions, elem_bytes=elem,
                lut=lut, one=one, nhwc=layout == "nhwc", random_crop=random_crop, flip=flip,
                seed=seed, rank=rank, world_size=world_size, drop_last=drop_last,
                num_threads=num_threads, verify=verify,
            )
        except ValueError as exc:  # the core's argument checks
            raise ConfigError(f"{self.path}: {exc}") from exc
        self.num_threads = num_threads
        # Global caption ids run over [0, num_captions): a caption's id is the number of
        # captions in the records before its own plus its index in the record.
        self.num_captions = self._core.num_captions
        self._layout = self._core.layout
        self._fields = self._field_specs()
        self._buffers: list[torch.Tensor] = []
        for _ in range(depth or max(3, num_threads + 2)):
            self._add_slot()
        self.epoch = epoch
        self.position = 0
        self._copy_stream = None
        if self.device is not None:
            self._device_lut = pixel_lut(dtype).to(self.device)
            if self.device.type == "cuda":
                self._copy_stream = torch.cuda.Stream(self.device)

    # -- the ring ---------------------------------------------------------------------------
    def _add_slot(self) -> None:
        buffer = torch.empty(self._layout["bytes"], dtype=torch.uint8,
                             pin_memory=self.pin_memory)
        self._buffers.append(buffer)
        self._core.add_slot(buffer.numpy())

    @property
    def num_slots(self) -> int:
        return len(self._buffers)

    def _host_batch(self, lease: _C.Lease, batch: int, n: int) -> Batch:
        # numpy views cost a fraction of torch views; each field's array keeps the lease (so
        # the slot) alive until the batch's last tensor goes.
        flat = np.frombuffer(lease, dtype=np.uint8)
        views = {}
        for name, (offset, nbytes, np_dtype, shape, torch_dtype) in self._fields.items():
            array = flat[offset: offset + nbytes].view(np_dtype).reshape(shape)[:n]
            tensor = torch.from_numpy(array)
            views[name] = tensor if torch_dtype is None else tensor.view(torch_dtype)
        if self.layout == "nhwc":
            views["images"] = views["images"].permute(0, 3, 1, 2)
            views["wrong_images"] = views["wrong_images"].permute(0, 3, 1, 2)
        return Batch(**views, epoch=self.epoch, batch=batch)

    def _field_specs(self) -> dict:
        """name → (offset, bytes, numpy dtype, shape, torch dtype to view as or None) of each
        Batch tensor, from the core's slot layout (``_C.slot_layout``, its one definition)."""
        pixel = self._host_dtype
        pixel_np = np.dtype(f"int{8 * _ELEM_BYTES[pixel]}") if pixel != torch.uint8 else np.uint8
        dtypes = {"pixel": (pixel_np, None if pixel == torch.uint8 else pixel),
                  "uint8": (np.uint8, None), "int64": (np.int64, None)}
        specs = {}
        for name, offset, dtype, shape in self._layout["fields"]:
            if name in _TENSOR_FIELDS:  # the rest (the one-hot shadow) is the core's own
                np_dtype, view = dtypes[dtype]
                nbytes = math.prod(shape) * np.dtype(np_dtype).itemsize
                specs[name] = (offset, nbytes, np_dtype, shape, view)
        return specs

    def _host_batches(self) -> Iterator[Batch]:
        self._core.start_epoch(self.epoch, self.position)
        while True:
            if self._core.num_leased >= len(self._buffers):
                self._add_slot()  # the caller keeps every slot's batch: grow the ring
            got = self._core.next()
            if got is None:
                return
            yield self._host_batch(*got)

    # -- the device -------------------------------------------------------------------------
    def _convert(self, host: Batch) -> Batch:
        """Copies a host batch to the device (on the current stream) and converts it there."""
        moved = {name: getattr(host, name).to(self.device, non_blocking=True)
                 for name in _TENSOR_FIELDS}
        if self.dtype != torch.uint8:
            for name in ("images", "wrong_images"):
                moved[name] = normalise(moved[name], self._device_lut, self.layout)
        if self.caption_format == "onehot":
            moved["captions"] = onehot(moved["captions"], self.dtype)
        return replace(host, **moved)

    def _device_batches(self) -> Iterator[Batch]:
        if self._copy_stream is None:
            yield from map(self._convert, self._host_batches())
            return
        # Host batches (their slots) stay held until their copy has finished.
        in_copy: collections.deque = collections.deque()
        ahead = None
        for host in self._host_batches():
            with torch.cuda.stream(self._copy_stream):
                moved = self._convert(host)
                done = torch.cuda.Event()
                done.record(self._copy_stream)
            in_copy.append((done, host))
            if ahead is not None:
                yield self._handover(*ahead)
            ahead = (moved, done)
            while in_copy and in_copy[0][0].query():
                in_copy.popleft()
        if ahead is not None:
            yield self._handover(*ahead)

    def _handover(self, moved: Batch, done) -> Batch:
        current = torch.cuda.current_stream(self.device)
        current.wait_event(done)
        for name in _TENSOR_FIELDS:
            getattr(moved, name).record_stream(current)
        return moved

    # -- iteration and state ----------------------------------------------------------------
    def __len__(self) -> int:
        return self._core.num_batches

    def __iter__(self) -> Iterator[Batch]:
        if self._core is None:
            raise DataError(f"{self.path}: the loader is closed")
        batches = self._host_batches() if self.device is None else self._device_batches()
        for batch in batches:
            self.position = batch.batch + 1
            yield batch
        self.epoch += 1
        self.position = 0

    def set_epoch(self, epoch: int, batch: int = 0) -> None:
        if not 0 <= batch <= len(self):
            raise ConfigError(f"batch must be in [0, {len(self)}], got {batch}")
        self.epoch, self.position = epoch, batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(state["epoch"], state["position"])

    def close(self) -> None:
        """Stops the threads; batches still held stay valid."""
        core, self._core = self._core, None
        if core is not None:
            core.close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_core", None) is not None:
            self.close()
