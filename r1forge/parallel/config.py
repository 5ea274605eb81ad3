"""`ParallelConfig`: the degrees of parallelism of a run, the `parallel:` section of a run config.

    parallel:
      dp_shard: -1   # FSDP2 degree; -1 takes what the world size leaves after ep
      ep: 2          # expert-parallel degree: each EP rank holds n_routed_experts / ep routed experts

Every rank is a data-parallel rank (it reads its own share of the batch); the world is laid out as a 2-D mesh
[dp_shard, ep] (torchtitan's dp_shard x ep): an EP group is `ep` consecutive ranks whose tokens meet at their
experts by all-to-all; the ranks holding the same experts (one per EP group) FSDP-shard those experts, and all
ranks FSDP-shard everything else. So world_size = dp_shard * ep.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    """Degrees of data / expert parallelism (used under torchrun; a 1-process run ignores them)."""

    dp_shard: int = -1  # FSDP2 degree; -1: world_size / ep
    ep: int = 1  # expert-parallel degree (divides n_routed_experts); 1 replicates the experts' FSDP shards
    backend: str = "auto"  # "auto" (nccl on CUDA, gloo on CPU), "nccl" or "gloo"
    timeout_s: float = 300.0  # a collective waiting this long fails the run instead of hanging it

    def validate(self, prefix: str = "parallel") -> None:
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ValueError(f"{prefix}.dp_shard must be -1 (the rest of the world) or >= 1, got {self.dp_shard}")
        if self.ep < 1:
            raise ValueError(f"{prefix}.ep must be >= 1, got {self.ep}")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"{prefix}.backend must be 'auto', 'nccl' or 'gloo', got {self.backend!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"{prefix}.timeout_s must be positive, got {self.timeout_s}")

    def resolve(self, world_size: int, prefix: str = "parallel") -> tuple[int, int]:
        """(dp_shard, ep) for `world_size` processes; a ValueError naming the key when they do not fit."""
        self.validate(prefix)
        if world_size % self.ep:
            raise ValueError(f"{prefix}.ep={self.ep} does not divide the world size {world_size}")
        dp_shard = world_size // self.ep if self.dp_shard == -1 else self.dp_shard
        if dp_shard * self.ep != world_size:
            raise ValueError(f"{prefix}.dp_shard={self.dp_shard} x {prefix}.ep={self.ep} = {dp_shard * self.ep} "
                             f"processes, but the world size is {world_size} (set {prefix}.dp_shard to -1 to "
                             "take what ep leaves)")
        return dp_shard, self.ep

    def check_model(self, n_routed_experts: int | None, prefix: str = "parallel") -> None:
        """ep must split the routed experts evenly."""
        if self.ep > 1 and (not n_routed_experts or n_routed_experts % self.ep):
            raise ValueError(f"{prefix}.ep={self.ep} does not divide the model's n_routed_experts "
                             f"({n_routed_experts})")
