"""What every tensor-parallel rank does with its shard, whoever started the rank (the engine's own workers,
r1forge/engine/executor.py, or torchrun, r1forge/engine/torchrun.py): load it, and take new weights."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from r1forge.engine.config import EngineConfig
from r1forge.model import DeepseekForCausalLM
from r1forge.parallel.sharded_load import load_model_shard
from r1forge.parallel.tensor_parallel import ShardLayout, copy_into_shard_


class WorkerError(RuntimeError):
    """A tensor-parallel worker died or raised; the engine cannot step any more."""


class RankChannel:
    """Rank 0's side of the ranks (spawned workers or torchrun's): the failure state and the step message.

    Subclasses implement `send(kind, payload)` to every other rank and `shutdown()`.
    """

    failure: WorkerError | None = None
    _stopped: bool = False

    def check(self) -> None:
        """Raise the failure a watchdog or a step saw (ending the other ranks first), or that we stopped."""
        if self.failure is not None:
            self.shutdown()
            raise self.failure
        if self._stopped:
            raise WorkerError("the tensor-parallel engine was shut down")

    def send_step(self, step: Any) -> None:
        self.send("step", step)

    def send(self, kind: str, payload: Any) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError


def load_shard(directory: str | os.PathLike, rank: int, config: EngineConfig, dtype: torch.dtype,
               device: str | torch.device) -> tuple[DeepseekForCausalLM, ShardLayout]:
    """This rank's shard of the checkpoint (rank 0 keeps the LM head; workers never compute logits)."""
    return load_model_shard(directory, rank, config.tensor_parallel_size, dtype=dtype, device=device,
                            expert_parallel=config.enable_expert_parallel, keep_lm_head=rank == 0)


WeightsMeta = list[tuple[str, tuple[int, ...], torch.dtype]]


def broadcast_weights(model: DeepseekForCausalLM, layout: ShardLayout, metas: WeightsMeta,
                      full: dict[str, torch.Tensor] | None = None) -> None:
    """Every rank: receive each single-device tensor of `metas` from rank 0 (which passes `full`) and keep its
    part. One tensor at a time, so a rank never holds more than its shard plus one full tensor."""
    targets = model.state_dict(keep_vars=True)
    device = next(model.parameters()).device
    for name, shape, dtype in metas:
        tensor = full[name].detach().to(device).contiguous() if full is not None else \
            torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(tensor, src=0)
        copy_into_shard_(targets, layout, name, tensor)
