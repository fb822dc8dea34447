"""Multi-process training helpers: process group from the environment, a batch sampler whose
global batches do not depend on the number of processes, and row gathers.

``torchrun --nproc_per_node=N`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``;
:func:`setup` reads them and starts a ``gloo`` (CPU) or ``nccl`` (CUDA) process group. Without
them everything degrades to a single process and no ``torch.distributed`` call is made.

Why a custom sampler rather than ``DistributedSampler``: ``DistributedSampler`` deals samples
out round-robin from one permutation, so the set of samples in a step depends on the number of
processes and a 2-process run cannot be compared with a 1-process run. :class:`GlobalBatchSampler`
first cuts the seeded permutation into *global* batches of ``batch_size`` samples (exactly the
batches of a single-process run), then gives each rank a contiguous slice of every global batch
(``batch_size / world_size`` samples). With each rank's loss multiplied by
:meth:`GlobalBatchSampler.loss_scales` (``world_size * n_rank / n_global``), DDP's gradient
average equals the gradient of the global batch's mean loss, for every loss that is a mean of
per-sample terms.

Example::

    >>> sampler = GlobalBatchSampler(10, batch_size=4, seed=0, rank=1, world_size=2)
    >>> sampler.set_epoch(0)
    >>> [len(b) for b in sampler]
    [2, 2, 1]
    >>> sampler.loss_scales()
    [1.0, 1.0, 1.0]
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from umilayers._validation import InvalidArgument
from umilayers.train.checkpoint import derive_seed

__all__ = [
    "DistContext",
    "setup",
    "teardown",
    "process_group",
    "GlobalBatchSampler",
    "shard_rows",
    "all_gather_rows",
    "all_reduce_sum",
]


@dataclass
class DistContext:
    """Where this process runs: its rank, the world size and its device.

    Example::

        >>> ctx = DistContext()
        >>> ctx.distributed, ctx.is_main, ctx.device
        (False, True, device(type='cpu'))
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``."""
    if name in (None, "", "auto"):
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidArgument("device", f"expected auto, cpu, cuda, cuda:N, mps, ... (a torch device), "
                                        f"got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgument("device", f"{name!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def setup(device: str = "auto") -> DistContext:
    """Build the :class:`DistContext` from ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; start the
    process group when the world has more than one process and none is running yet."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(device=resolve_device(device))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    resolved = resolve_device(device, local_rank)
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
        owns = True
    return DistContext(world_size, rank, local_rank, resolved, dist.get_backend(), owns)


def teardown(ctx: DistContext) -> None:
    """Destroy the process group if :func:`setup` created it.

    Every rank first waits at a barrier: a rank that destroys the group while another still
    has gloo work in flight makes that rank abort at exit ("terminate called without an active
    exception", SIGABRT), after it has finished and written everything.
    """
    if ctx.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[DistContext]:
    """Hold one process group across several ``fit``/``evaluate`` calls under ``torchrun``.

    Each call would otherwise create and destroy its own group, and a second group cannot be
    created in the same ``torchrun`` launch (gloo's rendezvous store is gone). A no-op in a
    single process.
    """
    ctx = setup(device)
    try:
        yield ctx
    finally:
        teardown(ctx)


class GlobalBatchSampler:
    """Batches of one rank, cut from the same global batches for any world size.

    The permutation of ``range(num_samples)`` is drawn from a generator seeded by
    ``(seed, tag, epoch)`` only, so an epoch's batches are the same after a resume. A rank
    whose slice of a (short, last) global batch is empty gets one placeholder sample and a
    loss scale of 0, so that every rank runs the same number of steps.

    Args:
        num_samples: samples in the dataset.
        batch_size: the global batch size.
        seed: run seed.
        rank: this process's rank.
        world_size: number of processes.
        shuffle: draw a permutation (training) or keep the order.
        tag: anything hashable that tells apart samplers of one run (e.g. the stage).

    Example::

        >>> one = GlobalBatchSampler(6, batch_size=4, seed=0)
        >>> halves = [GlobalBatchSampler(6, batch_size=4, seed=0, rank=r, world_size=2) for r in (0, 1)]
        >>> for s in (one, *halves):
        ...     s.set_epoch(0)
        >>> [a + b for a, b in zip(*halves)] == list(one)  # the ranks' slices make the global batches
        True
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        tag: Any = (),
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples: expected a positive count, got {num_samples}")
        if batch_size <= 0:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.tag = tag
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[np.ndarray]:
        """The epoch's global batches (the same for every rank and world size)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.tag, self.epoch))
            order = torch.randperm(self.num_samples, generator=generator).numpy()
        else:
            order = np.arange(self.num_samples)
        return [order[i : i + self.batch_size] for i in range(0, self.num_samples, self.batch_size)]

    def _local(self, batch: np.ndarray) -> np.ndarray:
        return np.array_split(batch, self.world_size)[self.rank]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            local = self._local(batch)
            yield (local if len(local) else batch[:1]).tolist()

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def loss_scales(self) -> list[float]:
        """Per step: ``world_size * n_rank / n_global`` (0 for a placeholder batch)."""
        return [
            self.world_size * len(self._local(batch)) / len(batch) for batch in self.global_batches()
        ]


def shard_rows(num_rows: int, rank: int, world_size: int) -> range:
    """The contiguous block of rows that ``rank`` evaluates (blocks in rank order cover all)."""
    sizes = [num_rows // world_size + (1 if r < num_rows % world_size else 0) for r in range(world_size)]
    start = sum(sizes[:rank])
    return range(start, start + sizes[rank])


def all_gather_rows(x: Tensor, ctx: DistContext) -> Tensor:
    """Concatenate every rank's ``x`` along dim 0 in rank order (sizes may differ per rank).

    Shape:
        - x: ``(N_rank, *)``; output ``(sum of N_rank, *)`` on ``x``'s device.
    """
    if not ctx.distributed:
        return x
    comm = ctx.device if ctx.backend == "nccl" else torch.device("cpu")
    is_bool = x.dtype == torch.bool
    payload = (x.to(torch.uint8) if is_bool else x).to(comm).contiguous()
    count = torch.tensor([payload.shape[0]], device=comm, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(ctx.world_size)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = payload.new_zeros((max(sizes),) + tuple(payload.shape[1:]))
    padded[: payload.shape[0]] = payload
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    out = torch.cat([part[:size] for part, size in zip(parts, sizes)]).to(x.device)
    return out.bool() if is_bool else out


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    """Sum a few floats over ranks (in float64)."""
    if not ctx.distributed:
        return list(values)
    comm = ctx.device if ctx.backend == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=comm)
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()
