"""Model internals: the two MLA paths, the paged-cache path, MoE dispatch and routing, MTP, dtypes and training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomise_

import r1forge
from r1forge.model import AttentionMetadata, DeepseekMoE, Router, SortedDispatch, build_model, causal_lm_loss


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((ref - out).norm() / ref.norm()).item()


def tiny_config(**overrides) -> r1forge.ModelConfig:
    return r1forge.ModelConfig.from_preset("tiny", vocab_size=128, num_hidden_layers=3, **overrides)


def tiny_model(seed: int = 0, with_mtp: bool = False, **overrides) -> r1forge.DeepseekForCausalLM:
    torch.manual_seed(seed)
    return randomise_(build_model(tiny_config(**overrides), with_mtp=with_mtp), seed=seed).eval()


@pytest.fixture(scope="module")
def model() -> r1forge.DeepseekForCausalLM:
    return tiny_model(n_shared_experts=2, num_experts_per_tok=3, n_group=4, topk_group=2)


# ---------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_absorbed_equals_naive_dense(q_lora_rank):
    model = tiny_model(seed=1, q_lora_rank=q_lora_rank)
    ids = torch.randint(0, 128, (3, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.set_attn_impl("naive")
        naive = model(ids)
        model.set_attn_impl("absorbed")
        absorbed = model(ids)
        model.set_attn_impl("naive")
    assert rel_err(naive, absorbed) < 1e-5
    with pytest.raises(ValueError, match="attn_impl"):
        model.set_attn_impl("flash")


class PagedRun:
    """Drives the paged path by hand: scattered block tables, flattened batches, one metadata object per step."""

    def __init__(self, model, final_lens: list[int], block_size: int, absorbed: bool) -> None:
        cfg = model.config
        self.model, self.block_size, self.absorbed = model, block_size, absorbed
        blocks_needed = [math.ceil(n / block_size) for n in final_lens]
        self.num_blocks = sum(blocks_needed) + 3  # spare blocks that must stay untouched
        pool = torch.randperm(self.num_blocks, generator=torch.Generator().manual_seed(7)).tolist()
        self.block_tables = []
        for n in blocks_needed:
            self.block_tables.append(pool[:n])
            pool = pool[n:]
        self.spare_blocks = pool
        width = cfg.latent_dim
        self.kv_caches = [torch.zeros(self.num_blocks, block_size, width) for _ in range(cfg.num_hidden_layers)]
        self.cached = [0] * len(final_lens)

    def step(self, new_tokens: list[list[int]]) -> list[torch.Tensor]:
        """Feed each sequence its new tokens (possibly none); returns per-sequence logits [q, V] of those tokens."""
        active = [b for b, toks in enumerate(new_tokens) if toks]
        ids = torch.tensor([t for b in active for t in new_tokens[b]])
        positions = torch.cat([torch.arange(self.cached[b], self.cached[b] + len(new_tokens[b])) for b in active])
        meta = AttentionMetadata.build(
            self.kv_caches, [self.block_tables[b] for b in active],
            context_lens=[self.cached[b] + len(new_tokens[b]) for b in active],
            query_lens=[len(new_tokens[b]) for b in active], block_size=self.block_size, device="cpu",
            absorbed=self.absorbed)
        with torch.no_grad():
            logits = self.model(ids, positions=positions, metadata=meta)  # [N, V]
        out, start = [], 0
        for b in active:
            n = len(new_tokens[b])
            out.append(logits[start : start + n])
            self.cached[b] += n
            start += n
        return out


@pytest.mark.parametrize("absorbed", [True, False], ids=["absorbed", "naive"])
def test_paged_cache_equals_full_forward_every_step(model, absorbed):
    """Chunked prefill, then decode one token at a time, over a cache whose blocks are scattered in the pool."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (5, 13, 1)]
    decode_steps = 5
    final_lens = [len(p) + decode_steps + 1 for p in prompts]
    run = PagedRun(model, final_lens, block_size=4, absorbed=absorbed)
    seqs = [list(p) for p in prompts]

    def check(fed: list[list[int]], outs: list[torch.Tensor]) -> None:
        got = torch.cat(outs)
        with torch.no_grad():
            ref = torch.cat([model(torch.tensor([seqs[b]]))[0, run.cached[b] - len(fed[b]) : run.cached[b]]
                             for b in range(len(seqs)) if fed[b]])
        assert rel_err(ref, got) < 1e-4

    # Step 0: sequence 1 is prefilled in two chunks (6 then 7 tokens), the others in one go.
    fed = [seqs[0], seqs[1][:6], seqs[2]]
    check(fed, run.step(fed))
    fed = [[], seqs[1][6:], []]
    check(fed, run.step(fed))
    for _ in range(decode_steps):
        fed = []
        for s in seqs:
            s.append(int(torch.randint(0, 128, (1,), generator=g)))
            fed.append([s[-1]])
        check(fed, run.step(fed))
    for layer_cache in run.kv_caches:
        assert layer_cache[run.spare_blocks].abs().sum() == 0, "a token was written outside its block table"


