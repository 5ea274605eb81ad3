"""`init_parallel`: the process group and the device mesh of a run, held in one object (no module globals).

    mesh = init_parallel(ParallelConfig(dp_shard=-1, ep=2))   # under torchrun
    mesh.rank, mesh.world_size, mesh.device, mesh.is_main
    mesh.dp_mesh      # 1-D mesh over all ranks: FSDP of the dense parameters, data parallelism
    mesh.expert_dp    # 1-D mesh over the ranks that hold the same experts: FSDP of the routed experts
    mesh.ep_group     # the EP group of this rank: the all-to-all of its tokens

Rank r sits at (dp_shard index r // ep, ep index r % ep) of the 2-D mesh [dp_shard, ep]; consecutive ranks
form an EP group, so on a multi-GPU node the all-to-all stays on the fastest links.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from r1forge.parallel.config import ParallelConfig


@dataclass
class ParallelMesh:
    """Where this process sits in the run; the groups every parallel piece communicates over."""

    config: ParallelConfig
    rank: int
    world_size: int
    dp_shard: int
    ep: int
    device: torch.device
    mesh: DeviceMesh | None  # [dp_shard, ep] with those dim names; None for a 1-process run

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> "ParallelMesh":
        """The mesh of a 1-process run (every collective is the identity), whatever the environment says."""
        return cls(ParallelConfig(dp_shard=1, ep=1), 0, 1, 1, 1, torch.device(device), None)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def dp_mesh(self) -> DeviceMesh:
        """All ranks as one dimension: every rank is a data-parallel rank."""
        return self.mesh._flatten("dp") if self.ep > 1 else self.mesh["dp_shard"]

    @property
    def expert_dp(self) -> DeviceMesh:
        return self.mesh["dp_shard"]

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("ep")

    # -------------------------------------------------------------- collectives over every rank
    def all_reduce_(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sum each tensor over all ranks, in place (one flat all-reduce); returns them."""
        if not self.distributed or not tensors:
            return tensors
        flat = torch.cat([t.reshape(-1).to(self.device, torch.float64) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()
        return tensors

    def sum_floats(self, values: dict[str, float]) -> dict[str, float]:
        """Sum a dict of numbers over all ranks (every rank must pass the same keys)."""
        if not self.distributed or not values:
            return dict(values)
        keys = sorted(values)
        (total,) = self.all_reduce_([torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)])
        return dict(zip(keys, total.tolist(), strict=True))

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (a path, a small dict)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Leave the process group at a normal end of the run. The barrier first: no rank tears its gloo group
        down while another is still finishing its last collective (a clean-clone suite saw rank 0 abort,
        "terminate called without an active exception", in the teardown after an expert-parallel run)."""
        if self.distributed and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _device(backend: str) -> torch.device:
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def init_parallel(config: ParallelConfig | None = None, prefix: str = "parallel",
                  world_size: int | None = None) -> ParallelMesh:
    """Join the run's process group (torchrun's environment) and build the [dp_shard, ep] mesh.

    Without torchrun (no WORLD_SIZE, or 1) this is a 1-process mesh and nothing is initialised. Errors name the
    config key when the degrees do not fit the world size. NCCL on CUDA, gloo on CPU, unless `config.backend`.
    `world_size` overrides WORLD_SIZE for a caller that initialised the process group itself (the inference
    engine's own workers).
    """
    config = config or ParallelConfig()
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    dp_shard, ep = config.resolve(world_size, prefix)
    backend = config.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError(f"{prefix}.backend is 'nccl' but CUDA is not available")
    device = _device(backend) if world_size > 1 else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if world_size == 1:
        return ParallelMesh.single(device)
    if not dist.is_initialized():
        # cpu:gloo beside nccl: object collectives (paths, counters) need a CPU backend.
        pg_backend = "cpu:gloo,cuda:nccl" if backend == "nccl" else "gloo"
        dist.init_process_group(pg_backend, timeout=timedelta(seconds=config.timeout_s),
                                device_id=device if backend == "nccl" else None)
    rank = dist.get_rank()
    mesh = init_device_mesh(device.type, (dp_shard, ep), mesh_dim_names=("dp_shard", "ep"))
    return ParallelMesh(config, rank, world_size, dp_shard, ep, device, mesh)
