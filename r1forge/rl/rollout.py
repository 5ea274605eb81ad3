"""Rollouts: G samples per prompt from the current policy through the engine, scored by rule-based rewards,
packed into padded tensors for the GRPO loss.

The engine wraps the very model being trained (no stale copy); its prefix cache is reset after every weight
update. The sampled tokens' logprobs it reports are the sampling policy's (pi_old in DeepSeek-R1 eq. 1).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from r1forge.engine import LLM, SamplingParams


@dataclass
class RolloutBatch:
    """N = prompts * G completions, each right-padded; prompts keep their own lengths (no left padding)."""

    input_ids: torch.Tensor  # [N, T] prompt + completion, right-padded with pad_id
    completion_start: torch.Tensor  # [N] index of the first completion token in input_ids
    completion_ids: torch.Tensor  # [N, L] right-padded
    completion_mask: torch.Tensor  # [N, L] float, 1 on real completion tokens
    old_logprobs: torch.Tensor  # [N, L] sampling policy's logprobs of the completion tokens
    rewards: torch.Tensor  # [N]
    reward_components: dict[str, torch.Tensor]  # name -> [N]
    truncated: torch.Tensor  # [N] bool, finished by length (not by eos / stop)
    prompts: list[str]
    completions: list[str]
    examples: list[dict[str, Any]]  # the example of each completion (answer etc.), repeated G times

    @property
    def num_completions(self) -> int:
        return self.input_ids.shape[0]

    def select(self, keep: torch.Tensor) -> "RolloutBatch":
        """Keep the completions where `keep` [N] is True (used by dynamic sampling, whole groups at a time)."""
        idx = keep.nonzero().squeeze(1)
        pick = lambda xs: [xs[i] for i in idx.tolist()]  # noqa: E731
        return dataclasses.replace(
            self, input_ids=self.input_ids[idx], completion_start=self.completion_start[idx],
            completion_ids=self.completion_ids[idx], completion_mask=self.completion_mask[idx],
            old_logprobs=self.old_logprobs[idx], rewards=self.rewards[idx],
            reward_components={k: v[idx] for k, v in self.reward_components.items()}, truncated=self.truncated[idx],
            prompts=pick(self.prompts), completions=pick(self.completions), examples=pick(self.examples),
        )

    def row_lengths(self) -> torch.Tensor:
        """[N] long: real tokens of each row (prompt + completion), what a forward over it needs."""
        return self.completion_start + self.completion_mask.ne(0).sum(1)

    def take(self, idx: torch.Tensor) -> "RolloutBatch":
        """The rows `idx` [n] (in that order), trimmed to their own longest row and longest completion: a
        micro-batch that carries no padding beyond what its rows need."""
        lengths = self.row_lengths()[idx]
        T = max(int(lengths.max()), 1) if len(idx) else 1
        L = max(int(self.completion_mask[idx].ne(0).sum(1).max()), 1) if len(idx) else 1
        pick = lambda xs: [xs[i] for i in idx.tolist()]  # noqa: E731
        return dataclasses.replace(
            self, input_ids=self.input_ids[idx, :T], completion_start=self.completion_start[idx],
            completion_ids=self.completion_ids[idx, :L], completion_mask=self.completion_mask[idx, :L],
            old_logprobs=self.old_logprobs[idx, :L], rewards=self.rewards[idx],
            reward_components={k: v[idx] for k, v in self.reward_components.items()}, truncated=self.truncated[idx],
            prompts=pick(self.prompts), completions=pick(self.completions), examples=pick(self.examples),
        )


def token_budget_micro_batches(lengths: torch.Tensor, budget: int) -> list[torch.Tensor]:
    """Split rows into micro-batches of at most `budget` tokens each, counted as rows x the micro-batch's longest
    row (what a right-padded forward computes): rows sorted by length, longest first (so the largest micro-batch
    comes first and a budget too big fails at once), packed greedily; a row longer than the budget goes alone.

    Returns the row indices of each micro-batch (long tensors; every row exactly once).
    """
    order = lengths.argsort(descending=True, stable=True)  # stable: a fixed batch gives fixed micro-batches
    sizes = lengths[order].clamp(min=1).tolist()
    batches, start = [], 0
    while start < len(sizes):
        longest = sizes[start]  # sorted: the first row of a micro-batch is its longest
        n = max(1, min(len(sizes) - start, budget // longest))
        batches.append(order[start : start + n])
        start += n
    return batches

RewardFn = Callable[..., tuple[float, dict[str, float]]]


def generate_rollouts(llm: LLM, prompt_ids: list[list[int]], prompts: list[str], examples: list[dict[str, Any]],
                      reward_fn: RewardFn, num_generations: int, max_completion_length: int, temperature: float = 1.0,
                      top_p: float = 1.0, seed: int | None = None, pad_id: int = 0) -> RolloutBatch:
    """Sample `num_generations` completions per prompt (prefix-shared) and score them."""
    params = [SamplingParams(n=num_generations, temperature=temperature, top_p=top_p, max_tokens=max_completion_length,
                             logprobs=0, seed=None if seed is None else seed + i)
              for i in range(len(prompt_ids))]
    outs = llm.generate(prompt_ids, params)
    rows: list[tuple[list[int], list[int], list[float], bool]] = []
    texts, ex_rep, prompt_rep, rewards, comps = [], [], [], [], {}
    for prompt_text, ids, example, out in zip(prompts, prompt_ids, examples, outs):
        for c in out.outputs:
            rows.append((ids, c.token_ids, c.logprobs or [], c.finish_reason == "length"))
            text = c.text
            total, parts = reward_fn(prompt_text, text, **example)
            rewards.append(total)
            for k, v in parts.items():
                comps.setdefault(k, []).append(v)
            texts.append(text)
            ex_rep.append(example)
            prompt_rep.append(prompt_text)
    N = len(rows)
    T = max(len(p) + len(c) for p, c, _, _ in rows)
    L = max(max(len(c) for _, c, _, _ in rows), 1)
    input_ids = torch.full((N, T), pad_id, dtype=torch.long)
    completion_ids = torch.full((N, L), pad_id, dtype=torch.long)
    mask = torch.zeros(N, L)
    old = torch.zeros(N, L)
    start = torch.zeros(N, dtype=torch.long)
    for i, (p, c, lp, _) in enumerate(rows):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        if c:
            completion_ids[i, : len(c)] = torch.tensor(c)
            old[i, : len(c)] = torch.tensor(lp)
        mask[i, : len(c)] = 1.0
        start[i] = len(p)
    return RolloutBatch(
        input_ids=input_ids, completion_start=start, completion_ids=completion_ids, completion_mask=mask,
        old_logprobs=old, rewards=torch.tensor(rewards, dtype=torch.float32),
        reward_components={k: torch.tensor(v, dtype=torch.float32) for k, v in comps.items()},
        truncated=torch.tensor([r[3] for r in rows]), prompts=prompt_rep, completions=texts, examples=ex_rep,
    )


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(z / tau)[target] and the entropy of softmax(z / tau), row by row, from logits z [n, V].

    Holds one [n, V] tensor, the logits themselves: the float32 softmax is formed a chunk of rows at a time, in
    the forward for the values and again in the backward for d logp / dz = (onehot - softmax) / tau, which is
    written over the saved logits (they are this function's alone, see `completion_logprobs`). The entropy is a
    metric: no gradient flows through it.
    """

    CHUNK_ELEMENTS = 1 << 22  # float32 temporaries of about 16 MiB

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temperature: float):  # noqa: ANN001, ANN205
        n, V = logits.shape
        logp = torch.empty(n, dtype=torch.float32, device=logits.device)
        entropy = torch.empty(n, dtype=torch.float32, device=logits.device)
        step = max(1, _TokenLogprobs.CHUNK_ELEMENTS // max(V, 1))
        for s in range(0, n, step):
            z = logits[s : s + step].float() / temperature  # [c, V]
            lse = z.logsumexp(-1)  # [c]
            p = (z - lse[:, None]).exp_()
            entropy[s : s + step] = lse - (p * z).sum(-1)
            logp[s : s + step] = z.gather(1, targets[s : s + step, None]).squeeze(1) - lse
        ctx.save_for_backward(logits, targets)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None):  # noqa: ANN001, ANN205
        if getattr(ctx, "consumed", False):
            raise RuntimeError("completion logprobs: backward runs once (the logits buffer holds the gradient)")
        ctx.consumed = True
        logits, targets = ctx.saved_tensors
        n, V = logits.shape
        tau = ctx.temperature
        g = grad_logp.float() / tau  # [n]
        step = max(1, _TokenLogprobs.CHUNK_ELEMENTS // max(V, 1))
        rows = torch.arange(min(step, n), device=logits.device)
        for s in range(0, n, step):
            z = logits[s : s + step].float() / tau
            p = z.softmax(-1).mul_(-g[s : s + step, None])  # -g * softmax
            p[rows[: p.shape[0]], targets[s : s + step]] += g[s : s + step]  # + g at the target
            logits[s : s + step] = p  # the gradient replaces the logits in place
        return logits, None, None


def completion_logprobs(model: torch.nn.Module, batch: RolloutBatch, temperature: float = 1.0,
                        micro_batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute log pi(o_t | q, o_<t) [N, L] (and per-token entropy [N, L]) with the training forward.

    Sequences are right-padded with their own positions from 0, so causal attention never sees padding.
    Logits are divided by the sampling temperature, as the engine's reported logprobs are. Rows go through the
    model in micro-batches of at most `micro_batch_size` x (the longest row) tokens, sorted by length and each
    trimmed to its own longest row (`token_budget_micro_batches`); the LM head runs on the real completion
    positions only. Padding positions of the results are 0.
    """
    N, L = batch.completion_ids.shape
    if N == 0:  # an empty batch (a data-parallel rank whose every group was dropped)
        return torch.zeros(0, L), torch.zeros(0, L)
    lengths = batch.row_lengths()
    budget = (micro_batch_size or N) * max(int(lengths.max()), 1)
    logprobs = torch.zeros(N, L)
    entropy = torch.zeros(N, L)
    for idx in token_budget_micro_batches(lengths, budget):
        part = batch.take(idx)
        lp, ent = _part_logprobs(model, part, temperature)
        logprobs = logprobs.index_put((idx,), torch.nn.functional.pad(lp, (0, L - lp.shape[1])))
        entropy[idx, : ent.shape[1]] = ent
    return logprobs, entropy


def _part_logprobs(model: torch.nn.Module, part: RolloutBatch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """completion_logprobs of one trimmed micro-batch: [n, L_part] each, 0 on padding."""
    n, L = part.completion_ids.shape
    hidden = model.hidden_states(part.input_ids)  # [n, T, D]
    row, t = part.completion_mask.ne(0).nonzero(as_tuple=True)  # the real completion tokens, row-major
    # the hidden state at position start-1+t predicts completion token t; the head runs on those positions only
    logits = model.lm_head(hidden[row, part.completion_start[row] - 1 + t])  # [tokens, V]
    if logits._base is not None:  # a head that returns a view: the backward overwrites its buffer, so own it
        logits = logits.clone()
    lp, ent = _TokenLogprobs.apply(logits, part.completion_ids[row, t], temperature)
    zeros = torch.zeros(n, L, dtype=lp.dtype)
    return zeros.index_put((row, t), lp), zeros.index_put((row, t), ent)
