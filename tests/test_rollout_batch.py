"""RolloutBatch.select: completions kept by a mask, every field rebuilt by name (no positional reconstruction)."""

from __future__ import annotations

import dataclasses

import torch

from r1forge.rl.rollout import RolloutBatch


def _batch(n: int = 4, length: int = 3) -> RolloutBatch:
    return RolloutBatch(
        input_ids=torch.arange(n * (length + 2)).view(n, length + 2), completion_start=torch.full((n,), 2),
        completion_ids=torch.arange(n * length).view(n, length), completion_mask=torch.ones(n, length),
        old_logprobs=-torch.rand(n, length), rewards=torch.arange(n, dtype=torch.float32),
        reward_components={"accuracy": torch.arange(n, dtype=torch.float32) * 10},
        truncated=torch.tensor([i % 2 == 0 for i in range(n)]), prompts=[f"p{i}" for i in range(n)],
        completions=[f"c{i}" for i in range(n)], examples=[{"answer": str(i)} for i in range(n)],
    )


def test_select_keeps_every_field_of_the_chosen_rows():
    batch = _batch()
    keep = torch.tensor([False, True, False, True])
    part = batch.select(keep)
    assert part.num_completions == 2
    for f in dataclasses.fields(RolloutBatch):
        full, got = getattr(batch, f.name), getattr(part, f.name)
        if isinstance(full, torch.Tensor):
            assert torch.equal(got, full[keep]), f.name
        elif isinstance(full, dict):
            assert got.keys() == full.keys() and all(torch.equal(got[k], full[k][keep]) for k in full), f.name
        else:
            assert got == [full[1], full[3]], f.name
