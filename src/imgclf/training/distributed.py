"""DistributedDataParallel plumbing: who this process is, and the few collectives training needs.

One training process per device, started by ``torchrun`` (or :mod:`imgclf.steps.train_launch`,
which runs torch's own elastic launcher): each gets ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE`` in its environment and a shard of every epoch. Without those variables
(``WORLD_SIZE`` unset or 1) everything here is a no-op, so the single-process path pays
nothing and needs no process group.

The conventions, as in torchvision's reference scripts:

- ``train.batch_size`` is per process; the global batch is ``batch_size * world_size``.
- Rank 0 alone writes outputs and checkpoints; the others only compute.
- Losses and accuracies are summed over ranks before they are reported or compared, so early
  stopping takes the same decision everywhere.
- The backend is NCCL on CUDA and gloo on CPU (``imgclf train --nproc 2`` on a laptop).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
from collections.abc import Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from imgclf.errors import ConfigError

log = logging.getLogger(__name__)

# Rendezvous and collectives wait this long for a slow peer (a rank that is still loading its
# data or writing a checkpoint) before the job fails instead of hanging.
TIMEOUT = dt.timedelta(minutes=30)


@dataclasses.dataclass(frozen=True)
class Context:
    """This process's place in the job: ``world_size == 1`` means not distributed."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        """Whether there are peers to talk to."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs progress and writes files."""
        return self.rank == 0


def from_env(env: dict[str, str] | None = None) -> Context:
    """The context torchrun's variables describe; a plain process gets the default."""
    env = dict(os.environ if env is None else env)
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        # torchrun sets LOCAL_RANK; a PyTorchJob pod started without it runs one process
        local = int(env.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise ConfigError(f"WORLD_SIZE/RANK/LOCAL_RANK must be integers: {exc}") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is not within WORLD_SIZE={world}")
    return Context(rank=rank, local_rank=local, world_size=world)


def init(ctx: Context, device: torch.device) -> torch.device:
    """Join the process group (once) and return this rank's device.

    On CUDA every rank takes GPU ``LOCAL_RANK``, whatever ``train.device`` named: N processes
    on one GPU would only fight over it.
    """
    if not ctx.enabled:
        return device
    if device.type == "cuda":
        if ctx.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={ctx.local_rank} but only {torch.cuda.device_count()} GPU(s) are "
                "visible: start at most one process per GPU"
            )
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
        log.info("rank %d/%d joined the %s process group", ctx.rank, ctx.world_size, backend)
    return device


def shutdown() -> None:
    """Leave the process group (a clean exit instead of NCCL's warning about a leak)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """Whether this process is in a process group of more than one rank."""
    return dist.is_initialized() and dist.get_world_size() > 1


def sum_across(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over every rank (itself when not distributed).

    gloo reduces CPU tensors only and NCCL CUDA ones only; the tensor goes where the
    backend wants it and comes back where it was.
    """
    if not active():
        return values
    where = values.device
    wanted = torch.device("cuda", torch.cuda.current_device()) if _nccl() else torch.device("cpu")
    reduced = values.detach().to(wanted).clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(where)


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one: a stop request (SIGTERM
    reaches the ranks at slightly different batches) becomes one decision taken by all."""
    if not active():
        return flag
    return bool(sum_across(torch.tensor([1.0 if flag else 0.0])).item() > 0)


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (the learning rate the LR range test chose)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any] | None:
    """Every rank's ``value`` (picklable, CPU tensors) on rank 0, in rank order; None on
    the others. Used for the per-rank RNG states and partial sums a checkpoint keeps."""
    if not active():
        return [value]
    rank = dist.get_rank()
    out: list[Any] | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(value, out, dst=0)
    return out


def barrier() -> None:
    """Wait for every rank (rank 0's files are complete before the others go on)."""
    if active():
        dist.barrier()


def _nccl() -> bool:
    return dist.get_backend() == "nccl"


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` of a dataset, in order and without padding.

    For validation: torch's DistributedSampler pads the last shard with repeated images so
    that every rank has as many, which would count those images twice in the summed
    accuracy. Shards here differ by at most one image and sum to the dataset exactly.
    """

    def __init__(self, dataset: Sized, rank: int, world_size: int) -> None:
        self.size, self.rank, self.world_size = len(dataset), rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))
