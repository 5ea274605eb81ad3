"""GRPO's training pass without padding work (issue 17): micro-batches by a token budget over length-sorted rows,
each trimmed to its own longest row, the LM head on completion positions only, logprobs from one [tokens, V]
buffer. The loss and every gradient equal the padded computation the trainer did before (reproduced here)."""

from __future__ import annotations

import copy

import pytest
import torch

from r1forge import ModelConfig, build_model
from r1forge.rl.config import GRPOConfig
from r1forge.rl.grpo_loss import grpo_loss
from r1forge.rl.rollout import RolloutBatch, _TokenLogprobs, completion_logprobs, token_budget_micro_batches
from r1forge.rl.trainer import GRPOTrainer

VOCAB = 96


class _Tok:
    pad_token_id, bos_token_id, eos_token_id, vocab_size = 0, 1, 2, VOCAB

    def encode(self, text: str) -> list[int]:
        return [3 + b % (VOCAB - 3) for b in text.encode()]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(48 + i % 10) for i in ids)


def _policy(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = ModelConfig.from_preset("tiny", vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                     num_nextn_predict_layers=0)
    return build_model(config)


def _batch(n: int = 10, seed: int = 0) -> RolloutBatch:
    """Rows of different prompt and completion lengths (one empty completion), right-padded with garbage."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(2, 9, (n,), generator=g)
    comp_lens = torch.randint(1, 14, (n,), generator=g)
    comp_lens[3] = 0
    T, L = int((prompt_lens + comp_lens).max()), int(comp_lens.max())
    input_ids = torch.randint(3, VOCAB, (n, T), generator=g)  # the padding is junk tokens: nothing may read it
    completion_ids = torch.randint(3, VOCAB, (n, L), generator=g)
    mask = (torch.arange(L)[None] < comp_lens[:, None]).float()
    for i in range(n):
        p, c = int(prompt_lens[i]), int(comp_lens[i])
        input_ids[i, p : p + c] = completion_ids[i, :c]
    return RolloutBatch(
        input_ids=input_ids, completion_start=prompt_lens, completion_ids=completion_ids, completion_mask=mask,
        old_logprobs=torch.where(mask.bool(), -torch.rand(n, L, generator=g) * 5, torch.full((n, L), 7.0)),
        rewards=torch.rand(n, generator=g), reward_components={}, truncated=comp_lens == L,
        prompts=[""] * n, completions=[""] * n, examples=[{}] * n,
    )


def _padded_logprobs(model: torch.nn.Module, batch: RolloutBatch, temperature: float):  # noqa: ANN202
    """completion_logprobs before issue 17: the whole padded rows, the head on all L positions, log_softmax."""
    ids = batch.input_ids
    L = batch.completion_ids.shape[1]
    hidden = model.model(ids)
    pos = (batch.completion_start[:, None] - 1 + torch.arange(L)[None, :]).clamp(max=ids.shape[1] - 1)
    picked = hidden.gather(1, pos[:, :, None].expand(-1, -1, hidden.shape[-1]))
    logp = (model.lm_head(picked).float() / temperature).log_softmax(-1)
    return logp.gather(2, batch.completion_ids[:, :, None]).squeeze(2), -(logp.exp() * logp).sum(-1).detach()


def _padded_pass(model: torch.nn.Module, batch: RolloutBatch, advantages: torch.Tensor, mask: torch.Tensor,
                 ref_logprobs: torch.Tensor | None, cfg: GRPOConfig) -> float:
    """The trainer's loop before issue 17: micro_batch_size rows at a time in batch order, every micro-batch
    padded to the batch's longest row and longest completion. Leaves the gradients in `.grad`."""
    N = batch.num_completions
    total_tokens = mask.sum().clamp(min=1)
    mb = cfg.micro_batch_size
    loss_sum = 0.0
    for s in range(0, N, mb):
        part = batch.select(torch.zeros(N, dtype=torch.bool).index_fill_(0, torch.arange(s, min(s + mb, N)), True))
        m = mask[s : s + mb]
        logprobs, _ = _padded_logprobs(model, part, cfg.temperature)
        ref = None if ref_logprobs is None else ref_logprobs[s : s + mb]
        loss, _ = grpo_loss(logprobs, part.old_logprobs, advantages[s : s + mb], m, ref_logprobs=ref, beta=cfg.beta,
                            epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, loss_type=cfg.loss_type,
                            max_completion_length=m.shape[1])
        weight = m.sum() / total_tokens if cfg.loss_type in ("bnpo", "dapo") else torch.tensor(part.num_completions / N)
        (loss * weight).backward()
        loss_sum += (loss * weight).item()
    return loss_sum


def test_token_budget_micro_batches_cover_every_row_within_the_budget() -> None:
    lengths = torch.tensor([5, 40, 7, 7, 12, 3, 40, 1, 90])
    batches = token_budget_micro_batches(lengths, budget=80)
    rows = torch.cat(batches)
    assert sorted(rows.tolist()) == list(range(len(lengths)))
    assert lengths[rows].tolist() == sorted(lengths.tolist(), reverse=True)  # longest first
    for b in batches:
        assert len(b) == 1 or len(b) * int(lengths[b].max()) <= 80  # a row over the budget goes alone
    assert [len(b) for b in batches] == [1, 2, 6]  # 90 | 40 40 | 12 7 7 5 3 1 (6 x 12 <= 80)
    assert token_budget_micro_batches(lengths, budget=10_000)[0].shape == (9,)


def test_take_trims_to_the_rows_own_lengths() -> None:
    batch = _batch()
    idx = torch.tensor([3, 0, 5])
    part = batch.take(idx)
    lengths = batch.row_lengths()[idx]
    assert part.input_ids.shape == (3, int(lengths.max()))
    assert part.completion_ids.shape[1] == int(batch.completion_mask[idx].sum(1).max())
    assert torch.equal(part.input_ids, batch.input_ids[idx, : part.input_ids.shape[1]])
    assert torch.equal(part.rewards, batch.rewards[idx])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_equal_log_softmax(temperature: float) -> None:
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 50, generator=g) * 3).requires_grad_()
    targets = torch.randint(0, 50, (37,), generator=g)
    w = torch.randn(37, generator=g)
    _TokenLogprobs.CHUNK_ELEMENTS, chunk = 500, _TokenLogprobs.CHUNK_ELEMENTS  # several chunks of 10 rows
    try:
        lp, ent = _TokenLogprobs.apply(logits * 1.0, targets, temperature)  # * 1.0: its own buffer, as in use
        (lp * w).sum().backward()
    finally:
        _TokenLogprobs.CHUNK_ELEMENTS = chunk
    grad, logits.grad = logits.grad, None
    ref = (logits / temperature).log_softmax(-1)
    ref_lp = ref.gather(1, targets[:, None]).squeeze(1)
    (ref_lp * w).sum().backward()
    torch.testing.assert_close(lp, ref_lp, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ent, -(ref.exp() * ref).sum(-1).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, logits.grad, atol=1e-6, rtol=1e-6)
    assert not ent.requires_grad


