"""The process layout of a run: a DeviceMesh with ('dp', 'sp') dimensions under torchrun,
or a single process."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class DistEnv:
    """Where this process sits.

    Ranks form a ``(dp, sp)`` mesh, ``rank = dp_rank * sp + sp_rank``, so the ranks of a
    sequence-parallel group are neighbours (one node, fast links). ``fsdp_mesh`` is the
    flattened 1-D mesh over all ``dp * sp`` ranks: FSDP2 shards parameters over it and
    reduces gradients of the replicated parameters over data and sequence ranks alike.
    ``mesh``/``fsdp_mesh`` are None for a single process, which trains a plain module.
    """

    device: torch.device
    rank: int = 0
    world: int = 1
    dp: int = 1
    sp: int = 1
    dp_rank: int = 0
    sp_rank: int = 0
    mesh: DeviceMesh | None = None
    fsdp_mesh: DeviceMesh | None = None

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def sp_group(self):
        return self.mesh.get_group("sp") if self.mesh is not None else None

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over every rank (in place; identity on one process)."""
        if self.distributed:
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def cpu_threads(requested: int | None, d_model: int) -> int | None:
    """Set torch's intra-op CPU threads on a machine without CUDA; returns the number set,
    or None when left as it is (CUDA present, or ``OMP_NUM_THREADS`` given and nothing
    requested).

    Without a request or ``OMP_NUM_THREADS``: one thread per 256 of model width (small
    matrices gain nothing from more, and busy-waiting threads on shared cores cost far
    more than they give), at most this process's cores divided by the processes that
    torchrun started on this machine.
    """
    if torch.cuda.is_available():
        return None
    if requested is None:
        if "OMP_NUM_THREADS" in os.environ:
            return None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        requested = max(1, min((cores or 1) // local, d_model // 256))
    torch.set_num_threads(requested)
    return requested


def mesh_env(sp: int, device: torch.device | None = None) -> DistEnv:
    """The layout over the already initialized default process group."""
    device = device or default_device()
    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world // sp, sp), mesh_dim_names=("dp", "sp"))
    fsdp_mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp_sp",))
    return DistEnv(device=device, rank=dist.get_rank(), world=world, dp=world // sp, sp=sp,
                   dp_rank=mesh.get_local_rank("dp"), sp_rank=mesh.get_local_rank("sp"),
                   mesh=mesh, fsdp_mesh=fsdp_mesh)


def setup(sp: int) -> DistEnv:
    """Under torchrun (``WORLD_SIZE`` > 1): join the process group (NCCL for CUDA
    tensors, Gloo for CPU ones) and build the mesh. Otherwise: one plain process."""
    device = default_device()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistEnv(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return mesh_env(sp, device)


def teardown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()
