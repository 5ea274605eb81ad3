"""The engine's per-step host work after issue 17 gives what it gave before.

- The sampler's fast paths (no filter pass when top-k/top-p/min-p are off, one uniform per sampled row, seeded
  rows from their own generators, one search over every row's cumulative sums): the same tokens and logprobs
  for the same per-request seeds as `_reference_sample`, which filters every row and samples each alone.
- `AttentionMetadata.build` with tensor ops over all sequences: the same tensors as `_reference_build`, the
  per-sequence loop it replaced.
"""

from __future__ import annotations

import random

import pytest
import torch

from r1forge.engine.sampler import apply_penalties, filter_logits, sample
from r1forge.engine.sampling_params import SamplingParams
from r1forge.engine.sequence import Sequence
from r1forge.model.attention_metadata import AttentionMetadata


def _reference_sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float]]:
    logits = logits.float()
    params = [s.params for s in seqs]
    for i, s in enumerate(seqs):
        if s.num_output_tokens < s.params.min_tokens:
            stop_ids = list(s.params.stop_token_ids) + ([s.eos_token_id] if s.eos_token_id is not None else [])
            if stop_ids:
                logits[i, stop_ids] = float("-inf")
    if any(p.uses_penalties for p in params):
        logits = apply_penalties(logits, seqs)
    temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params])
    scaled = logits / temps[:, None]
    logprobs_all = scaled.log_softmax(dim=-1)
    greedy_rows = torch.tensor([p.greedy for p in params])
    tokens = scaled.argmax(dim=-1)
    if not bool(greedy_rows.all()):
        filtered = filter_logits(scaled, torch.tensor([p.top_k for p in params]),
                                 torch.tensor([p.top_p for p in params]), torch.tensor([p.min_p for p in params]))
        probs = filtered.softmax(dim=-1)
        for i, s in enumerate(seqs):  # row by row: inverse transform sampling with the row's own generator
            if not params[i].greedy:
                u = float(torch.rand(1, generator=s.generator, dtype=torch.float64))
                cdf = probs[i].double().cumsum(0)
                tokens[i] = int((cdf <= u * float(cdf[-1])).sum())
    return tokens.tolist(), logprobs_all.gather(1, tokens[:, None]).squeeze(1).tolist()


def _params(rng: random.Random, seed: int) -> SamplingParams:
    kind = rng.choice(["greedy", "plain", "plain", "top_k", "top_p", "min_p", "all", "penalty"])
    p = SamplingParams(temperature=0.0 if kind == "greedy" else rng.choice([0.7, 1.0, 1.3]), seed=seed, max_tokens=8)
    if kind in ("top_k", "all"):
        p.top_k = rng.choice([1, 5, 40])
    if kind in ("top_p", "all"):
        p.top_p = rng.choice([0.5, 0.9])
    if kind in ("min_p", "all"):
        p.min_p = 0.05
    if kind == "penalty":
        p.repetition_penalty, p.frequency_penalty = 1.2, 0.3
    return p


def _seqs(params: list[SamplingParams], vocab: int) -> list[Sequence]:
    seqs = []
    for i, p in enumerate(params):
        g = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
        s = Sequence(f"r{i}", 0, [3, 4, 5 + i], p, 0.0, g)
        s.token_ids += [7, (11 * i) % vocab]
        s.eos_token_id = 2
        seqs.append(s)
    return seqs


