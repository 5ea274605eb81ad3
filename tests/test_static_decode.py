"""Fixed-shape decode steps (the path CUDA graphs and torch.compile run): same tokens and logprobs as the
default engine, padding that touches only the null block, graph-safe MoE dispatchers equal to the sorted one,
and the model left as it was for training."""

from __future__ import annotations

import pytest
import torch

import r1forge
from conftest import randomise_
from r1forge import LLM, SamplingParams
from r1forge.engine import EngineConfig
from r1forge.engine.static_decode import batch_buckets, block_buckets
from r1forge.model.moe import SortedDispatch
from r1forge.model.moe_static import DenseDispatch, GroupedGemmDispatch, grouped_gemm_supported, stack_expert_weights

VOCAB = 256
BLOCK = 16


def _model(seed: int = 0) -> r1forge.DeepseekForCausalLM:
    torch.manual_seed(seed)
    cfg = r1forge.ModelConfig.from_preset("tiny", vocab_size=VOCAB, num_hidden_layers=3, max_position_embeddings=512)
    # Large random weights: decisive argmaxes, so greedy comparisons test the math.
    return randomise_(r1forge.build_model(cfg), std=0.3).eval()


@pytest.fixture(scope="module")
def model() -> r1forge.DeepseekForCausalLM:
    return _model()


def _prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _static_llm(model, max_num_seqs: int = 8, kv_cache_memory: int | None = None, compile: bool = False) -> LLM:
    """An LLM that takes the fixed-shape decode path (eager unless compile is asked for)."""
    return LLM(model, max_num_seqs=max_num_seqs, block_size=BLOCK, kv_cache_memory=kv_cache_memory,
               static_decode=True, compile=compile)


def _assert_same_outputs(ours, reference) -> None:
    for o, r in zip(ours, reference):
        for a, b in zip(o.outputs, r.outputs):
            assert a.token_ids == b.token_ids
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_buckets(30) == [1, 2, 4, 8, 16, 24, 30]
    assert block_buckets(1) == [1]
    assert block_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert block_buckets(40) == [1, 2, 4, 8, 16, 32, 40]


def test_static_decode_equals_default_engine(model):
    """Five sequences (padded to a batch of 8), prompts of 3..70 tokens crossing block boundaries while
    decoding, one request with n=3 (forked after a shared prefill): tokens equal, logprobs within 1e-4."""
    prompts = _prompts([3, 17, 40, 70, 9])
    params = [SamplingParams(temperature=0.0, max_tokens=40, logprobs=0, ignore_eos=True)] * 4 + [
        SamplingParams(temperature=1.0, n=3, seed=7, max_tokens=40, logprobs=0, ignore_eos=True)]
    reference = LLM(model, max_num_seqs=8, block_size=BLOCK).generate(prompts, params)
    llm = _static_llm(model)
    ours = llm.generate(prompts, params)
    _assert_same_outputs(ours, reference)
    static = llm.engine.runner.static
    assert static.num_steps >= 39  # every decode step after the prefill took the fixed-shape path
    assert llm.stats()["static_decode_steps"] == static.num_steps and llm.stats()["cuda_graphs_captured"] == 0
    assert llm.stats()["cache_blocks_used"] == 0


def test_static_decode_of_a_dense_model():
    """A dense model (what distillation produces) has no MoE layer: the fixed-shape step runs without one."""
    torch.manual_seed(0)
    cfg = r1forge.ModelConfig.from_preset("tiny", vocab_size=VOCAB, first_k_dense_replace=2, n_routed_experts=None)
    dense = r1forge.build_model(cfg).eval()
    assert not dense.moe_layers()
    prompts, params = _prompts([5, 21]), SamplingParams(temperature=0.0, max_tokens=10, logprobs=0, ignore_eos=True)
    reference = LLM(dense, max_num_seqs=8, block_size=BLOCK).generate(prompts, params)
    llm = _static_llm(dense)
    _assert_same_outputs(llm.generate(prompts, params), reference)
    assert llm.engine.runner.static.num_steps == 9


