"""Training on several processes with torch.distributed: under ``torchrun`` each process
(rank) trains on its share of every global batch, its networks wrapped in PyTorch's
DistributedDataParallel (DDP), which averages their gradients across ranks.

A run's schedule does not depend on how many processes train it: ``--batch-size`` is the
global batch, rank r of w takes the global batch's samples r, r + w, r + 2w, ... (the
loader's sharding of each epoch's order does exactly that), every rank draws the global
batch's noise and keeps its rows, and GAN-INT mixes embeddings across the whole global batch.
docs/distributed.md says what that makes exact, and what per-GPU BatchNorm changes.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import inspect
import os
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

# torch.distributed.nn.functional's collectives take ``group=group.WORLD`` as a default,
# bound when it is first imported (by torch._dynamo, or DDP's first use of it). Imported
# after the default group exists, those defaults keep the group alive past
# destroy_process_group to interpreter exit, and a gloo worker thread that lets go of a
# finished collective's tensor there must take the GIL of an interpreter being torn down:
# the process aborts ("terminate called without an active exception"). Imported here,
# before any group, they hold None.
import torch.distributed.nn.functional  # noqa: F401
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from t2i_fast.config import resolve_device
from t2i_fast.errors import T2IError

# What rank 0 does while the others wait (making the built-in dataset, pretraining the text
# encoder) can outlast a collective's deadline (NCCL's is 10 minutes): they wait on a gloo
# group of their own with this one.
PATIENCE = datetime.timedelta(hours=24)
# torch 2.13 renamed DDP's broadcast_buffers (deprecated there) to forward_sync_buffers.
_DDP_OPTIONS = inspect.signature(DistributedDataParallel).parameters
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_OPTIONS
                   else {"broadcast_buffers": False})

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes: ``rank`` of ``size``, training on
    ``device``. ``group`` (a gloo group for long waits) is None and ``group_name`` empty
    for a process on its own, without torch.distributed. ``group_name`` names the default
    group for the collectives inside compiled code: by name, since a graph that captured
    the group itself would keep it alive past destroy_process_group (see letting_go)."""

    device: torch.device
    rank: int = 0
    size: int = 1
    group: Any = field(default=None, compare=False, repr=False)
    group_name: str = field(default="", compare=False, repr=False)

    @property
    def distributed(self) -> bool:
        # Read inside compiled code: by the name, for the group would be captured.
        return bool(self.group_name)

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes (run folder, checkpoints, metrics, pictures)."""
        return self.rank == 0

    def split_batch(self, batch_size: int) -> int:
        """Each rank's share of the global batch."""
        if batch_size % self.size:
            raise T2IError(f"--batch-size {batch_size} does not split evenly over {self.size} "
                           "processes (it is the global batch)")
        if batch_size // self.size < 2:
            raise T2IError(f"--batch-size {batch_size} leaves {batch_size // self.size} sample "
                           f"per process of {self.size}: BatchNorm needs at least 2")
        return batch_size // self.size

    def main_first(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0 alone, its result given to every rank; the others wait. A
        T2IError there is raised on every rank with the same message."""
        result, error, failure = None, None, None
        if self.main:
            try:
                result = fn()
            except BaseException as exc:  # the others must not wait forever
                failure = exc
                error = str(exc) if isinstance(exc, T2IError) else \
                    f"process 0 failed ({type(exc).__name__})"
        if self.distributed:
            box = [(result, error)]
            dist.broadcast_object_list(box, src=0, group=self.group)
            result, error = box[0]
        if failure is not None:
            raise failure
        if error is not None:
            raise T2IError(error)
        return result

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` under DDP, or as it is for a single process.

        Its forward must be the only one of its parameters per backward: DDP's gradient
        hooks are armed by the forward. Buffers are not broadcast at each forward: that
        would keep per-GPU BatchNorm statistics equal to rank 0's but writes them in place,
        which breaks a captured CUDA graph and, when BatchNorm saved them for a backward
        still to come, autograd's version check."""
        if not self.distributed:
            return module
        cuda = self.device.type == "cuda"
        # For CUDA graphs, DDP is made on a side stream (torch.cuda's notes on graphs).
        side = torch.cuda.Stream(self.device) if cuda else None
        with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
            wrapped = DistributedDataParallel(
                module, device_ids=[self.device.index] if cuda else None, **_NO_BUFFER_SYNC)
        if cuda:
            torch.cuda.current_stream(self.device).wait_stream(side)
        return wrapped

    def largest(self, value: int) -> int:
        """The largest of every rank's ``value``: a meeting of the processes on the gloo
        group, which does not wait for the GPU. Every rank must call it."""
        if not self.distributed:
            return value
        box = torch.tensor([value])
        dist.all_reduce(box, op=dist.ReduceOp.MAX, group=self.group)
        return int(box)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch's tensor."""
        return x[self.rank::self.size] if self.size > 1 else x

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The global batch's tensor from each rank's rows (no gradient flows back)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.stack(parts, dim=1).flatten(0, 1)  # row j·size + r: rank r's row j

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the ranks, with a gradient: the backward sums each rank's
        gradient of the result into every rank's ``x``. Every rank must call it."""
        return x if self.size == 1 else _sum_over_ranks(x, self.group_name)

    def mean(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each 0-d tensor averaged over the ranks: the global batch's value for batch
        means (every rank has as many samples). Every rank must call it."""
        if self.size == 1:
            return values
        names = list(values)
        stacked = torch.stack([values[k].float() for k in names])
        dist.all_reduce(stacked)
        return dict(zip(names, (stacked / self.size).unbind(), strict=True))


def single(device: str) -> World:
    return World(device=resolve_device(device))


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[World]:
    """The world of this process: torchrun's (RANK, WORLD_SIZE and LOCAL_RANK in the
    environment; a process group is started here, NCCL between GPUs or gloo on the CPU, and
    destroyed on the way out), one the caller started, or a single process."""
    if dist.is_available() and dist.is_initialized():
        yield _world(device, int(os.environ.get("LOCAL_RANK", 0)))
        return
    if not {"RANK", "WORLD_SIZE"} <= os.environ.keys():
        yield single(device)
        return
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = resolve_device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo",
                            device_id=torch.device("cuda", local_rank) if cuda else None)
    try:
        yield _world(device, local_rank)
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def letting_go(world: World) -> Iterator[None]:
    """Around the training of this process of ``world``: on the way out, by return or by
    exception, what it made is freed (the locals of a propagating exception's frames, and
    of the exceptions chained to it, cleared; then the cycles among the models collected),
    so that no DDP module or group is left holding the process groups. Then
    destroy_process_group ends their threads while the interpreter runs; a group alive at
    interpreter exit aborts the process (see the import of torch.distributed.nn.functional
    above). The tracebacks keep their lines, not their frames' variables."""
    if not world.distributed:
        yield
        return
    try:
        yield
    except BaseException as exc:
        seen: set[int] = set()
        chained: BaseException | None = exc
        while chained is not None and id(chained) not in seen:
            seen.add(id(chained))
            traceback.clear_frames(chained.__traceback__)
            chained = chained.__cause__ or chained.__context__
        raise
    finally:
        gc.collect()


def _world(device: str, local_rank: int) -> World:
    resolved = resolve_device(device)
    size = dist.get_world_size()
    if resolved.type == "cuda":
        if resolved.index is not None and resolved.index != local_rank and size > 1:
            raise T2IError(f"--device {device}: under torchrun each process trains on its own "
                           "GPU, cuda:LOCAL_RANK (pass --device cuda or auto)")
        resolved = torch.device("cuda", local_rank)
    return World(device=resolved, rank=dist.get_rank(), size=size,
                 group=dist.new_group(backend="gloo", timeout=PATIENCE),
                 group_name=dist.group.WORLD.group_name)


def sync_batchnorm(module: nn.Module, world: World) -> nn.Module:
    """``module`` with BatchNorm over ``world``'s global batch: torch's SyncBatchNorm on a
    GPU; on the CPU, where SyncBatchNorm refuses to run (its statistics kernels are
    GPU-only), the same computation over the functional collectives' all_reduce
    (differentiable, and traced by torch.compile)."""
    if world.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, _BatchNorm):
        synced = _CPUSyncBatchNorm(module.num_features, module.eps, module.momentum)
        synced.group_name = world.group_name
        synced.weight, synced.bias = module.weight, module.bias
        synced.running_mean, synced.running_var = module.running_mean, module.running_var
        synced.num_batches_tracked = module.num_batches_tracked
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        setattr(module, name, sync_batchnorm(child, world))
    return module


