"""The engine on the dense students (Qwen2, Llama): a paged GQA cache behind the same block manager, scheduler
and fixed-shape decode path as MLA. Greedy equals transformers' generate; every step's logits equal the full
forward; prefix sharing, preemption, sampling, logprobs, streaming and static decode work as for MLA."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_step_logits_equal_full_forward
from dense_helpers import build_hf_dense
from r1forge import LLM, SamplingParams
from r1forge.auto_config import config_from_dict
from r1forge.engine import EngineConfig
from r1forge.engine.static_decode import StaticDecoder
from r1forge.model import DenseForCausalLM

VOCAB = 256
BLOCK = 16
FAMILIES = ["qwen2", "llama"]


def _prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _ours(hf) -> DenseForCausalLM:
    model = DenseForCausalLM(config_from_dict(hf.config.to_dict()))
    model.load_state_dict(hf.state_dict(), strict=False)
    return model.eval()


@pytest.fixture(scope="module", params=FAMILIES)
def model(request) -> DenseForCausalLM:
    return _ours(build_hf_dense(request.param, std=0.3))


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers_generate(tmp_path, family: str) -> None:
    hf = build_hf_dense(family, std=0.3)
    hf.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), max_num_seqs=8, block_size=BLOCK, max_num_batched_tokens=64)  # chunked prefill
    prompts = _prompts([3, 17, 33, 64, 70])
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True))
    hf.generation_config.eos_token_id = None
    # transformers decodes the five prompts as one left-padded batch (positions from the attention mask)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False)
    assert [o.token_ids for o in outs] == ref[:, width:].tolist()


def test_decode_logits_equal_full_forward_every_step(model, monkeypatch) -> None:
    assert_step_logits_equal_full_forward(model, monkeypatch, _prompts([5, 30, 50]), block_size=BLOCK)


def test_cache_bytes_per_token_on_the_pool_tensor(model) -> None:
    cfg = model.config
    llm = LLM(model, max_num_seqs=4, kv_cache_memory=1 << 20, block_size=BLOCK)
    expected = 2 * cfg.num_key_value_heads * cfg.head_dim * cfg.num_hidden_layers * 4  # k and v, fp32
    assert llm.cache_bytes_per_token == expected
    runner = llm.engine.runner
    blocks = llm.engine.block_manager.num_blocks
    assert len(runner.kv_caches) == cfg.num_hidden_layers
    assert all(c.shape == (blocks, BLOCK, 2, cfg.num_key_value_heads, cfg.head_dim) for c in runner.kv_caches)
    assert runner.pool_bytes == sum(c.numel() * c.element_size() for c in runner.kv_caches) == blocks * BLOCK * expected
    assert runner.pool_bytes <= 1 << 20


def test_prefix_shared_by_n_samples_is_prefilled_once(model) -> None:
    llm = LLM(model, max_num_seqs=32, block_size=BLOCK)
    prompt = _prompts([200])[0]
    out = llm.generate([prompt], SamplingParams(n=16, temperature=1.0, max_tokens=8, seed=3, ignore_eos=True))[0]
    assert len(out.outputs) == 16 and all(len(c.token_ids) == 8 for c in out.outputs)
    assert llm.engine.runner.num_prefill_tokens == 200
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2))
    assert llm.engine.runner.num_prefill_tokens == 200 + (200 - 192)  # 12 full blocks reused
    assert llm.engine.block_manager.num_used_blocks == 0


def test_full_pool_preempts_and_static_decode_agree(model) -> None:
    prompts = _prompts([20, 25, 30, 35, 40, 45])
    params = SamplingParams(temperature=0.0, max_tokens=40, logprobs=0, ignore_eos=True)
    roomy = LLM(model, max_num_seqs=8, block_size=BLOCK).generate(prompts, params)
    per_block = BLOCK * LLM(model, num_blocks=1, block_size=BLOCK).cache_bytes_per_token
    tight = LLM(model, max_num_seqs=8, block_size=BLOCK, kv_cache_memory=12 * per_block)
    assert tight.engine.block_manager.num_blocks == 12
    assert [o.token_ids for o in tight.generate(prompts, params)] == [o.token_ids for o in roomy]
    assert tight.engine.scheduler.num_preemptions > 0 and tight.engine.block_manager.num_used_blocks == 0
    static = LLM(model, max_num_seqs=8, block_size=BLOCK, static_decode=True)
    outs = static.generate(prompts, params)
    assert static.engine.runner.static.num_steps >= 39
    for o, r in zip(outs, roomy):
        assert o.token_ids == r.token_ids
        assert max(abs(a - b) for a, b in zip(o.logprobs, r.logprobs)) < 1e-4


def test_logprobs_seeds_and_streaming(model) -> None:
    llm = LLM(model, block_size=BLOCK)
    prompt = _prompts([10])[0]
    params = SamplingParams(temperature=0.7, max_tokens=10, seed=0, logprobs=3, ignore_eos=True)
    out = llm.generate([prompt], params)[0]
    ids = prompt + out.token_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, len(prompt) - 1 : -1] / 0.7
    ref = logits.log_softmax(-1).gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(out.logprobs), ref, atol=1e-5)
    assert all(len(t) == 3 for t in out.outputs[0].top_logprobs)
    # the same seed in a batch with others gives the same tokens; streaming yields the same tokens
    mixed = llm.generate(_prompts([7, 30], seed=5) + [prompt],
                         [SamplingParams(temperature=1.0, max_tokens=12)] * 2 + [params])[2]
    assert mixed.token_ids == out.token_ids
    streamed = list(llm.stream(prompt, params))
    assert sum((d.token_ids for d in streamed), []) == out.token_ids


def test_fixed_shape_decode_step_traces_as_one_graph(model) -> None:
    """The GQA decode step has no host sync either: dynamo traces it whole, as a CUDA graph needs."""
    spec = model.cache_spec()
    caches = spec.allocate(9, BLOCK, torch.float32, "cpu")
    config = EngineConfig(max_num_seqs=4, block_size=BLOCK, num_blocks=8, max_model_len=4 * BLOCK, static_decode=True)
    static = StaticDecoder(model, caches, config)
    static.step_fn = torch.compile(static.forward, fullgraph=True, backend="eager")
    logits = static.run([5, 6, 7], [0, 17, 40], [[0], [1, 2], [3, 4, 5]])
    assert logits.shape == (3, VOCAB) and torch.isfinite(logits).all()
    torch._dynamo.reset()
