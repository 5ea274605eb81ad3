"""Worker (run by tests/test_parallel_rl.py under torchrun): `r1forge grpo ARGS` with checks after every step.

    torchrun --nproc-per-node 2 tests/distributed/grpo_run.py OUT [--fail-rank R] grpo CONFIG --parallel.dp_shard 2

The command runs exactly as the CLI does; the trainer's `rollout` and `step` are wrapped to record, per step,
(1) the largest gap between the engine's sampled-token logprobs and the trainer's recomputation of them with the
training forward (before the update), and (2) whether every parameter and buffer is bitwise rank 0's after the
update. Each rank writes OUT/rank-R.json; the exit code is the command's. With `--fail-rank R`, rank R then
raises while the others wait in a gradient all-reduce: the launcher must end the run with rank R's error.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from r1forge.cli import main
from r1forge.rl.rollout import completion_logprobs
from r1forge.rl.trainer import GRPOTrainer

CHECKS: list[dict[str, float]] = []
_rollout, _step = GRPOTrainer.rollout, GRPOTrainer.step
GRADIENTS: str | None = None  # where rank 0 saves the first step's gradient


def rollout(self: GRPOTrainer, examples, max_len, seed):  # noqa: ANN001, ANN201
    batch = _rollout(self, examples, max_len, seed)
    with torch.no_grad():
        recomputed, _ = completion_logprobs(self.model, batch, self.config.temperature)
    m = batch.completion_mask.bool()
    self.check_logprob_gap = max(getattr(self, "check_logprob_gap", 0.0),
                                 (recomputed - batch.old_logprobs)[m].abs().max().item() if m.any() else 0.0)
    self.check_tokens = getattr(self, "check_tokens", 0) + int(m.sum())
    return batch


@torch.no_grad()
def replica_mismatches(model: torch.nn.Module) -> int:
    """Tensors of the state dict that differ (in any bit) from rank 0's."""
    if not dist.is_initialized():
        return 0
    bad = 0
    for value in model.state_dict().values():
        reference = value.detach().clone()
        dist.broadcast(reference, src=0)
        bad += not torch.equal(reference, value)
    return bad


def step(self: GRPOTrainer) -> dict[str, float]:
    self.check_logprob_gap, self.check_tokens = 0.0, 0
    metrics = _step(self)
    if self.step_count == 1 and GRADIENTS is not None:  # the first step's (clipped) gradient, still in .grad
        torch.save({k: p.grad for k, p in self.model.named_parameters() if p.grad is not None}, GRADIENTS)
    CHECKS.append({"step": self.step_count, "logprob_gap": self.check_logprob_gap, "tokens": self.check_tokens,
                   "mismatched_tensors": replica_mismatches(self.model), "loss": metrics.get("loss")})
    return metrics


def fail(rank: int) -> None:
    """Rank `rank` raises; the others enter the gradient all-reduce of a GRPO update, which it never joins."""
    from r1forge.parallel import ParallelConfig, init_parallel
    from r1forge.parallel.rl import all_reduce_gradients_

    mesh = init_parallel(ParallelConfig())  # (the run's process group)
    if mesh.rank == rank:
        raise RuntimeError(f"injected failure on rank {rank}")
    model = torch.nn.Linear(2, 2)
    model.weight.grad = torch.ones(2, 2)
    all_reduce_gradients_(model, mesh)


@record
def run(argv: list[str]) -> int:
    global GRADIENTS
    GRPOTrainer.rollout, GRPOTrainer.step = rollout, step
    out, argv = argv[0], argv[1:]
    fail_rank = None
    if argv[0] == "--fail-rank":
        fail_rank, argv = int(argv[1]), argv[2:]
    if os.environ.get("RANK", "0") == "0":
        GRADIENTS = os.path.join(out, "gradients-1.pt")
    code = main(argv)
    with open(os.path.join(out, f"rank-{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump({"code": code, "checks": CHECKS}, f)
    if fail_rank is not None:
        fail(fail_rank)
    return code


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
