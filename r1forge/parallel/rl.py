"""Data parallelism for the sampling stages: GRPO's rollouts and update, held-out evaluation, teacher traces.

    dp = RolloutParallel(mesh)                          # mesh = init_parallel(cfg.parallel) under torchrun
    examples, seed = dp.share(examples, seed)           # this rank's contiguous share of whole prompt groups
    result = evaluate_sharded(mesh, llm, tok, problems, "chat", 256)   # every rank its share, merged

GRPO is *replicated* data parallelism (DDP-style, docs/design.md "Data-parallel GRPO and distillation"): every
rank holds the whole policy, its optimizer state and a rollout engine built over that very model, so the
engine reads the weights the optimizer just wrote and the weight sync is only the prefix-cache reset (measured,
`weight_sync_s`). Each step:
  1. the step's global prompt list (the same on every rank: the prompt order is seeded alike) is split into
     contiguous slices of whole prompts (a group of G completions never spans ranks), and prompt i of the
     global list is sampled with seed `seed + i`, so completions do not depend on the world size;
  2. rewards and group advantages are per group, on the rank; "batch" reward scaling divides by the std of the
     *global* batch (the rewards are all-gathered, a few floats per completion);
  3. each rank runs the trainer's micro-batches over its share with its local normalisers; `reduce_step`
     rescales the gradient and the loss sums by local / global normaliser (completions, or tokens for the
     token-mean losses) and all-reduces them (flat buckets, sum), so every rank holds the global batch's
     gradient, the single-process one; per-expert loads are summed too (identical bias updates), and a
     parameter that no rank gave a gradient keeps None, as on one device (AdamW skips it);
  4. clipping and the optimizer step then run on identical gradients: weights stay identical on every rank.
Why not FSDP: sharded training would need an unsharded copy gathered into the engine after every update (the
cost `bench/scaling.py` measures as "sync_s"), and every micro-batch forward/backward would become a collective,
so ranks whose dynamic sampling kept different numbers of completions would have to pad to equal micro-batch
counts. Replicated, the micro-batch loop has no collective at all; the price is the full optimizer state per
rank (the policy must fit one device anyway, for its engine). Distillation trains its student with FSDP2
through `r1forge.train.Trainer` (as pretraining does); only its sampling uses the helpers here.

Every function is the identity on a 1-process mesh (no communication), so the trainers call them always.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from r1forge.parallel.mesh import ParallelMesh
from r1forge.rl.evaluate import EvalResult, evaluate
from r1forge.rl.grpo_loss import group_advantages
from r1forge.rl.rejection import RejectionStats, rejection_sample
from r1forge.rl.rollout import RolloutBatch
from r1forge.train.balance import ExpertLoadTracker

_BUCKET_BYTES = 32 * 2**20  # gradients are all-reduced in flat buckets of about this size


def share_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of rank `rank`'s contiguous share of n items (sizes differ by at most one, lower ranks first)."""
    return n * rank // world_size, n * (rank + 1) // world_size


