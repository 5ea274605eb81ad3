"""Tensor-parallel inference when torchrun (or any env:// launcher) started the ranks, instead of the engine.

    torchrun --nproc-per-node 2 my_script.py      # my_script.py calls LLM(model_dir, tensor_parallel_size=2)

Every rank runs the script. Rank 0's `LLM(...)` returns as usual and drives the engine with a
`TorchrunExecutor`; on the other ranks `LLM(...)` calls `serve_torchrun_rank`, which runs rank 0's steps
until rank 0 shuts the engine down, then the process exits. Steps and weight hand-overs go out by
`broadcast_object_list` on a gloo control group; the shards and the per-step work are those of
r1forge/engine/executor.py.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from r1forge.engine.config import EngineConfig
from r1forge.engine.rank_shard import RankChannel, WorkerError, broadcast_weights, load_shard
from r1forge.engine.model_runner import ModelRunner
from r1forge.model import DeepseekForCausalLM
from r1forge.parallel.config import ParallelConfig
from r1forge.parallel.mesh import init_parallel
from r1forge.parallel.tensor_parallel import resident_bytes


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a torchrun (or other env://) launch of several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class TorchrunExecutor(RankChannel):
    """The executor when torchrun started the ranks: steps go out by `broadcast_object_list` on a gloo group.

    The control group waits without a deadline (an idle server sends no step for hours); a rank that dies is
    torchrun's to handle (its agent stops the other ranks), and the model's collectives keep the process
    group's `worker_timeout_s`.
    """

    def __init__(self, config: EngineConfig, model: DeepseekForCausalLM) -> None:
        self.mesh = join_torchrun(config)
        self.control = dist.new_group(backend="gloo", timeout=timedelta(days=365))
        gathered: list[Any] = [None] * self.mesh.world_size
        dist.all_gather_object(gathered, resident_bytes(model), group=self.control)
        self.rank_bytes = dict(enumerate(gathered))
        dist.broadcast_object_list([("config", config)], src=0, group=self.control)  # the resolved pool size
        self.workers: list[tuple[Any, Any]] = []  # none of its own: torchrun owns the processes
        self.failure: WorkerError | None = None
        self._stopped = False

    def send(self, kind: str, payload: Any) -> None:
        self.check()
        dist.broadcast_object_list([(kind, payload)], src=0, group=self.control)

    def fail(self, error: BaseException) -> WorkerError:
        if self.failure is None:
            self.failure = WorkerError(f"tensor-parallel step failed; the engine has stopped: "
                                       f"{type(error).__name__}: {error}")
        return self.failure

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.failure is None:
            dist.broadcast_object_list([("stop", None)], src=0, group=self.control)
            dist.destroy_process_group()


def join_torchrun(config: EngineConfig):
    """Join torchrun's process group (env://) as one tensor-parallel rank; the world must be the TP size."""
    world = int(os.environ["WORLD_SIZE"])
    if world != config.tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size={config.tensor_parallel_size} but torchrun started {world} "
                         "processes: they must be equal")
    return init_parallel(ParallelConfig(dp_shard=1, ep=world, timeout_s=config.worker_timeout_s))


def serve_torchrun_rank(directory: str | os.PathLike, config: EngineConfig, dtype: torch.dtype) -> None:
    """What ranks > 0 of a torchrun launch do inside `LLM(...)`: run rank 0's steps until it shuts down."""
    mesh = join_torchrun(config)
    model, layout = load_shard(directory, mesh.rank, config, dtype, mesh.device)
    control = dist.new_group(backend="gloo", timeout=timedelta(days=365))
    dist.all_gather_object([None] * mesh.world_size, resident_bytes(model), group=control)
    box: list[Any] = [None]
    runner: ModelRunner | None = None
    while True:
        dist.broadcast_object_list(box, src=0, group=control)
        kind, payload = box[0]
        if kind == "config":  # rank 0's resolved config (pool size), sent once before the first step
            runner = ModelRunner(model, payload)
        elif kind == "step":
            runner.run_model(payload)
        elif kind == "weights":
            broadcast_weights(model, layout, payload)
        elif kind == "stop":
            break
    dist.destroy_process_group()