class _CPUSyncBatchNorm(_BatchNorm):
    """Affine BatchNorm (1d or 2d) with the statistics of every rank's batch together, as
    SyncBatchNorm computes them: mean, then the mean squared deviation from it (two passes,
    no E[x²] - E[x]² cancellation), each summed over the ranks; the backward all-reduces the
    gradients of those sums, so each rank's loss reaches every rank's inputs, over the group
    named ``group_name``."""

    group_name: str

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected 2D or more input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            return nn.functional.batch_norm(x, self.running_mean, self.running_var,
                                            self.weight, self.bias, False, 0.0, self.eps)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.numel() // x.shape[1] * dist.get_world_size()
        mean = _sum_over_ranks(x.sum(dims), self.group_name) / count
        centred = x - mean.view(shape)
        var = _sum_over_ranks(centred.square().sum(dims), self.group_name) / count
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else \
                1 / self.num_batches_tracked.item()
            # The running variance is the unbiased one, as BatchNorm keeps it.
            self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            self.running_var.mul_(1 - momentum).add_(var.detach() * (count / (count - 1)),
                                                     alpha=momentum)
        scale = torch.rsqrt(var + self.eps) * self.weight
        return centred * scale.view(shape) + self.bias.view(shape)


def _sum_over_ranks(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return funcol.all_reduce(x, "sum", group_name)