def test_attention_metadata_rejects_bad_tables():
    caches = [torch.zeros(4, 4, 8)]
    with pytest.raises(ValueError, match="block table"):
        AttentionMetadata.build(caches, [[0]], context_lens=[5], query_lens=[5], block_size=4, device="cpu")
    with pytest.raises(ValueError, match="new tokens"):
        AttentionMetadata.build(caches, [[0, 1]], context_lens=[3], query_lens=[4], block_size=4, device="cpu")


# ---------------------------------------------------------------------------------------------- MoE
def _moe(seed: int = 0, **overrides) -> DeepseekMoE:
    torch.manual_seed(seed)
    moe = DeepseekMoE(tiny_config(**overrides))
    return randomise_(moe, seed=seed).eval()


def dense_reference(x_TD, ids_TK, weights_TK, experts) -> torch.Tensor:
    """Every expert on every token, combined with a [T, E] matrix of gate weights (zero where not chosen)."""
    combine_TE = torch.zeros(x_TD.shape[0], len(experts))
    combine_TE.scatter_add_(1, ids_TK, weights_TK)
    outs_ETD = torch.stack([e(x_TD) for e in experts])
    return torch.einsum("te,etd->td", combine_TE, outs_ETD)


def test_sorted_dispatch_equals_dense_and_skips_unchosen_experts():
    moe = _moe()
    x = torch.randn(6, moe.config.hidden_size)
    ids = torch.tensor([[0, 3], [3, 5], [5, 0], [3, 0], [5, 3], [0, 5]])
    weights = torch.rand(6, 2)
    calls = {i: [] for i in range(len(moe.experts))}
    hooks = [e.register_forward_hook(lambda m, inp, out, i=i: calls[i].append(inp[0].shape[0]))
             for i, e in enumerate(moe.experts)]
    with torch.no_grad():
        got = SortedDispatch()(x, ids, weights, moe.experts)
    for h in hooks:
        h.remove()
    assert {i: c for i, c in calls.items() if c} == {0: [4], 3: [4], 5: [4]}, "each chosen expert runs once"
    with torch.no_grad():
        assert rel_err(dense_reference(x, ids, weights, moe.experts), got) < 1e-6


def test_moe_forward_is_shared_plus_routed():
    moe = _moe(seed=1, n_shared_experts=2, num_experts_per_tok=3, n_group=4, topk_group=2)
    x = torch.randn(2, 9, moe.config.hidden_size)
    with torch.no_grad():
        y = moe(x)
        x_TD = x.reshape(-1, x.shape[-1])
        ids, weights, _ = moe.gate(x_TD)
        ref = dense_reference(x_TD, ids, weights, moe.experts).view_as(x) + moe.shared_experts(x)
    assert rel_err(ref, y) < 1e-6
    assert moe.tokens_per_expert.tolist() == torch.bincount(ids.flatten(), minlength=8).tolist()
    assert moe.tokens_per_expert.sum() == 2 * 9 * 3


def _router(logits: list[float], **overrides) -> tuple[Router, torch.Tensor]:
    """A router whose logits for the returned single token are exactly `logits` (weight column 0, x = e_0)."""
    router = Router(tiny_config(**overrides))
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, 0] = torch.tensor(logits)
    x = torch.zeros(1, router.weight.shape[1])
    x[0, 0] = 1.0
    return router, x


def _logit(p: list[float]) -> list[float]:
    return [math.log(v / (1 - v)) for v in p]


