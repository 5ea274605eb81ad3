"""Tensor-parallel execution: rank 0 (this process) plus N - 1 worker processes the engine starts itself.

    LLM(model_dir, tensor_parallel_size=2, enable_expert_parallel=True)

Rank 0 runs everything a single-device engine runs (scheduler, block manager, sampler, API) with a
`TensorParallelRunner` in place of the `ModelRunner`: each step it sends the step's inputs (`StepInput`: token
ids, positions, block tables, context lengths, copy-on-write copies) to every worker over a pipe, then runs its
own shard; the workers run theirs. The ranks meet in the all-reduces after attention and the MLPs (and the
all-to-all of expert parallelism), so every rank ends the step with the same hidden states and its own latent
pool updated; only rank 0 applies the LM head. Shards are read from the checkpoint by each rank
(`r1forge.parallel.sharded_load`); the process group is the one `r1forge.parallel.init_parallel` makes (NCCL on
CUDA, gloo on CPU, with `worker_timeout_s` as its timeout).

Faults never hang the engine:
- a worker that raises sends its traceback to rank 0 and exits; rank 0's pending collective then fails and
  the step raises `WorkerError` naming the rank and its error;
- a worker that dies (killed, out of memory) is seen by the watchdog thread within half a second while idle
  (`check_health`, which the server's engine loop calls, then raises), and by the failed collective in a step;
- a worker that hangs makes the collective time out after `worker_timeout_s`;
- workers poll the parent process and exit if it is gone; `shutdown` (also at exit) stops, then kills, them.
After a failure the engine is stopped: every later step raises the same `WorkerError`.

Under torchrun the ranks already exist and r1forge/engine/torchrun.py takes the place of the spawned workers.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from r1forge.engine.config import EngineConfig
from r1forge.engine.model_runner import ModelRunner, StepInput
from r1forge.model import DeepseekForCausalLM
from r1forge.parallel.config import ParallelConfig
from r1forge.parallel.mesh import init_parallel
from r1forge.engine.rank_shard import RankChannel, WorkerError, broadcast_weights, load_shard
from r1forge.parallel.tensor_parallel import ShardLayout, resident_bytes

_POLL_S = 0.5  # how often workers check their parent, and the watchdog its workers


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs to build its shard and join the group."""

    rank: int
    world_size: int
    master_port: int
    directory: str
    dtype: torch.dtype
    device_type: str
    config: EngineConfig  # resolved by rank 0: every rank's pool has the same blocks
    num_threads: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_group(rank: int, world_size: int, port: int, device_type: str, timeout_s: float):
    """Join the tensor-parallel process group and build the mesh (its one EP dimension spans every rank)."""
    backend = "nccl" if device_type == "cuda" else "gloo"
    device = torch.device("cuda", rank) if device_type == "cuda" else None
    if device is not None:
        os.environ["LOCAL_RANK"] = str(rank)  # what init_parallel places the rank's device by
        torch.cuda.set_device(device)
    dist.init_process_group("cpu:gloo,cuda:nccl" if backend == "nccl" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s), device_id=device)
    return init_parallel(ParallelConfig(dp_shard=1, ep=world_size, backend=backend, timeout_s=timeout_s),
                         world_size=world_size)


