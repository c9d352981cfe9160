"""Many processes through torch.distributed (``torchrun --nproc-per-node N -m svdkit compress ...``).

Each process calibrates on its share of the windows (every size-th one); the statistics are summed over
processes (all-reduce) before any matrix is factored; the matrices of a layer are factored round-robin
by the processes (the costliest first, each to the least loaded process: :func:`assign`) and their
factors broadcast, so every process holds the same compressed layer; one
process (rank 0) writes. Backend nccl on GPUs (one per process, ``cuda:LOCAL_RANK``), gloo on CPUs.
In a single process every helper here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from ..errors import SvdkitError

__all__ = [
    "setup", "rank", "size", "is_main", "all_reduce_", "broadcast_", "barrier", "agree", "shard", "assign", "peer_gone"
]  # fmt: skip

_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket Timeout", "NCCL")
"""what the collective backends' errors say when another process of the group is gone"""

T = TypeVar("T")


def size() -> int:
    """How many processes compress together (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without torch.distributed)."""
    return dist.get_rank() if size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def setup(device: str | torch.device | None) -> str | torch.device | None:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1), once; returns the
    device this process should use (``cuda:LOCAL_RANK`` where CUDA is asked for or automatic)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    cuda = torch.cuda.is_available() and str(device) in ("auto", "cuda", "None")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local >= count:
            raise SvdkitError(
                f"process {local} of this node has no GPU of its own ({count} visible): run at most {count} "
                "processes per node, or pass --device cpu"
            )
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu" if str(device) in ("auto", "None") else device


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over the processes, in place."""
    if size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_(t: torch.Tensor, src: int) -> torch.Tensor:
    """Give every process `src`'s value of `t`, in place."""
    if size() > 1:
        dist.broadcast(t, src)
    return t


def barrier() -> None:
    if size() > 1:
        dist.barrier()


def agree(fn: Callable[[], T]) -> T | None:
    """Run `fn` on rank 0 (everywhere in one process); an SvdkitError it raises is raised by every process,
    so none waits for a partner that gave up. Returns fn's result on rank 0, None elsewhere."""
    if size() == 1:
        return fn()
    result, message = None, [None]
    if is_main():
        try:
            result = fn()
        except SvdkitError as e:
            message = [str(e)]
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise SvdkitError(message[0])
    return result


def peer_gone(e: BaseException) -> str | None:
    """The one line for an error of a collective operation that means another process of the group is gone
    (killed, or stopped on an error of its own), or None for any other error."""
    if size() == 1 or not isinstance(e, RuntimeError):
        return None
    if not isinstance(e, getattr(dist, "DistError", ())) and not any(s in str(e) for s in _PEER_GONE):
        return None
    reason = next((s for s in _PEER_GONE if s in str(e)), type(e).__name__)
    return (
        f"process {rank()} of {size()}: another process of the torchrun group is gone ({reason}), so this one "
        "stops too; a streamed run keeps its finished layers: the same command with --resume continues"
    )


def shard(windows: torch.Tensor | None) -> torch.Tensor | None:
    """This process's windows: every size-th one from its rank (all of them in one process)."""
    if windows is None or size() == 1:
        return windows
    if windows.shape[0] < size():
        raise SvdkitError(f"{windows.shape[0]} calibration windows cannot be shared by {size()} processes: give more")
    return windows[rank() :: size()]


def assign(costs: list[float]) -> list[int]:
    """The process that does each job: the costliest first, each to the least loaded process so far (the
    longest-processing-time rule: at most 4/3 of the best makespan); all 0 in one process."""
    load = [0.0] * size()
    owners = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: -costs[j]):
        owners[job] = min(range(len(load)), key=lambda p: load[p])
        load[owners[job]] += costs[job]
    return owners
