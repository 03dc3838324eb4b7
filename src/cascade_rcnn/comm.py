"""Communication between the processes of a job: process-group setup from torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), seeding, the small collectives the trainer and the
evaluator need, and unwrapping a DistributedDataParallel model. A low layer: it imports only accel."""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .accel import Accelerator


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (world_size 1: no process group)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DistInfo:
        """Read the variables torchrun / the elastic agent / PyTorchJob set; absent means one process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if not 0 <= rank < world:
            raise ValueError(f"environment RANK={rank} is outside WORLD_SIZE={world}")
        return cls(rank=rank, local_rank=local, world_size=world)


# Before torch 2.8, destroying a gloo process group joins its worker threads while holding the GIL,
# and a worker that needs the GIL to finish (dropping the last reference to a tensor) never does:
# teardown can hang for good. Upstream fixed it in pytorch PR 154976 ("Release GIL in PG
# destructor", June 2025, first in 2.8). hccl and nccl are not affected.
GLOO_SAFE_TEARDOWN = (2, 8)


def unsafe_gloo_teardown(backend: str, world_size: int, torch_version: str = torch.__version__) -> str | None:
    """Why this process group must not start (a gloo group of several processes on a torch whose
    teardown can hang), or None when it may."""
    release = tuple(int(x) for x in torch_version.split("+")[0].split(".")[:2])
    if backend != "gloo" or world_size <= 1 or release >= GLOO_SAFE_TEARDOWN:
        return None
    return (
        f"WORLD_SIZE={world_size} on CPU uses the gloo backend, whose process group can hang at exit "
        f"on torch {torch_version} (fixed in torch 2.8, pytorch PR 154976). Run one process "
        "(--nproc-per-node 1), or use torch >= 2.8 for several CPU processes (the cpu image ships "
        "2.14). NPU (hccl) and GPU (nccl) runs are not affected."
    )


def init_process_group(info: DistInfo, accel: Accelerator, timeout_min: int = 30) -> None:
    """Join the job's process group over env:// (MASTER_ADDR/MASTER_PORT) with the device's backend."""
    if info.world_size <= 1 or dist.is_initialized():
        return
    problem = unsafe_gloo_teardown(accel.backend, info.world_size)
    if problem:
        raise RuntimeError(problem)
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise ValueError(f"WORLD_SIZE={info.world_size} but {key} is not set in the environment")
    dist.init_process_group(
        backend=accel.backend,
        init_method="env://",
        rank=info.rank,
        world_size=info.world_size,
        timeout=datetime.timedelta(minutes=timeout_min),
    )


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the world size of the initialised process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def shared_seed(seed: int) -> int:
    """`seed` when >= 0, else a random one drawn on rank 0 and broadcast so all ranks agree."""
    if seed >= 0:
        return int(seed)
    drawn = [int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF]
    if is_distributed():
        dist.broadcast_object_list(drawn, src=0)
    return drawn[0]


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (CPU and devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def all_gather_objects(obj) -> list:
    """`obj` from every rank, in rank order (trusted: our own processes)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (a collective; trusted: our own processes)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


_host_groups: dict = {}  # default group -> its gloo twin


def _cpu_group():
    """A gloo group over all ranks for flags the host decides (made on first use, by every rank at
    the same point): a collective on the device's group would wait for the device's queued work,
    which static mode's deferred metrics avoid."""
    if dist.get_backend() == "gloo":
        return None  # the default group already runs on the host
    world = dist.group.WORLD
    if world not in _host_groups:
        _host_groups.clear()  # a group of an earlier, destroyed process group
        _host_groups[world] = dist.new_group(backend="gloo")
    return _host_groups[world]


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (a collective; each rank calls it at
    the same point of its loop, so all of them act on the same iteration)."""
    if not is_distributed():
        return bool(flag)
    box = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(box, op=dist.ReduceOp.MAX, group=_cpu_group())
    return bool(box.item())


def reduce_step_metrics(
    loss_values: dict[str, torch.Tensor], data_time: float, device: torch.device
) -> tuple[dict[str, float], float, list[dict[str, float]]]:
    """Losses averaged and data_time maxed over ranks, plus every rank's raw losses.

    One all_gather of a (num_losses + 1,) tensor; every rank gets the same answer, so all of them
    can stop together on a non-finite loss instead of leaving the others waiting in a collective.
    """
    names = sorted(loss_values)
    local = torch.stack([loss_values[k].detach().float().reshape(()) for k in names])
    local = torch.cat([local, torch.tensor([data_time], dtype=torch.float32, device=local.device)]).to(device)
    if is_distributed():
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
        table = torch.stack(gathered).cpu()
    else:
        table = local.cpu().unsqueeze(0)
    per_rank = [dict(zip(names, row[:-1].tolist())) for row in table]
    mean = table[:, :-1].mean(dim=0).tolist()
    return dict(zip(names, mean)), float(table[:, -1].max()), per_rank