def test_noaux_tc_group_mask_excludes_best_expert_in_weak_group():
    # Groups of two: group 0 holds the single best expert (0.99) but its top-2 sum (1.0) loses to groups 1 and 2.
    s = [0.99, 0.01, 0.6, 0.58, 0.55, 0.52, 0.1, 0.1]
    router, x = _router(_logit(s), n_group=4, topk_group=2, num_experts_per_tok=2, routed_scaling_factor=2.5)
    ids, weights, scores = router(x)
    assert sorted(ids[0].tolist()) == [2, 3]
    torch.testing.assert_close(scores[0], torch.tensor(s))
    # The correction bias changes which experts are picked (expert 5 and its group now win) ...
    with torch.no_grad():
        router.e_score_correction_bias[5] = 0.5
    ids_b, weights_b, _ = router(x)
    assert sorted(ids_b[0].tolist()) == [2, 5]
    # ... but not the gate values, which come from the unbiased scores (normalised, times the scaling factor).
    expected = torch.tensor([s[i] for i in ids_b[0].tolist()])
    torch.testing.assert_close(weights_b[0], expected / expected.sum() * 2.5)
    with torch.no_grad():
        router.e_score_correction_bias[0] = 5.0  # even a huge bias lifts group 0 (sum 5.99 + 0.01): expert 0 in
    assert 0 in router(x)[0][0].tolist()