def test_static_decode_under_preemption(model):
    """A pool of 12 blocks for 6 sequences of ~80 tokens: preemption and recompute mix prefill chunks with
    fixed-shape decode steps; every sequence still gets the tokens of an unconstrained engine."""
    cfg = model.config
    per_block = BLOCK * cfg.latent_dim * cfg.num_hidden_layers * 4
    prompts = _prompts([20, 25, 30, 35, 40, 45])
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    roomy = LLM(model, max_num_seqs=8, block_size=BLOCK).generate(prompts, params)
    tight = _static_llm(model, kv_cache_memory=12 * per_block)
    outs = tight.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in roomy]
    assert tight.engine.scheduler.num_preemptions > 0 and tight.engine.runner.static.num_steps > 0
    assert tight.engine.block_manager.num_used_blocks == 0


def test_padding_rows_write_only_the_null_block(model):
    llm = _static_llm(model)
    runner = llm.engine.runner
    null = runner.static.null_block
    num_blocks = llm.engine.block_manager.num_blocks
    assert all(c.shape[0] == num_blocks + 1 for c in runner.kv_caches) and null == num_blocks
    outs = llm.generate(_prompts([5, 20, 33]), SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 2 for o in outs)
    # Decode one more step by hand for 3 sequences (bucket 4) and check which slots changed.
    tables = [[0], [1, 2], [3, 4, 5]]
    positions = [4, 20, 33]
    before = torch.stack(runner.kv_caches)
    logits = runner.static.run([7, 8, 9], positions, tables)
    assert logits.shape == (3, VOCAB)
    changed = (torch.stack(runner.kv_caches) != before).any(-1).any(0)  # [blocks, block_size]
    expected = torch.zeros_like(changed)
    for table, pos in zip(tables, positions):
        expected[table[pos // BLOCK], pos % BLOCK] = True
    expected[null, 0] = True  # the padding row's dummy token
    assert torch.equal(changed, expected)


def test_static_decode_restores_the_model_for_training(model):
    eager = [moe.dispatch for moe in model.moe_layers()]  # the model's own dispatchers (GroupedDispatch)
    llm = _static_llm(model)
    llm.generate(_prompts([6, 6]), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    for moe, dispatch in zip(model.moe_layers(), eager):
        assert moe.dispatch is dispatch and moe.record_load
    # The stacked expert weights are the parameters themselves: a training step still moves them.
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expert = model.moe_layers()[0].experts[0]
    w13 = model.moe_layers()[0].experts._stacked[0]
    before = expert.up_proj.weight.detach().clone()
    model(torch.tensor([_prompts([12])[0]])).logsumexp(-1).mean().backward()
    assert expert.up_proj.weight.grad is not None
    opt.step()
    model.eval()
    ffn = expert.gate_proj.weight.shape[0]
    assert not torch.equal(expert.up_proj.weight, before)
    assert torch.equal(w13[0, ffn:], expert.up_proj.weight)  # the step landed in the stacked storage


def test_graph_safe_dispatchers_equal_sorted_dispatch():
    m = _model(seed=3)
    moe = m.moe_layers()[0]
    state = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(11, m.config.hidden_size)
    ids, weights, _ = moe.gate(x)
    reference = SortedDispatch()(x, ids, weights, moe.experts)
    assert grouped_gemm_supported(torch.device("cpu"), torch.float32, m.config.hidden_size,
                                  m.config.moe_intermediate_size)
    scale = reference.abs().max().item()  # float32 sums in another order: relative to the output's size
    for dispatch in (GroupedGemmDispatch(), DenseDispatch()):
        torch.testing.assert_close(dispatch(x, ids, weights, moe.experts), reference, rtol=1e-5, atol=1e-6 * scale)
    # Stacking changed where the weights live, not what they are, and the sorted path agrees afterwards.
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())
    torch.testing.assert_close(SortedDispatch()(x, ids, weights, moe.experts), reference)
    w13, w2 = stack_expert_weights(moe.experts)
    assert w13.data_ptr() == moe.experts[0].gate_proj.weight.data_ptr()
    assert w2[-1].data_ptr() == moe.experts[-1].down_proj.weight.data_ptr()


def test_grouped_gemm_needs_aligned_rows():
    assert not grouped_gemm_supported(torch.device("cpu"), torch.float32, 64, 30)  # 120-byte rows
    assert grouped_gemm_supported(torch.device("cpu"), torch.bfloat16, 64, 32)
    assert not grouped_gemm_supported(torch.device("cpu"), torch.bfloat16, 64, 4)  # 8-byte rows


def test_cuda_graphs_on_cpu_is_a_clear_error(model):
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        LLM(model, max_num_seqs=4, block_size=BLOCK, cuda_graphs=True)


def test_pool_budget_includes_the_null_block(model):
    cfg = model.config
    per_block = BLOCK * cfg.latent_dim * cfg.num_hidden_layers * 4
    llm = LLM(model, max_num_seqs=4, block_size=BLOCK, kv_cache_memory=10 * per_block, compile=True)
    runner = llm.engine.runner
    assert llm.engine.block_manager.num_blocks == 9 and all(c.shape[0] == 10 for c in runner.kv_caches)
    assert runner.pool_bytes == 10 * per_block


def test_compiled_decode_equals_eager(model):
    prompts = _prompts([4, 30, 11])
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=0, ignore_eos=True)
    reference = LLM(model, max_num_seqs=4, block_size=BLOCK).generate(prompts, params)
    llm = _static_llm(model, max_num_seqs=4, compile=True)
    _assert_same_outputs(llm.generate(prompts, params), reference)
    assert llm.engine.runner.static.num_steps >= 11


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_decode_equals_eager():
    m = _model().cuda()
    prompts = _prompts([3, 17, 40, 70, 9])
    params = SamplingParams(temperature=0.0, max_tokens=40, logprobs=0, ignore_eos=True)
    reference = LLM(m, max_num_seqs=8, block_size=BLOCK).generate(prompts, params)
    llm = LLM(m, max_num_seqs=8, block_size=BLOCK, cuda_graphs=True)
    _assert_same_outputs(llm.generate(prompts, params), reference)
    static = llm.engine.runner.static
    assert static.graphs and static.num_steps >= 39


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_traces_as_one_graph(dtype):
    """What a CUDA graph needs, checked on the CPU: dynamo traces the whole fixed-shape step as one graph
    (fullgraph: no .item()/.tolist(), no data-dependent shapes, no host reads). bfloat16 takes the grouped-GEMM
    dispatch, float32 the dense one, as under torch.compile."""
    from r1forge.engine.static_decode import StaticDecoder

    m = _model(seed=5).to(dtype)
    r1forge.model.keep_router_fp32(m)
    caches = [torch.zeros(9, BLOCK, m.config.latent_dim, dtype=dtype)
              for _ in range(m.config.num_hidden_layers)]
    config = EngineConfig(max_num_seqs=4, block_size=BLOCK, num_blocks=8, max_model_len=4 * BLOCK, static_decode=True)
    static = StaticDecoder(m, caches, config)
    static.dispatch = (GroupedGemmDispatch if dtype == torch.bfloat16 else DenseDispatch)()
    static.step_fn = torch.compile(static.forward, fullgraph=True, backend="eager")
    logits = static.run([5, 6, 7], [0, 17, 40], [[0], [1, 2], [3, 4, 5]])
    assert logits.shape == (3, VOCAB) and torch.isfinite(logits).all()
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] not in (9, 10),
                    reason="the grouped-GEMM kernel needs a CUDA device of compute capability 9.x or 10.x")
def test_grouped_gemm_dispatch_on_cuda_bf16():
    m = _model(seed=3).cuda().to(torch.bfloat16)
    r1forge.model.keep_router_fp32(m)
    moe = m.moe_layers()[0]
    x = torch.randn(37, m.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    ids, weights, _ = moe.gate(x)
    with torch.no_grad():
        reference = SortedDispatch()(x, ids, weights, moe.experts).float()
        ours = GroupedGemmDispatch()(x, ids, weights, moe.experts).float()
    assert (ours - reference).abs().max() <= 2e-2 * reference.abs().max()
