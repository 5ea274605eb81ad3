"""The inference engine: equality with transformers and with the full forward, cache accounting, prefix
sharing, scheduling under a full pool, sampling controls, streaming and error handling."""

from __future__ import annotations

import asyncio

import pytest
import torch

import r1forge
from conftest import assert_step_logits_equal_full_forward, randomise_
from r1forge import LLM, SamplingParams
from r1forge.engine import AsyncLLM, EngineConfig, LLMEngine

VOCAB = 256


@pytest.fixture(scope="module")
def model() -> r1forge.DeepseekForCausalLM:
    torch.manual_seed(0)
    cfg = r1forge.ModelConfig.from_preset("tiny", vocab_size=VOCAB, num_hidden_layers=3, max_position_embeddings=512)
    m = r1forge.build_model(cfg)
    randomise_(m, std=0.3)
    return m.eval()


def _prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _pool_bytes(model, num_blocks: int, block_size: int = 16) -> int:
    cfg = model.config
    return num_blocks * block_size * cfg.latent_dim * cfg.num_hidden_layers * 4


def _greedy_reference(model, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_equals_transformers_generate(tmp_path):
    import transformers
    torch.manual_seed(0)
    hf_cfg = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=2, topk_group=1, first_k_dense_replace=1, max_position_embeddings=512, bos_token_id=0,
        eos_token_id=1, pad_token_id=0,
    )
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    randomise_(hf, std=0.3)
    hf.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), max_num_seqs=8, block_size=16)
    prompts = _prompts([3, 17, 33, 64, 70])
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True))
    # ignore_eos lets greedy pick eos like any token; HF's min_new_tokens would instead mask eos, so drop eos there.
    hf.generation_config.eos_token_id = None
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False)
        assert out.token_ids == ref[0, len(prompt):].tolist()
        assert out.finish_reason == "length"


@pytest.mark.parametrize("absorbed", [True, False])
def test_decode_logits_equal_full_forward_every_step(model, monkeypatch, absorbed):
    assert_step_logits_equal_full_forward(model, monkeypatch, _prompts([5, 30, 50]), block_size=16, absorbed=absorbed)


def test_cache_bytes_per_token_and_pool_size(model):
    llm = LLM(model, max_num_seqs=4, kv_cache_memory=1 << 20, block_size=16)
    cfg = model.config
    expected = cfg.latent_dim * cfg.num_hidden_layers * 4
    assert llm.cache_bytes_per_token == expected
    runner = llm.engine.runner
    slots = llm.engine.block_manager.num_blocks * llm.engine.block_manager.block_size
    assert len(runner.kv_caches) == cfg.num_hidden_layers
    assert all(c.shape == (slots // 16, 16, cfg.latent_dim) for c in runner.kv_caches)
    assert runner.pool_bytes == sum(c.numel() * c.element_size() for c in runner.kv_caches) == slots * expected
    assert runner.pool_bytes <= 1 << 20


def test_prefix_shared_by_n_samples_is_prefilled_once(model):
    llm = LLM(model, max_num_seqs=32, block_size=16)
    prompt = _prompts([200])[0]
    out = llm.generate([prompt], SamplingParams(n=16, temperature=1.0, max_tokens=8, seed=3))[0]
    assert len(out.outputs) == 16 and all(len(c.token_ids) == 8 for c in out.outputs)
    assert llm.engine.runner.num_prefill_tokens == 200
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # different samples, one prefill
    # A later request with the same prompt reuses the cached full blocks.
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2))
    assert llm.engine.runner.num_prefill_tokens == 200 + (200 - 192)
    assert llm.engine.block_manager.num_used_blocks == 0


def test_full_pool_preempts_and_completes_everything(model):
    prompts = _prompts([20, 25, 30, 35, 40, 45])
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    roomy = LLM(model, max_num_seqs=8, block_size=16).generate(prompts, params)
    # 12 blocks of 16 = 192 slots: far less than 6 sequences x ~80 tokens, so the scheduler must preempt.
    tight = LLM(model, max_num_seqs=8, block_size=16, kv_cache_memory=_pool_bytes(model, 12))
    assert tight.engine.block_manager.num_blocks == 12
    outs = tight.generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]
    assert tight.engine.scheduler.num_preemptions > 0
    assert tight.engine.block_manager.num_used_blocks == 0