def gather_objects(mesh: ParallelMesh, obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not mesh.distributed:
        return [obj]
    out: list[Any] = [None] * mesh.world_size
    dist.all_gather_object(out, obj)
    return out


def sum_dicts(mesh: ParallelMesh, values: dict[str, float]) -> dict[str, float]:
    """A dict of numbers summed over ranks; keys missing on a rank count as 0 (ranks may hold different keys)."""
    if not mesh.distributed:
        return dict(values)
    total: dict[str, float] = {}
    for part in gather_objects(mesh, dict(values)):
        for k, v in part.items():
            total[k] = total.get(k, 0.0) + v
    return total


@dataclass
class CompletionStats:
    """Per-completion numbers of the *global* rollout batch (rank order), what the step's metrics are made of."""

    rewards: torch.Tensor  # [N] float32
    lengths: torch.Tensor  # [N] completion tokens
    truncated: torch.Tensor  # [N] bool
    components: dict[str, torch.Tensor]  # reward name -> [N]
    start: int = 0  # this rank's first row in the global batch
    input_width: int = 0  # the longest prompt + completion of the global batch (what one process pads to)

    @property
    def num_completions(self) -> int:
        return self.rewards.numel()

    @property
    def width(self) -> int:
        """The padded completion length of the global batch (what one process would pad to)."""
        return max(int(self.lengths.max()) if self.lengths.numel() else 0, 1)


class RolloutParallel:
    """GRPO's replicated data parallelism over `mesh` (see the module docstring); no-ops on one process."""

    def __init__(self, mesh: ParallelMesh) -> None:
        if mesh.distributed and mesh.ep > 1:
            raise ValueError(f"parallel.ep={mesh.ep}: GRPO replicates the policy on every rank (data parallel "
                             "only, its rollout engine needs the whole model); set parallel.ep to 1")
        self.mesh = mesh

    @property
    def distributed(self) -> bool:
        return self.mesh.distributed

    def check_prompts(self, prompts_per_step: int, prefix: str = "grpo") -> None:
        if prompts_per_step < self.mesh.world_size:
            raise ValueError(f"{prefix}.prompts_per_step={prompts_per_step} is smaller than the "
                             f"{self.mesh.world_size} data-parallel ranks: each rank rolls out whole prompt groups")

    # ------------------------------------------------------------------ rollouts
    def share(self, examples: list[dict[str, Any]], seed: int) -> tuple[list[dict[str, Any]], int]:
        """This rank's contiguous slice of the step's global prompt list, and the sampling seed of its first
        prompt (prompt i of the global list uses seed + i, as in one process)."""
        lo, hi = share_bounds(len(examples), self.mesh.rank, self.mesh.world_size)
        return examples[lo:hi], seed + lo

    def total(self, n: int) -> int:
        """An integer summed over ranks."""
        if not self.distributed:
            return n
        return int(self.mesh.sum_floats({"n": float(n)})["n"])

    def slowest(self, *seconds: float) -> tuple[float, ...]:
        """Each of the given times, the longest over ranks (a step is as slow as its slowest rank)."""
        if not self.distributed:
            return seconds
        return tuple(max(column) for column in zip(*gather_objects(self.mesh, [float(t) for t in seconds])))

    def completion_stats(self, batch: RolloutBatch) -> CompletionStats:
        """The global batch's rewards, lengths, truncation and reward components (one small all-gather)."""
        local = CompletionStats(batch.rewards.float(), batch.completion_mask.sum(1).long(), batch.truncated.bool(),
                                {k: v.float() for k, v in batch.reward_components.items()}, 0,
                                batch.input_ids.shape[1])
        if not self.distributed:
            return local
        parts = gather_objects(self.mesh, local)
        start = sum(p.num_completions for p in parts[: self.mesh.rank])
        return CompletionStats(
            torch.cat([p.rewards for p in parts]), torch.cat([p.lengths for p in parts]),
            torch.cat([p.truncated for p in parts]),
            {k: torch.cat([p.components.get(k, torch.zeros(p.num_completions)) for p in parts])
             for k in sorted({k for p in parts for k in p.components})}, start, max(p.input_width for p in parts))

    def advantages(self, batch: RolloutBatch, stats: CompletionStats, num_generations: int,
                   scale_rewards: str) -> torch.Tensor:
        """Group advantages of this rank's completions. Groups never span ranks, so only "batch" scaling (the
        std of every reward of the step) needs the global batch: computed there, this rank's rows kept."""
        if not self.distributed or scale_rewards != "batch":
            return group_advantages(batch.rewards, num_generations, scale_rewards)
        every = group_advantages(stats.rewards, num_generations, scale_rewards)
        return every[stats.start: stats.start + batch.num_completions].to(batch.rewards.dtype)

    def pad_to_global(self, batch: RolloutBatch, stats: CompletionStats, pad_id: int) -> RolloutBatch:
        """Right-pad this rank's batch to the global batch's shapes (what one process pads to): a loss normalised
        by the padded completion length (Dr. GRPO's) and the per-expert loads (padding tokens are routed too,
        and the bias update reads the loads) are then the single-process ones."""
        T, L = batch.input_ids.shape[1], batch.completion_ids.shape[1]
        if not self.distributed or (T >= stats.input_width and L >= stats.width):
            return batch
        pad = lambda t, n, v=0: torch.nn.functional.pad(t, (0, max(n - t.shape[1], 0)), value=v)  # noqa: E731
        return dataclasses.replace(batch, input_ids=pad(batch.input_ids, stats.input_width, pad_id),
                                   completion_ids=pad(batch.completion_ids, stats.width, pad_id),
                                   completion_mask=pad(batch.completion_mask, stats.width),
                                   old_logprobs=pad(batch.old_logprobs, stats.width))

    # ------------------------------------------------------------------ the update
    @torch.no_grad()
    def reduce_step(self, model: nn.Module, sums: dict[str, float], entropy_sum: float, mask: torch.Tensor, *,
                    token_mean: bool, load_tracker: ExpertLoadTracker | None = None
                    ) -> tuple[dict[str, float], float, torch.Tensor]:
        """After this rank's micro-batches (weighted by its local normaliser): the global batch's gradient on
        every rank, and the global (loss sums, entropy sum, token count). Returns the inputs on one process.

        `mask` [N, L] is this rank's completion mask; `token_mean`: the micro-batches were weighted by tokens
        (bnpo, dapo) rather than by completions; `load_tracker`: the step's per-expert token counts, summed over
        ranks in place (so every rank's bias update is the global batch's).
        """
        tokens = mask.sum()
        if not self.distributed:
            return sums, entropy_sum, tokens.clamp(min=1)
        local = torch.tensor([float(mask.shape[0]), float(tokens), float(entropy_sum)], dtype=torch.float64)
        (total,) = self.mesh.all_reduce_([local.clone()])
        n_global, tokens_global, entropy_global = total.tolist()
        # the micro-batches divided by this rank's normaliser; the global batch's loss divides by the global one
        if token_mean:
            scale = max(local[1].item(), 1.0) / max(tokens_global, 1.0)
        else:
            scale = local[0].item() / max(n_global, 1.0)
        all_reduce_gradients_(model, self.mesh, scale)
        if load_tracker is not None and load_tracker.layers:
            load_tracker.zero_step()  # (a rank with an empty batch collected nothing)
            self.mesh.all_reduce_(load_tracker.step_loads())
        sums = sum_dicts(self.mesh, {k: v * scale for k, v in sums.items()})
        return sums, entropy_global, torch.tensor(tokens_global).clamp(min=1)


@torch.no_grad()
def all_reduce_gradients_(model: nn.Module, mesh: ParallelMesh, scale: float = 1.0) -> None:
    """grad <- sum over ranks of scale * grad, for every parameter of a replicated model (in flat buckets).

    A parameter without a gradient on some ranks joins with zeros; one that no rank gave a gradient keeps None
    (as on one device, where AdamW then skips it: no decay, no moment update). One flag all-reduce decides.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not mesh.distributed or not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float64)
    (has,) = mesh.all_reduce_([has])
    active = [p for p, n in zip(params, has.tolist(), strict=True) if n > 0]
    for p in active:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        elif scale != 1.0:
            p.grad.mul_(scale)
    bucket: list[torch.Tensor] = []
    size = 0
    for i, p in enumerate(active):
        bucket.append(p.grad)
        size += p.grad.numel() * p.grad.element_size()
        if size >= _BUCKET_BYTES or i == len(active) - 1 or active[i + 1].grad.dtype != p.grad.dtype \
                or active[i + 1].grad.device != p.grad.device:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()
            bucket, size = [], 0


# ---------------------------------------------------------------------------------------------- sampling jobs
def evaluate_sharded(mesh: ParallelMesh, llm: Any, tokenizer: Any, examples: list[dict[str, Any]], template: str,
                     max_tokens: int, progress: bool = False) -> EvalResult:
    """`r1forge.rl.evaluate.evaluate` with every rank decoding its contiguous share of the problems (greedy, so
    the merged result is the 1-process one); every rank gets the whole result."""
    if not mesh.distributed:
        return evaluate(llm, tokenizer, examples, template, max_tokens, progress)
    lo, hi = share_bounds(len(examples), mesh.rank, mesh.world_size)
    mine = evaluate(llm, tokenizer, examples[lo:hi], template, max_tokens, progress and mesh.is_main) \
        if hi > lo else None
    parts = [p for p in gather_objects(mesh, mine) if p is not None]
    n = sum(p.num_problems for p in parts)
    correct = [c for p in parts for c in p.correct]
    # the rates are integer counts over each share: recovered exactly, then divided once, as one process does
    formatted = sum(round(p.format_rate * p.num_problems) for p in parts)
    tokens = sum(round(p.mean_length * p.num_problems) for p in parts)
    return EvalResult(sum(correct) / n, formatted / n, tokens / n, n, [t for p in parts for t in p.completions],
                      correct)


def rejection_sample_sharded(mesh: ParallelMesh, llm: Any, tokenizer: Any, examples: list[dict[str, Any]],
                             num_samples: int, *, seed: int | None = 0,
                             **kwargs: Any) -> tuple[list[dict[str, Any]], RejectionStats]:
    """`r1forge.rl.rejection.rejection_sample` over every rank's contiguous share of the prompts (prompt i keeps
    seed + i): the kept records of all ranks in prompt order, and the merged statistics, on every rank."""
    if not mesh.distributed:
        result = rejection_sample(llm, tokenizer, examples, num_samples, seed=seed, **kwargs)
        return result.records, result.stats
    lo, hi = share_bounds(len(examples), mesh.rank, mesh.world_size)
    mine = None
    if hi > lo:
        result = rejection_sample(llm, tokenizer, examples[lo:hi], num_samples,
                                  seed=None if seed is None else seed + lo, **kwargs)
        mine = (result.records, result.stats)
    parts = [p for p in gather_objects(mesh, mine) if p is not None]
    return [r for records, _ in parts for r in records], merge_rejection_stats([s for _, s in parts])


def merge_rejection_stats(parts: list[RejectionStats]) -> RejectionStats:
    """The statistics of one pass over the union of the parts' prompts (counts summed, rates re-weighted)."""
    out = RejectionStats()
    for key in ("num_prompts", "total", "correct", "formatted", "truncated", "duplicates", "capped", "kept",
                "prompts_with_kept"):
        setattr(out, key, sum(getattr(p, key) for p in parts))
    out.num_samples = max((p.num_samples for p in parts), default=0)
    if out.num_prompts:
        out.pass_at_1 = sum(p.pass_at_1 * p.num_prompts for p in parts) / out.num_prompts
        out.pass_at_n = sum(round(p.pass_at_n * p.num_prompts) for p in parts) / out.num_prompts
    out.mean_length = sum(round(p.mean_length * p.total) for p in parts) / max(out.total, 1)
    return out