def _brute_force_route(s_TE, bias_E, n_group, topk_group, k, group_score):
    ids = []
    for s in (s_TE + bias_E):
        groups = s.view(n_group, -1)
        g = groups.topk(2, dim=-1).values.sum(-1) if group_score == "top2" else groups.amax(-1)
        kept = set(g.topk(topk_group).indices.tolist())
        allowed = [e for e in range(len(s)) if e // groups.shape[1] in kept]
        ids.append(sorted(sorted(allowed, key=lambda e: -s[e])[:k]))
    return ids


@pytest.mark.parametrize("method", ["noaux_tc", "greedy", "group_limited_greedy"])
def test_router_methods_against_brute_force(method):
    scoring = "sigmoid" if method == "noaux_tc" else "softmax"
    groups = dict(n_group=1, topk_group=1) if method == "greedy" else dict(n_group=4, topk_group=2)
    torch.manual_seed(4)
    router = Router(tiny_config(scoring_func=scoring, topk_method=method, num_experts_per_tok=3,
                                norm_topk_prob=method == "noaux_tc", routed_scaling_factor=1.5, **groups))
    with torch.no_grad():
        router.weight.normal_(0, 1.0)
        if router.e_score_correction_bias is not None:
            router.e_score_correction_bias.normal_(0, 0.2)
    assert (router.e_score_correction_bias is None) == (method != "noaux_tc")
    x = torch.randn(40, router.weight.shape[1])
    ids, weights, s = router(x)
    logits = x @ router.weight.T
    torch.testing.assert_close(s, logits.sigmoid() if scoring == "sigmoid" else logits.softmax(-1))
    bias = router.e_score_correction_bias if method == "noaux_tc" else torch.zeros(8)
    expected_ids = _brute_force_route(s, bias, groups["n_group"], groups["topk_group"], 3,
                                      "top2" if method == "noaux_tc" else "max")
    assert [sorted(row) for row in ids.tolist()] == expected_ids
    gate = s.gather(1, ids)
    if method == "noaux_tc":
        gate = gate / gate.sum(-1, keepdim=True)
    torch.testing.assert_close(weights, gate * 1.5)


# ---------------------------------------------------------------------------------------------- MTP
def test_mtp_logits_shapes_and_dependencies():
    model = tiny_model(seed=2, with_mtp=True, num_nextn_predict_layers=2)
    assert model.num_mtp == 2
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base = model.mtp_logits(model.model(ids), ids)
    assert [tuple(t.shape) for t in base] == [(2, 11, 128), (2, 10, 128)]
    i = 4
    for k in (1, 2):
        changed = ids.clone()
        changed[:, i + k] = (changed[:, i + k] + 1) % 128
        with torch.no_grad():
            out = model.mtp_logits(model.model(changed), changed)[k - 1]
        # Depth k at position i sees token i + k (its input embedding) ...
        assert (out[:, i] - base[k - 1][:, i]).abs().max() > 1e-3
        # ... and nothing at positions before i depends on it (causal).
        torch.testing.assert_close(out[:, :i], base[k - 1][:, :i], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- dtype, training
def test_bf16_model_keeps_router_in_float32():
    torch.manual_seed(0)
    model = build_model(tiny_config(), dtype=torch.bfloat16, with_mtp=True)
    routers = [m for m in model.modules() if isinstance(m, Router)]
    assert len(routers) == 3  # two MoE layers and the MTP module
    for name, p in model.named_parameters():
        expected = torch.float32 if name.endswith("mlp.gate.weight") else torch.bfloat16
        assert p.dtype == expected, name
    assert all(r.e_score_correction_bias.dtype == torch.float32 for r in routers)
    with torch.no_grad():
        logits = model(torch.randint(0, 128, (2, 7)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("scoring_func", ["sigmoid", "softmax"])
def test_router_scores_stay_float32_under_autocast(scoring_func):
    """Autocast would run the router's matmul in bf16: scores that move by ~1e-2 flip near-tied top-k choices."""
    router = Router(tiny_config(scoring_func=scoring_func))
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(33, router.weight.shape[1], generator=torch.Generator().manual_seed(0))
    plain = router.scores(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.linear(x, router.weight).dtype == torch.bfloat16  # what an unprotected router would get
        scores = router.scores(x)
        ids, weights, _ = router(x.bfloat16())
    assert scores.dtype == torch.float32 and weights.dtype == torch.float32
    torch.testing.assert_close(scores, plain, rtol=0, atol=0)
    torch.testing.assert_close(ids, router(x.bfloat16())[0], rtol=0, atol=0)


def _training_loss(model, ids: torch.Tensor, mtp_weight: float = 0.3) -> torch.Tensor:
    hidden = model.model(ids)
    loss = causal_lm_loss(model.lm_head(hidden)[:, :-1], ids[:, 1:])
    for k, logits in enumerate(model.mtp_logits(hidden, ids), start=1):
        loss = loss + mtp_weight * causal_lm_loss(logits[:, :-1], ids[:, k + 1 :])
    return loss + sum(m.aux_loss for m in model.moe_layers() if m.aux_loss is not None)


def test_gradients_reach_every_parameter_but_not_the_bias():
    model = tiny_model(seed=3, with_mtp=True, num_nextn_predict_layers=1).train()
    for moe in model.moe_layers():
        moe.aux_loss_alpha = 1e-3
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(6))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    biases = {n: b.clone() for n, b in model.named_buffers() if "e_score_correction_bias" in n}
    assert biases and not any(b.requires_grad for b in model.buffers())
    loss = _training_loss(model, ids)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient for {missing}"
    torch.optim.SGD(model.parameters(), lr=1e-2).step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, f"parameters not updated: {unchanged}"
    for n, b in model.named_buffers():
        if n in biases:
            assert torch.equal(b, biases[n]) and b.grad is None, n


def test_sequence_aux_loss_is_positive_differentiable_and_matches_formula():
    model = tiny_model(seed=4, n_group=1, topk_group=1).train()
    moe = model.moe_layers()[0]
    moe.aux_loss_alpha = 0.01
    captured = {}
    hook = moe.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0].detach()))
    model(torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(7)))
    hook.remove()
    aux = moe.aux_loss
    assert aux is not None and aux.item() > 0 and aux.requires_grad
    # alpha * mean over sequences of sum_i f_i P_i, computed one sequence at a time.
    with torch.no_grad():
        expected = []
        E, K = 8, moe.gate.top_k
        for x in captured["x"]:  # [T, D]
            ids, _, s = moe.gate(x)
            f = torch.bincount(ids.flatten(), minlength=E).float() * E / (K * x.shape[0])
            p = (s / s.sum(-1, keepdim=True)).mean(0)
            expected.append((f * p).sum())
    assert aux.item() == pytest.approx(0.01 * torch.stack(expected).mean().item(), rel=1e-5)
    model.zero_grad()
    aux.backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in moe.experts.parameters()), "the balance loss only trains the router"
    model.eval()
    model(torch.randint(0, 128, (1, 4)))
    assert moe.aux_loss is None, "no aux loss outside training"