def worker_main(spec: WorkerSpec, conn: Any) -> None:
    """A worker process: build the shard, then run every step rank 0 sends until told to stop."""
    try:
        torch.set_num_threads(spec.num_threads)
        mesh = _join_group(spec.rank, spec.world_size, spec.master_port, spec.device_type,
                           spec.config.worker_timeout_s)
        model, layout = load_shard(spec.directory, spec.rank, spec.config, spec.dtype, mesh.device)
        runner = ModelRunner(model, spec.config)
        conn.send(("ready", spec.rank, resident_bytes(model)))
        parent = mp.parent_process()
        while True:
            if not conn.poll(_POLL_S):
                if parent is not None and not parent.is_alive():
                    os._exit(1)
                continue
            kind, payload = conn.recv()
            if kind == "step":
                runner.run_model(payload)
            elif kind == "weights":
                broadcast_weights(model, layout, payload)
            elif kind == "stop":
                break
            elif kind == "raise":  # fault injection for tests: a worker-side exception mid-run
                raise RuntimeError(payload)
        conn.send(("stopped", spec.rank, None))
        dist.destroy_process_group()
    except BaseException:
        try:
            conn.send(("error", spec.rank, traceback.format_exc()))
        except OSError:
            pass
        os._exit(1)  # closes this rank's sockets, so rank 0's pending collective fails instead of waiting


