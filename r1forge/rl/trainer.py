"""GRPO: reinforcement learning against rule-based rewards with group-relative advantages and no critic.

Each step (docs/design.md section 7):
  1. sample G completions for each of P prompts from the current policy (engine, prefix-shared);
  2. score them; A_i = (r_i - mean_group) / std (scale_rewards), the same for every token of o_i;
  3. (DAPO) drop groups whose rewards are all equal and resample to refill; mask or punish over-long ones;
  4. mu passes: recompute log pi_theta, take the clipped objective against the sampling policy's logprobs,
     plus beta * k3 KL to a frozen reference; one AdamW step per pass;
  5. MoE bias update (optional), reset the engine's prefix cache (its latents are the old weights').
Under torchrun (`parallel`: the run's mesh) each rank rolls out its contiguous share of the step's prompts and the
gradient is the global batch's (r1forge.parallel.rl: replicated data parallelism, the same numbers as one process).
Deviations from the paper, on purpose:
  1. pi_old is the engine's sampling distribution, so with mu = 1 the ratio is 1 up to numerics (as in TRL).
  2. The KL reference can be reset to the current policy every `ref_model_sync_steps` (R1 did, every 400).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import time
from collections.abc import Callable
from typing import Any

import torch

from r1forge.engine import LLM
from r1forge.engine.speculative import check_speculative_model
from r1forge.parallel.mesh import ParallelMesh
from r1forge.parallel.rl import RolloutParallel, evaluate_sharded
from r1forge.rl.config import GRPOConfig
from r1forge.rl.evaluate import EvalResult
from r1forge.rl.grpo_loss import dynamic_sampling_filter, grpo_loss, zero_std_group_fraction
from r1forge.rl.rewards import CombinedReward, overlong_penalty
from r1forge.rl.rollout import RolloutBatch, completion_logprobs, generate_rollouts, token_budget_micro_batches
from r1forge.rl.templates import render_prompt
from r1forge.train.balance import ExpertLoadTracker, update_router_biases
from r1forge.train.guard import NonFiniteGuard
from r1forge.train.schedule import build_optimizer, build_scheduler


def _cat_batches(batches: list[RolloutBatch]) -> RolloutBatch:
    if len(batches) == 1:
        return batches[0]
    T = max(b.input_ids.shape[1] for b in batches)
    L = max(b.completion_ids.shape[1] for b in batches)
    pad = lambda t, n, v=0: torch.nn.functional.pad(t, (0, n - t.shape[1]), value=v)  # noqa: E731
    first = batches[0]
    return dataclasses.replace(
        first, input_ids=torch.cat([pad(b.input_ids, T) for b in batches]),
        completion_start=torch.cat([b.completion_start for b in batches]),
        completion_ids=torch.cat([pad(b.completion_ids, L) for b in batches]),
        completion_mask=torch.cat([pad(b.completion_mask, L) for b in batches]),
        old_logprobs=torch.cat([pad(b.old_logprobs, L) for b in batches]),
        rewards=torch.cat([b.rewards for b in batches]),
        reward_components={k: torch.cat([b.reward_components[k] for b in batches]) for k in first.reward_components},
        truncated=torch.cat([b.truncated for b in batches]), prompts=sum((b.prompts for b in batches), []),
        completions=sum((b.completions for b in batches), []), examples=sum((b.examples for b in batches), []),
    )

class GRPOTrainer:
    """Trains `model` in place. `examples` are dicts with a "question" and whatever the rewards read ("answer")."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, config: GRPOConfig,
                 reward_fn: Callable[..., tuple[float, dict[str, float]]], train_examples: list[dict[str, Any]],
                 llm: LLM | None = None, log: Callable[[int, dict[str, Any]], None] | None = None,
                 log_completions: Callable[[int, list[dict[str, Any]]], None] | None = None,
                 parallel: ParallelMesh | None = None) -> None:
        if not train_examples:
            raise ValueError("GRPO needs at least one training example")
        # data parallel under torchrun (every rank the whole policy, its share of the prompts); else one process
        self.dp = RolloutParallel(parallel or ParallelMesh.single(next(model.parameters()).device))
        self.dp.check_prompts(config.prompts_per_step)
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        # rewards by name (combine_rewards) get the per-call time limit; a plain callable is called as it is
        self.reward_fn = reward_fn.with_timeout(config.reward_timeout_s) if isinstance(reward_fn, CombinedReward) \
            else reward_fn
        self.examples = train_examples
        # Decode graphs stay valid across updates: the optimizer changes the weights in place, at the same addresses.
        if llm is None:
            spec = None
            if config.rollout_speculative_tokens:
                check_speculative_model(model, "the GRPO policy (set model.mtp: true to load its MTP module)")
                spec = {"method": "mtp", "num_speculative_tokens": config.rollout_speculative_tokens}
            llm = LLM(model, tokenizer=tokenizer, max_num_seqs=config.prompts_per_step * config.num_generations,
                      block_size=16, cuda_graphs=config.rollout_cuda_graphs, compile=config.rollout_compile,
                      speculative_config=spec)
        self.llm = llm
        self.log = log or (lambda step, metrics: None)
        self.log_completions = log_completions or (lambda step, rows: None)
        self.ref_model = self._frozen_copy() if config.beta > 0 else None
        self.ref_synced = False  # the reference is no longer the initial policy (ref_model_sync_steps)
        # The pretraining optimizer: AdamW with weight decay on matrices only (norm gains are not pulled to zero).
        self.optimizer = build_optimizer(model, config.learning_rate, config.weight_decay,
                                         betas=(config.adam_beta1, config.adam_beta2))
        self.scheduler = build_scheduler(self.optimizer, config.warmup_steps, config.steps, min_lr_ratio=1.0)  # constant
        self.rng = random.Random(config.seed)
        self.order: list[int] = []
        self.step_count = 0
        self.load_tracker = ExpertLoadTracker(model) if config.bias_update_gamma > 0 else None
        # A step whose loss or gradient norm is non-finite makes no update (see _optimise); the guard remembers the
        # streak so that a run ending in one is reported as diverged, never as finished.
        self.guard = NonFiniteGuard(max_bad_steps=config.steps + 1)

    # ------------------------------------------------------------------ resumable state
    def extra_state(self) -> dict[str, Any]:
        """What a checkpoint needs beyond weights and optimizer to continue exactly: the prompt order (the
        rollout seeds derive from the step), and the reference model when it was re-synced since the start."""
        version, internal, gauss = self.rng.getstate()
        state: dict[str, Any] = {"order": list(self.order), "rng": [version, list(internal), gauss],
                                 "guard": self.guard.state_dict()}
        if self.ref_model is not None and self.ref_synced:
            state["ref_model"] = {k: v.detach().cpu() for k, v in self.ref_model.state_dict().items()}
        return state

    def load_extra_state(self, step: int, state: dict[str, Any]) -> None:
        self.step_count = step
        self.order = [int(i) for i in state["order"]]
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.guard.load_state_dict(state.get("guard", {}))
        if self.ref_model is not None and "ref_model" in state:
            self.ref_model.load_state_dict(state["ref_model"])
            self.ref_synced = True

    def resume(self, checkpoint: str | os.PathLike) -> None:
        """Continue from a checkpoint written by `r1forge grpo` (weights, optimizer, scheduler, RNGs, order)."""
        from r1forge.train.checkpointing import load_training_checkpoint

        state = load_training_checkpoint(checkpoint, self.model, self.optimizer, self.scheduler)
        self.load_extra_state(state["step"], state["extra"])
        self.llm.update_weights(self.model)

    def _frozen_copy(self) -> torch.nn.Module:
        ref = copy.deepcopy(self.model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    def _next_examples(self, n: int) -> list[dict[str, Any]]:
        out = []
        while len(out) < n:
            if not self.order:
                self.order = list(range(len(self.examples)))
                self.rng.shuffle(self.order)
            out.append(self.examples[self.order.pop()])
        return out

    # ------------------------------------------------------------------ one step
    def rollout(self, examples: list[dict[str, Any]], max_len: int, seed: int) -> RolloutBatch:
        prompts, ids = [], []
        for ex in examples:
            text, tok = render_prompt(self.tokenizer, ex["question"], self.config.template)
            prompts.append(text)
            ids.append(tok[-self.config.max_prompt_length:])
        self.model.eval()
        return generate_rollouts(self.llm, ids, prompts, examples, self.reward_fn, self.config.num_generations,
                                 max_len, self.config.temperature, self.config.top_p, seed=seed,
                                 pad_id=self.tokenizer.pad_token_id or 0)

    def step(self) -> dict[str, float]:
        cfg = self.config
        G, max_len = cfg.num_generations, cfg.completion_length_at(self.step_count)
        t0 = time.perf_counter()
        spec_before = self.llm.stats()
        batches, groups_dropped = [], 0
        for round_ in range(1 + (cfg.max_resample_rounds if cfg.dynamic_sampling else 0)):
            examples, seed = self.dp.share(self._next_examples(cfg.prompts_per_step),  # this rank's whole groups
                                           cfg.seed * 1_000_003 + self.step_count * 101 + round_)
            batch = self.rollout(examples, max_len, seed=seed)
            if cfg.overlong_buffer > 0:
                lengths = batch.completion_mask.sum(1)
                batch.rewards = batch.rewards + cfg.overlong_penalty_factor * torch.tensor(
                    [overlong_penalty(int(n), max_len, cfg.overlong_buffer) for n in lengths])
            if cfg.dynamic_sampling:
                keep_groups = dynamic_sampling_filter(batch.rewards, G)
                groups_dropped += int((~keep_groups).sum())
                batch = batch.select(keep_groups.repeat_interleave(G))
            if batch.num_completions:
                batches.append(batch)
            if self.dp.total(sum(b.num_completions for b in batches)) >= cfg.prompts_per_step * G:
                break
        rollout_time = time.perf_counter() - t0
        metrics: dict[str, float] = {"groups_dropped": float(self.dp.total(groups_dropped))}
        metrics.update(_speculation_metrics(spec_before, self.llm.stats()))
        if not self.dp.total(len(batches)):  # no rank kept a group
            self.step_count += 1
            metrics.update(skipped=1.0, zero_std_fraction=1.0)
            self.log(self.step_count, metrics)
            return metrics
        # (a rank whose every group dynamic sampling dropped takes part with its empty batch: no gradient of its own)
        batch = _cat_batches(batches) if batches else batch
        stats = self.dp.completion_stats(batch)  # the global batch's rewards and lengths (this batch on one process)
        batch = self.dp.pad_to_global(batch, stats, self.tokenizer.pad_token_id or 0)
        N = stats.num_completions
        advantages = self.dp.advantages(batch, stats, G, cfg.scale_rewards)
        mask = batch.completion_mask.clone()
        if cfg.mask_truncated_completions:
            mask = mask * (~batch.truncated).float()[:, None]
        t1 = time.perf_counter()
        self.model.train()
        ref_logprobs = None  # the reference is frozen: its logprobs serve every one of the mu passes
        if self.ref_model is not None:
            with torch.no_grad():
                ref_logprobs, _ = completion_logprobs(self.ref_model, batch, cfg.temperature, cfg.micro_batch_size)
        loss_metrics: dict[str, float] = {}
        passes: list[tuple[str, float]] = []  # (name, value) of every pass's loss and gradient norm
        for _ in range(cfg.num_iterations):
            loss_metrics = self._optimise(batch, advantages, mask, ref_logprobs)
            passes += [("loss", loss_metrics["loss"]), ("grad_norm", loss_metrics["grad_norm"])]
        self.guard.check(*(v for _, v in passes), step=self.step_count + 1,
                         reason=", ".join(f"{k}={v}" for k, v in passes if not math.isfinite(v)))
        self.model.eval()
        # The rollout engine takes the new weights: shared on one device and on every data-parallel rank (each
        # holds the policy and an engine over it: only the prefix cache is dropped), broadcast to every rank's
        # shard by a tensor-parallel engine (`LLM(..., tensor_parallel_size=N)`).
        weight_sync_s = self.llm.update_weights(self.model)
        self.step_count += 1
        if self.ref_model is not None and cfg.ref_model_sync_steps and self.step_count % cfg.ref_model_sync_steps == 0:
            self.ref_model.load_state_dict(self.model.state_dict())
            self.ref_synced = True
        train_time = time.perf_counter() - t1
        # global tokens over the slowest rank's times: a data-parallel step is as fast as its slowest rank
        rollout_time, train_time, weight_sync_s = self.dp.slowest(rollout_time, train_time, weight_sync_s)
        tokens = stats.lengths.sum().item()
        metrics.update(loss_metrics)
        metrics.update(
            reward_mean=stats.rewards.mean().item(), reward_std=stats.rewards.std().item() if N > 1 else 0.0,
            zero_std_fraction=zero_std_group_fraction(stats.rewards, G).item(),
            completion_length=stats.lengths.float().mean().item(),
            truncated_fraction=stats.truncated.float().mean().item(),
            rollout_tokens_per_s=tokens / max(rollout_time, 1e-9), train_tokens_per_s=tokens * cfg.num_iterations
            / max(train_time, 1e-9), lr=self.scheduler.get_last_lr()[0], max_completion_length=float(max_len),
            weight_sync_s=weight_sync_s,
        )
        for name, values in stats.components.items():
            metrics[f"reward/{name}"] = values.mean().item()
        self.log(self.step_count, metrics)
        if cfg.log_completions_every and self.step_count % cfg.log_completions_every == 0:
            self.log_completions(self.step_count, [
                {"prompt": batch.prompts[i], "completion": batch.completions[i], "reward": batch.rewards[i].item(),
                 "answer": batch.examples[i].get("answer")} for i in range(min(batch.num_completions, G))])
        return metrics

    def _optimise(self, batch: RolloutBatch, advantages: torch.Tensor, mask: torch.Tensor,
                  ref_logprobs: torch.Tensor | None) -> dict[str, float]:
        cfg = self.config
        N, L = batch.completion_ids.shape
        total_tokens = mask.sum().clamp(min=1)
        # Micro-batches of at most micro_batch_size x (the longest row) tokens, the padded size the rows would
        # have as micro_batch_size-row slices: rows sorted by length, each micro-batch trimmed to its own longest
        # row (no forward, attention or head on padding). The loss and its gradient do not depend on the split.
        budget = max(1, cfg.micro_batch_size) * max(int(batch.row_lengths().max()), 1)
        sums: dict[str, float] = {}
        entropy_sum = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        for idx in token_budget_micro_batches(batch.row_lengths(), budget):
            part = batch.take(idx)  # [n, T_part], completions [n, L_part]
            m = mask[idx, : part.completion_ids.shape[1]]
            logprobs, entropy = completion_logprobs(self.model, part, cfg.temperature)
            ref = None if ref_logprobs is None else ref_logprobs[idx, : m.shape[1]]
            loss, info = grpo_loss(logprobs, part.old_logprobs, advantages[idx], m, ref_logprobs=ref,
                                   beta=cfg.beta, epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high,
                                   loss_type=cfg.loss_type, max_completion_length=L)  # dr_grpo: the batch's L
            token_share = m.sum() / total_tokens
            weight = token_share if cfg.loss_type in ("bnpo", "dapo") else torch.tensor(part.num_completions / N)
            (loss * weight).backward()
            sums["loss"] = sums.get("loss", 0.0) + (loss * weight).item()
            for k, v in info.items():  # token means over the micro-batch -> token means over the batch
                sums[k] = sums.get(k, 0.0) + float(v) * token_share.item()
            entropy_sum += (entropy * m).sum().item()
            if self.load_tracker is not None:
                self.load_tracker.collect()
        # data parallel: this rank's share -> the global batch's gradient, expert loads and sums (no-op on one process)
        sums, entropy_sum, total_tokens = self.dp.reduce_step(
            self.model, sums, entropy_sum, mask, token_mean=cfg.loss_type in ("bnpo", "dapo"),
            load_tracker=self.load_tracker)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        if torch.isfinite(grad_norm):
            self.optimizer.step()
            self.scheduler.step()
            if self.load_tracker is not None:  # loads summed over the step's micro-batches
                update_router_biases(self.model, cfg.bias_update_gamma, self.load_tracker.step_loads())
        if self.load_tracker is not None:
            self.load_tracker.end_step(applied=bool(torch.isfinite(grad_norm)))
        sums["grad_norm"] = grad_norm.item()
        sums["entropy"] = entropy_sum / total_tokens.item()
        return sums

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, examples: list[dict[str, Any]], max_tokens: int | None = None,
                 progress: bool = False) -> EvalResult:
        return evaluate_sharded(self.dp.mesh, self.llm, self.tokenizer, examples, self.config.template,
                                max_tokens or self.config.completion_length_at(self.step_count), progress)

    def train(self, progress: Callable[[int, dict[str, float]], None] | None = None) -> None:
        while self.step_count < self.config.steps:
            metrics = self.step()
            if progress is not None:
                progress(self.step_count, metrics)


def _speculation_metrics(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """This step's rollout acceptance (speculative decoding): overall, per draft position, mean emitted length."""
    if "spec_draft_tokens" not in after:
        return {}

    def delta(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)
    drafted, steps = delta("spec_draft_tokens"), delta("spec_verify_steps")
    out = {"rollout/spec_acceptance_rate": delta("spec_accepted_tokens") / drafted if drafted else 0.0,
           "rollout/spec_mean_accepted_length": 1 + delta("spec_accepted_tokens") / steps if steps else 0.0}
    j = 1
    while f"spec_draft_tokens_pos{j}" in after:
        d = delta(f"spec_draft_tokens_pos{j}")
        out[f"rollout/spec_acceptance_rate_pos{j}"] = delta(f"spec_accepted_tokens_pos{j}") / d if d else 0.0
        j += 1
    return out