def test_fused_gate_up_is_one_matmul_over_the_same_parameters() -> None:
    """Under inference mode an MLP runs gate and up as one matmul over one buffer whose rows are the two
    parameters: same output (fp32 rounding), same Parameter objects, and training afterwards still updates them."""
    from r1forge.model.moe import MLP
    from r1forge.model.moe_static import fused_gate_up

    torch.manual_seed(0)
    mlp = MLP(16, 8)
    x = torch.randn(5, 16)
    gate, up = mlp.gate_proj.weight, mlp.up_proj.weight
    expected = mlp(x).detach()
    with torch.inference_mode():
        fused_out = mlp(x)
    torch.testing.assert_close(fused_out, expected, rtol=1e-5, atol=1e-6)
    assert mlp.gate_proj.weight is gate and mlp.up_proj.weight is up
    fused = fused_gate_up(mlp.gate_proj, mlp.up_proj)
    assert fused.data_ptr() == gate.data_ptr() and fused.shape == (16, 16)
    torch.testing.assert_close(fused[8:], up.detach(), rtol=0, atol=0)
    mlp(x).sum().backward()  # the training path still reaches both parameters
    assert gate.grad is not None and up.grad is not None
    torch.optim.SGD(mlp.parameters(), lr=0.1).step()
    with torch.inference_mode():
        torch.testing.assert_close(mlp(x), mlp.down_proj(torch.nn.functional.silu(x @ gate.t()) * (x @ up.t())), rtol=1e-5, atol=1e-6)
    other = torch.nn.Linear(16, 8, bias=False).to(torch.float64)
    assert fused_gate_up(mlp.gate_proj, other) is None  # differing dtypes cannot share one buffer


def test_latent_mqa_on_the_cpu_equals_sdpa() -> None:
    """The CPU's two-bmm latent attention (mask broadcast over heads) equals SDPA on the per-head mask."""
    from r1forge.model.mla import latent_mqa

    torch.manual_seed(0)
    B, Q, H, C, R, S = 3, 2, 4, 8, 4, 7
    q, latent = torch.randn(B, Q, H, C + R), torch.randn(B, S, C + R)
    mask = torch.rand(B, Q, S) > 0.4
    mask[..., 0] = True
    heads_mask = mask[:, :, None].expand(-1, -1, H, -1).reshape(B, 1, Q * H, S)
    kv = latent[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(q.reshape(B, 1, Q * H, C + R), kv, kv[..., :C],
                                                           attn_mask=heads_mask, scale=0.3).view(B, Q, H, C)
    torch.testing.assert_close(latent_mqa(q, latent, mask, 0.3, C), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_with_narrower_value_equals_plain_sdpa_with_gradients(masked: bool) -> None:
    """MLA's training / prefill attention with v zero-padded to the key width (SDPA's flash kernel on the CPU)
    against SDPA on the unpadded v (its math path): the same output and the same q, k, v gradients to float
    rounding, causal and with a padding mask, and the fused kernel really is the one that runs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from r1forge.model.mla import attention_with_narrower_value

    torch.manual_seed(0)
    B, H, T, Dq, Dv = 3, 4, 10, 12, 8
    q, k, v = (torch.randn(B, H, T, d, requires_grad=True) for d in (Dq, Dq, Dv))
    mask = torch.ones(B, 1, T, T, dtype=torch.bool).tril() if masked else None
    if masked:
        mask[1, :, :, :3] = False  # a left-padded row: its first keys are not attended
        mask[1, :, :3, 0] = True  # (the padded queries keep one key, as the engine's masks do)
    grad = torch.randn(B, H, T, Dv)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # would raise if the padded call fell back to the math path
        out = attention_with_narrower_value(q, k, v, mask, 0.3)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=0.3)
    theirs = torch.autograd.grad(ref, (q, k, v), grad)
    assert out.shape == (B, H, T, Dv)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_per_head_matmul_equals_the_einsum_it_replaced() -> None:
    """Absorption's per-head products (W_UK into the query, W_UV after attention) equal the einsums they replaced
    bit for bit, on strided per-head views of kv_b_proj's weight as absorbed_weights returns them."""
    from r1forge.model.mla import per_head_matmul

    torch.manual_seed(0)
    B, Q, H, Dn, Dv, C = 3, 5, 4, 8, 6, 16
    w = torch.randn(H, Dn + Dv, C)
    w_uk, w_uv = w[:, :Dn], w[:, Dn:]
    q_nope, o = torch.randn(B, Q, H, Dn), torch.randn(B, Q, H, C)
    assert torch.equal(per_head_matmul(q_nope, w_uk), torch.einsum("bqhd,hdc->bqhc", q_nope, w_uk))
    assert torch.equal(per_head_matmul(o, w_uv.transpose(1, 2)), torch.einsum("bqhc,hvc->bqhv", o, w_uv))
    assert per_head_matmul(q_nope[:, 0], w_uk).shape == (B, H, C)  # any leading shape