class TensorParallelExecutor(RankChannel):
    """Rank 0's handle on the workers: start, send steps, watch, stop (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, config: EngineConfig, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.world_size = tp = config.tensor_parallel_size
        self.timeout_s = config.worker_timeout_s
        self.failure: WorkerError | None = None
        self.rank_bytes: dict[int, dict[str, int]] = {}
        self._stopped = False
        port = _free_port()
        ctx = mp.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // tp) if device.type == "cpu" else 1
        self.workers: list[tuple[Any, Any]] = []  # (process, connection), rank 1..tp-1
        for rank in range(1, tp):
            parent_conn, child_conn = ctx.Pipe()
            spec = WorkerSpec(rank, tp, port, str(directory), dtype, device.type, config, threads)
            proc = ctx.Process(target=worker_main, args=(spec, child_conn), name=f"r1forge-tp-rank{rank}",
                               daemon=True)
            proc.start()
            child_conn.close()
            self.workers.append((proc, parent_conn))
        self._finalizer = weakref.finalize(self, _stop_workers, self.workers)
        try:
            self.mesh = _join_group(0, tp, port, device.type, self.timeout_s)
            self._wait_ready()
        except BaseException as e:
            error = self._worker_errors() or f"{type(e).__name__}: {e}"
            self.shutdown()
            raise WorkerError(f"tensor-parallel workers failed to start: {error}") from e
        self._watchdog = threading.Thread(target=self._watch, name="r1forge-tp-watchdog", daemon=True)
        self._watchdog.start()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        for rank, (proc, conn) in enumerate(self.workers, start=1):
            while not conn.poll(_POLL_S):
                if not proc.is_alive():
                    raise WorkerError(f"worker rank {rank} exited with code {proc.exitcode} while starting")
                if time.monotonic() > deadline:
                    raise WorkerError(f"worker rank {rank} not ready after {self.timeout_s:.0f} s")
            kind, _, payload = conn.recv()
            if kind != "ready":
                raise WorkerError(f"worker rank {rank} failed while starting:\n{payload}")
            self.rank_bytes[rank] = payload

    def _watch(self) -> None:
        while not self._stopped and self.failure is None:
            for rank, (proc, _) in enumerate(self.workers, start=1):
                if not proc.is_alive() and not self._stopped:
                    self.failure = WorkerError(f"tensor-parallel worker rank {rank} (pid {proc.pid}) died with "
                                               f"exit code {proc.exitcode}; the engine has stopped")
                    return
            time.sleep(_POLL_S)

    def _worker_errors(self) -> str:
        """The tracebacks workers sent and the exit codes of dead ones, one per rank."""
        lines = []
        for rank, (proc, conn) in enumerate(self.workers, start=1):
            try:
                while conn.poll(0.05):
                    kind, _, payload = conn.recv()
                    if kind == "error":
                        lines.append(f"worker rank {rank} raised:\n{payload.rstrip()}")
            except (EOFError, OSError):
                pass
            proc.join(0.2)
            if proc.exitcode is not None and not any(line.startswith(f"worker rank {rank} ") for line in lines):
                lines.append(f"worker rank {rank} (pid {proc.pid}) died with exit code {proc.exitcode}")
        return "\n".join(lines)

    # -------------------------------------------------------------- per step
    def send(self, kind: str, payload: Any) -> None:
        """One message to every worker (a step, new weights' names and shapes)."""
        self.check()
        for _, conn in self.workers:
            try:
                conn.send((kind, payload))
            except OSError as e:
                raise self.fail(e) from e

    def fail(self, error: BaseException) -> WorkerError:
        """Record the failure of a step (with the workers' own errors), stop the workers; the error to raise."""
        if self.failure is None:
            details = self._worker_errors() or f"{type(error).__name__}: {error}"
            self.failure = WorkerError(f"tensor-parallel step failed; the engine has stopped.\n{details}")
            self.shutdown()
        return self.failure

    def inject_worker_error(self, rank: int, message: str) -> None:
        """Make worker `rank` raise `message` at its next message (for tests of the fault path)."""
        self.workers[rank - 1][1].send(("raise", message))

    def shutdown(self) -> None:
        """Stop every worker (gracefully, then by force) and leave the process group. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._finalizer()
        if dist.is_initialized():
            if self.failure is None:
                dist.destroy_process_group()
            else:  # collectives of a broken group may block: abandon it
                try:
                    dist.destroy_process_group()
                except Exception:
                    pass


def _stop_workers(workers: list[tuple[Any, Any]]) -> None:
    for _, conn in workers:
        try:
            conn.send(("stop", None))
        except OSError:
            pass
    deadline = time.monotonic() + 5.0
    for proc, _ in workers:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc, _ in workers:
        if proc.is_alive():
            proc.terminate()
            proc.join(2.0)
        if proc.is_alive():
            proc.kill()
            proc.join(2.0)
    for _, conn in workers:
        conn.close()


class TensorParallelRunner(ModelRunner):
    """The `ModelRunner` of rank 0: the same step, with the workers running their shards alongside.

    Args:
        model: rank 0's shard (`load_shard(directory, 0, ...)`).
        directory: the checkpoint every worker reads its own shard from.
    """

    def __init__(self, model: DeepseekForCausalLM, config: EngineConfig, directory: str | os.PathLike,
                 dtype: torch.dtype, layout: ShardLayout) -> None:
        super().__init__(model, config)
        self.layout = layout
        from r1forge.engine.torchrun import TorchrunExecutor, launched_by_torchrun

        if launched_by_torchrun():
            self.executor: Any = TorchrunExecutor(config, model)
        else:
            self.executor = TensorParallelExecutor(directory, config, dtype, self.device)
            self.executor.rank_bytes[0] = resident_bytes(model)

    def run_model(self, step: StepInput) -> torch.Tensor:
        self.executor.send_step(step)
        try:
            return super().run_model(step)
        except Exception as e:  # a collective failed: a worker died, raised or timed out
            raise self.executor.fail(e) from e

    def update_weights(self, source: torch.nn.Module) -> float:
        """Hand the single-device model `source`'s current weights to every rank (each keeps its part);
        returns the seconds it took. What an RL trainer calls after each optimizer step."""
        start = time.perf_counter()
        full = {k: v for k, v in source.state_dict().items()}
        metas = [(name, tuple(t.shape), t.dtype) for name, t in full.items()]
        self.executor.send("weights", metas)
        try:
            broadcast_weights(self.model, self.layout, metas, full)
        except Exception as e:
            raise self.executor.fail(e) from e
        return time.perf_counter() - start

    def check_health(self) -> None:
        self.executor.check()

    def shutdown(self) -> None:
        self.executor.shutdown()


def checkpoint_dir_of(model: DeepseekForCausalLM) -> tempfile.TemporaryDirectory:
    """An in-memory model saved to a temporary directory that the ranks read their shards from."""
    tmp = tempfile.TemporaryDirectory(prefix="r1forge-tp-")
    model.save_pretrained(Path(tmp.name))
    return tmp