def test_request_larger_than_pool_ends_with_length_and_others_finish(model):
    llm = LLM(model, max_num_seqs=4, block_size=16, kv_cache_memory=_pool_bytes(model, 4))  # 64 slots
    outs = llm.generate(_prompts([50, 10]), SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    assert outs[0].finish_reason == "length" and len(outs[0].token_ids) < 40
    assert outs[1].finish_reason == "length" and len(outs[1].token_ids) == 40


def test_bad_requests_raise_clear_errors_and_engine_keeps_serving(model):
    llm = LLM(model, max_num_seqs=4, block_size=16, max_model_len=64)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="context is 64"):
        llm.generate([list(range(2, 80))], SamplingParams())
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-3)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\)"):
        llm.generate([[5, 300]], SamplingParams())
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate(["text without a tokenizer"], SamplingParams())
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=70, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 64 - 3  # stopped by the context
    assert llm.engine.block_manager.num_used_blocks == 0 and not llm.engine.requests


def test_seeded_sampling_is_independent_of_batch(model):
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=16, seed=1234, ignore_eos=True)
    prompt = _prompts([12])[0]
    alone = LLM(model, block_size=16).generate([prompt], params)[0].token_ids
    others = _prompts([7, 9, 30], seed=5)
    mixed = LLM(model, block_size=16).generate(others[:2] + [prompt] + others[2:],
                                               [SamplingParams(temperature=1.0, max_tokens=16)] * 2 + [params]
                                               + [SamplingParams(temperature=1.0, max_tokens=5)])[2].token_ids
    assert alone == mixed


def test_sampled_logprobs_equal_recomputed(model):
    llm = LLM(model, block_size=16)
    prompt = _prompts([10])[0]
    out = llm.generate([prompt], SamplingParams(temperature=0.7, max_tokens=10, seed=0, logprobs=3, ignore_eos=True))[0]
    ids = prompt + out.token_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, len(prompt) - 1 : -1] / 0.7
    ref = logits.log_softmax(-1).gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(out.logprobs), ref, atol=1e-5)
    tops = out.outputs[0].top_logprobs
    assert len(tops) == 10 and all(len(t) == 3 for t in tops)


def test_stop_token_and_penalties(model):
    llm = LLM(model, block_size=16)
    prompt = _prompts([8])[0]
    free = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0].token_ids
    stop_at = free[5]
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[stop_at],
                                                ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop_at
    assert out.token_ids == free[: free.index(stop_at) + 1]
    rep = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, frequency_penalty=2.0,
                                                ignore_eos=True))[0].token_ids
    assert max(rep.count(t) for t in set(rep)) <= max(free.count(t) for t in set(free))


class _CharTokenizer:
    """Each id is one character: enough to test stop strings and incremental text."""

    eos_token_id = 1

    def encode(self, text: str) -> list[int]:
        return [ord(c) % VOCAB for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(65 + i % 26) for i in ids)


def test_stop_strings_and_stream_equal_generate(model):
    tok = _CharTokenizer()
    llm = LLM(model, tokenizer=tok, block_size=16)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    full = llm.generate(["hello"], params)[0]
    stop = full.text[10:12]
    first = full.text.find(stop)
    out = llm.generate(["hello"], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == full.text[:first]
    streamed = list(llm.stream("hello", params))
    assert "".join(d.text for d in streamed) == full.text
    assert sum((d.token_ids for d in streamed), []) == full.token_ids
    assert streamed[-1].finish_reason == "length"


def test_async_engine_abort_frees_blocks(model):
    engine = AsyncLLM(LLM(model, max_num_seqs=16, block_size=16))

    async def client(i: int, cut: int | None) -> int:
        n = 0
        async for delta in engine.generate(_prompts([10 + i], seed=i)[0],
                                           SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)):
            n += len(delta.token_ids)
            if cut is not None and n >= cut:
                break
        return n

    async def main() -> list[int]:
        got = await asyncio.gather(*[client(i, 3 if i % 2 else None) for i in range(10)])
        for _ in range(100):
            if engine.stats()["cache_blocks_used"] == 0 and engine.stats()["running"] == 0:
                break
            await asyncio.sleep(0.02)
        return got

    try:
        got = asyncio.run(main())
        assert got == [30 if i % 2 == 0 else 3 for i in range(10)]
        assert engine.stats()["cache_blocks_used"] == 0
    finally:
        engine.shutdown()


def test_engine_rejects_duplicate_request_ids(model):
    engine = LLMEngine(model, None, EngineConfig(num_blocks=16, block_size=16))
    engine.add_request([3, 4], SamplingParams(max_tokens=1), request_id="a")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([3, 4], SamplingParams(max_tokens=1), request_id="a")
