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


def completion_logprobs(model: torch.nn.Module, batch: RolloutBatch, temperature: float = 1.0,
                        micro_batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute log pi(o_t | q, o_<t) [N, L] (and per-token entropy [N, L]) with the training forward.

    Sequences are right-padded with their own positions from 0, so causal attention never sees padding.
    Logits are divided by the sampling temperature, as the engine's reported logprobs are.
    """
    N, L = batch.completion_ids.shape
    mb = micro_batch_size or max(N, 1)
    lps, ents = [], []
    offsets = torch.arange(L)
    for s in range(0, N, mb):
        ids = batch.input_ids[s : s + mb]
        hidden = model.model(ids)  # [n, T, D]
        # the hidden state at position start-1+t predicts completion token t; the head runs on those positions only
        pos = (batch.completion_start[s : s + mb, None] - 1 + offsets[None, :]).clamp(max=ids.shape[1] - 1)
        picked = hidden.gather(1, pos[:, :, None].expand(-1, -1, hidden.shape[-1]))  # [n, L, D]
        logp = (model.lm_head(picked).float() / temperature).log_softmax(-1)  # [n, L, V]
        lps.append(logp.gather(2, batch.completion_ids[s : s + mb, :, None]).squeeze(2))
        with torch.no_grad():
            ents.append(-(logp.exp() * logp).sum(-1))
    if not lps:  # an empty batch (a data-parallel rank whose every group was dropped)
        return torch.zeros(0, L), torch.zeros(0, L)
    return torch.cat(lps), torch.cat(ents)