def test_completion_logprobs_equal_the_padded_computation() -> None:
    model = _policy()
    batch = _batch()
    with torch.no_grad():
        ref_lp, ref_ent = _padded_logprobs(model, batch, 0.8)
        for mb in (None, 3):
            lp, ent = completion_logprobs(model, batch, 0.8, mb)
            m = batch.completion_mask.bool()
            assert (lp[m] - ref_lp[m]).abs().max() < 1e-5 and (ent[m] - ref_ent[m]).abs().max() < 1e-5
            assert (lp[~m] == 0).all() and (ent[~m] == 0).all()


@pytest.mark.parametrize("loss_type,beta,mask_truncated", [("grpo", 0.0, False), ("dapo", 0.0, True),
                                                           ("bnpo", 0.04, False), ("dr_grpo", 0.04, True)])
def test_training_pass_loss_and_gradients_equal_the_padded_pass(loss_type: str, beta: float,
                                                                mask_truncated: bool) -> None:
    """The trainer's pass (sorted, token-budget micro-batches, trimmed) against the old one (batch order, 3 rows
    each padded to the batch's longest row): the same loss, the same gradient of every parameter."""
    model = _policy()
    reference = copy.deepcopy(model)
    cfg = GRPOConfig(steps=1, prompts_per_step=5, num_generations=2, micro_batch_size=3, max_grad_norm=1e9,
                     learning_rate=1e-3, temperature=0.8, loss_type=loss_type, beta=beta, epsilon_high=0.28,
                     bias_update_gamma=0.0)
    trainer = GRPOTrainer(model, _Tok(), cfg, lambda p, c, **e: (0.0, {}), [{"question": "q"}])
    batch = _batch()
    advantages = torch.randn(batch.num_completions, generator=torch.Generator().manual_seed(1))
    mask = batch.completion_mask.clone()
    if mask_truncated:
        mask = mask * (~batch.truncated).float()[:, None]
    ref_logprobs = None
    if beta > 0:
        with torch.no_grad():
            ref_logprobs = _padded_logprobs(_policy(seed=5), batch, cfg.temperature)[0]
            new_ref = completion_logprobs(_policy(seed=5), batch, cfg.temperature, cfg.micro_batch_size)[0]
        assert (new_ref - ref_logprobs)[batch.completion_mask.bool()].abs().max() < 1e-5
    model.train()
    reference.train()
    expected = _padded_pass(reference, batch, advantages, mask, ref_logprobs, cfg)
    metrics = trainer._optimise(batch, advantages, mask, ref_logprobs)  # clipping off: .grad stays the raw gradient
    assert metrics["loss"] == pytest.approx(expected, abs=1e-6)
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        want = grads[name].grad
        if want is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        torch.testing.assert_close(p.grad, want, atol=1e-6, rtol=1e-5, msg=name)
