"""torch.distributed plumbing for the shared loop: read torchrun's environment, start the process
group (gloo on CPU, nccl on CUDA), reduce metrics, gather per-rank objects.

`pyeff train` works unchanged under `torchrun --nproc_per_node=N`; a single process (no
WORLD_SIZE in the environment, or WORLD_SIZE=1) never touches torch.distributed.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank, world size and local rank as torchrun (or an initialised process group) sets them."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(),
                        int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ValueError(f"bad RANK/WORLD_SIZE/LOCAL_RANK in the environment: {exc}") from None
    return DistInfo(rank, world, local)


def setup(device_type: str) -> tuple[DistInfo, bool]:
    """Start the process group when launched with WORLD_SIZE > 1.

    Returns (info, started_here): the caller should call `teardown()` only if it started it.
    """
    info = env_info()
    if not info.enabled or dist.is_initialized():
        return info, False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ValueError(f"WORLD_SIZE={info.world_size} but {var} is not set; launch with "
                               "`torchrun --nproc_per_node=N -m pyeff train ...`")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
    return info, True


def teardown(sync: bool = True):
    """Destroy the process group. `sync=False` after an error: a failing rank must not wait in a
    barrier the others never reach, but exit, so that torchrun stops the rest."""
    if dist.is_available() and dist.is_initialized():
        # every rank reaches here before any tears down: a rank that destroys its group (rank 0 hosts
        # the store) while another still talks to it can abort the process (seen once in CI, under load)
        if sync:
            dist.barrier()
        dist.destroy_process_group()


@contextmanager
def process_group(device: str = "auto"):
    """Hold one process group across several Trainers, e.g. the phases of a method recipe; yields
    the DistInfo. A no-op on one process and when a group is already running.

    Each Trainer otherwise starts a group and destroys it at its end, and a second
    init_process_group under torchrun finds the first group's addresses in torchrun's store
    (gloo then connects to a closed port and fails): a multi-phase run must start the group once.
    """
    from pyeff.train.loop import resolve_device

    info = env_info()
    info, started = setup(resolve_device(device, info.local_rank).type)
    try:
        yield info
    except BaseException:
        if started:
            teardown(sync=False)
        raise
    if started:
        teardown()


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values, device) -> list:
    """Sum a list of floats over ranks (identity on one process). float64 keeps counts exact."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if is_active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def any_rank(flag: bool, device) -> bool:
    """True on every rank if it is True on any rank (keeps collective calls in lock-step)."""
    if not is_active():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank ([obj] on one process)."""
    if not is_active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (`obj` itself on one process)."""
    if not is_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier():
    if is_active():
        dist.barrier()