@pytest.mark.parametrize("mix", ["every kind", "plain only", "filters only"])
def test_seeded_rows_sample_what_the_reference_sampler_sampled(mix: str) -> None:
    """Ten steps of a batch of 12 seeded requests (greedy, plain, filtered, penalised, mixed): every token and
    logprob equals the reference's, drawn from twin generators."""
    rng = random.Random(0)
    vocab = 300
    params = [_params(rng, seed=1000 + i) for i in range(12)]
    if mix == "plain only":
        params = [SamplingParams(temperature=1.0, seed=1000 + i, max_tokens=8) for i in range(12)]
    elif mix == "filters only":
        params = [SamplingParams(temperature=0.9, top_p=0.8, top_k=50, seed=1000 + i, max_tokens=8) for i in range(12)]
    ours, theirs = _seqs(params, vocab), _seqs(params, vocab)
    g = torch.Generator().manual_seed(5)
    for _ in range(10):
        logits = torch.randn(len(params), vocab, generator=g) * 3
        got = sample(logits.clone(), ours)
        want_tokens, want_logprobs = _reference_sample(logits.clone(), theirs)
        assert got.token_ids == want_tokens
        assert got.logprobs == pytest.approx(want_logprobs, abs=1e-6)
        for a, b, t in zip(ours, theirs, want_tokens):
            a.token_ids.append(t)
            b.token_ids.append(t)


def test_unseeded_rows_still_follow_the_distribution() -> None:
    """Unseeded sampled rows beside greedy and seeded ones: their tokens are drawn from softmax(logits / T)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(3, 1)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=3), SamplingParams(temperature=1.0)]
    counts = torch.zeros(4)
    torch.manual_seed(0)
    for _ in range(4000):
        result = sample(logits.clone(), _seqs(params, 4))
        assert result.token_ids[0] == 0
        counts[result.token_ids[2]] += 1
    assert torch.allclose(counts / counts.sum(), logits[0].softmax(-1), atol=0.03)


def test_draw_tokens_follows_each_rows_distribution_and_never_picks_a_filtered_token() -> None:
    """Seeded and unseeded rows of one batch, one with zeros (a filtered vocabulary) and one unnormalised: the
    frequencies match each row's normalised probabilities, and no zero-probability token is ever drawn."""
    from r1forge.engine.sampler import draw_tokens

    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125, 0.0],
                          [0.0, 0.0, 0.7, 0.0, 0.3],
                          [2.0, 0.0, 1.0, 1.0, 0.0]])  # the last sums to 4 (a residual p - q need not sum to 1)
    gens = [torch.Generator().manual_seed(11), None, torch.Generator().manual_seed(12)]
    torch.manual_seed(0)
    counts = torch.zeros(3, 5)
    for _ in range(6000):
        counts[torch.arange(3), draw_tokens(probs, gens)] += 1
    assert (counts[probs == 0] == 0).all()
    torch.testing.assert_close(counts / 6000, probs / probs.sum(-1, keepdim=True), atol=0.02, rtol=0)


def _reference_build(block_tables: list[list[int]], context_lens: list[int], query_lens: list[int],
                     block_size: int) -> dict[str, torch.Tensor]:
    num_seqs = len(context_lens)
    max_q, max_s = max(query_lens), max(context_lens)
    slot_mapping: list[int] = []
    query_index = torch.zeros(num_seqs, max_q, dtype=torch.long)
    query_valid = torch.zeros(num_seqs, max_q, dtype=torch.bool)
    kv_slots = torch.zeros(num_seqs, max_s, dtype=torch.long)
    start = 0
    for b, (table, ctx, q) in enumerate(zip(block_tables, context_lens, query_lens)):
        blocks = torch.tensor(table, dtype=torch.long)
        pos = torch.arange(ctx)
        slots = blocks[pos // block_size] * block_size + pos % block_size
        kv_slots[b, :ctx] = slots
        slot_mapping.extend(slots[ctx - q:].tolist())
        query_index[b, :q] = torch.arange(start, start + q)
        query_valid[b, :q] = True
        start += q
    q_pos = (torch.tensor(context_lens) - torch.tensor(query_lens))[:, None] + torch.arange(max_q)[None, :]
    attn_mask = (torch.arange(max_s)[None, None, :] <= q_pos[:, :, None]) & query_valid[:, :, None]
    attn_mask[:, :, 0] |= ~query_valid
    return dict(slot_mapping=torch.tensor(slot_mapping, dtype=torch.long), query_index=query_index,
                query_valid=query_valid, kv_slots=kv_slots, attn_mask=attn_mask)


@pytest.mark.parametrize("case", range(6))
def test_attention_metadata_equals_the_per_sequence_construction(case: int) -> None:
    """Decodes, prefills, chunked prefills and mixes over shuffled blocks (tables of different lengths, some
    with spare blocks): every index tensor and the mask are equal to the loop's."""
    rng = random.Random(case)
    block_size = rng.choice([1, 4, 16])
    num_seqs = rng.randint(1, 9)
    pool = list(range(1000))
    rng.shuffle(pool)
    tables, contexts, queries = [], [], []
    for _ in range(num_seqs):
        ctx = rng.randint(1, 70)
        q = 1 if case == 0 else rng.choice([1, ctx, rng.randint(1, ctx)])
        n_blocks = -(-ctx // block_size) + rng.choice([0, 0, 1])
        tables.append([pool.pop() for _ in range(n_blocks)])
        contexts.append(ctx)
        queries.append(q)
    got = AttentionMetadata.build([], tables, contexts, queries, block_size, "cpu")
    want = _reference_build(tables, contexts, queries, block_size)
    for name, tensor in want.items():
        assert torch.equal(getattr(got, name), tensor), name
    assert got.decode == (max(queries) == 1)


def test_attention_metadata_refuses_bad_lengths() -> None:
    with pytest.raises(ValueError, match="sequence 1: 3 new tokens but only 2"):
        AttentionMetadata.build([], [[0], [1]], [1, 2], [1, 3], 4, "cpu")
    with pytest.raises(ValueError, match="sequence 0: block table of 1 blocks cannot hold 5"):
        AttentionMetadata.build([], [[0]], [5], [1], 4, "cpu")


@pytest.mark.parametrize("row_shape", [(), (6,), (2, 3, 4)])
def test_rows_at_equals_advanced_indexing_bit_for_bit(row_shape: tuple[int, ...]) -> None:
    """The cache and query gathers (`index_select` over the flattened index) give exactly `x[index]`, for the
    engine's index shapes: [B, S] slots, [B, Q] queries, and a 1-D order; a non-contiguous source included."""
    from r1forge.model.attention_metadata import rows_at

    torch.manual_seed(0)
    x = torch.randn(40, *row_shape, 2)[..., 0]  # a strided view, as q_nope is of q
    for index in (torch.randint(0, 40, (5, 9)), torch.randint(0, 40, (3, 1)), torch.randperm(40)):
        got = rows_at(x, index)
        assert got.shape == (*index.shape, *row_shape)
        assert torch.equal(got, x[index])


def test_metadata_gathers_read_each_sequences_slots_and_queries() -> None:
    """`gather_cached` reads each sequence's kv_slots (cached prefix + new tokens) and `gather_queries` its new
    tokens, padding rows repeating token 0, as the attention layers index them."""
    block_size, width = 4, 3
    caches = [torch.randn(6, block_size, width)]
    md = AttentionMetadata.build(caches, [[2, 5], [1]], context_lens=[6, 3], query_lens=[2, 3],
                                 block_size=block_size, device="cpu")
    flat = caches[0].view(-1, width)
    cached = md.gather_cached(flat)
    assert cached.shape == (2, 6, width)
    assert torch.equal(cached[0], torch.cat([caches[0][2], caches[0][5, :2]]))  # blocks 2 then 5
    assert torch.equal(cached[1, :3], caches[0][1, :3])
    new_tokens = torch.arange(5.0)[:, None].expand(5, 7)  # sequence 0's two tokens, then sequence 1's three
    queries = md.gather_queries(new_tokens)
    assert queries[:, :, 0].tolist() == [[0.0, 1.0, 0.0], [2.0, 3.0, 4.0]]  # sequence 0 padded with token 0
