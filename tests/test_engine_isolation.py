"""One request failing inside the engine ends that request with an error, not the engine: the others in its
batch finish; a failure no request can be blamed for is the engine's, and AsyncLLM reports it."""

from __future__ import annotations

import asyncio

import pytest
import torch

import r1forge
from r1forge import LLM, SamplingParams
from r1forge.engine import AsyncLLM, EngineDeadError
from r1forge.engine import llm_engine

VOCAB = 64


@pytest.fixture(scope="module")
def model() -> r1forge.DeepseekForCausalLM:
    torch.manual_seed(0)
    return r1forge.build_model(r1forge.ModelConfig.from_preset("tiny", vocab_size=VOCAB, num_hidden_layers=1)).eval()


def _poison_sampler(monkeypatch: pytest.MonkeyPatch, victim: str) -> None:
    """Make the sampler raise whenever the victim's row is in the batch (after a few good steps)."""
    real = llm_engine.sample

    def sample(logits, seqs):
        if any(s.request_id == victim and s.num_output_tokens >= 2 for s in seqs):
            raise RuntimeError("poisoned row")
        return real(logits, seqs)

    monkeypatch.setattr(llm_engine, "sample", sample)


def test_a_failing_request_ends_with_an_error_and_the_batch_goes_on(model, monkeypatch) -> None:
    llm = LLM(model, max_num_seqs=8, block_size=16, max_model_len=128)
    params = SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True, seed=1)
    expected = llm.generate([[3, 4, 5], [6, 7]], params)
    _poison_sampler(monkeypatch, "victim")
    ids = [llm.engine.add_request([3, 4, 5], params, "a"),
           llm.engine.add_request([9, 9, 9], SamplingParams(n=3, temperature=0.8, max_tokens=12), "victim"),
           llm.engine.add_request([6, 7], params, "b")]
    while llm.engine.has_unfinished():
        llm.engine.step()
    a, victim, b = (llm.engine.pop_finished(i) for i in ids)
    assert [c.finish_reason for c in victim.outputs] == ["error"] * 3
    assert "RuntimeError: poisoned row" in victim.outputs[0].error
    assert a.finish_reason == b.finish_reason == "length" and a.outputs[0].error is None
    # seeded: the survivors drew exactly what they draw without the victim
    assert (a.token_ids, b.token_ids) == (expected[0].token_ids, expected[1].token_ids)
    assert llm.engine.block_manager.num_used_blocks == 0


def test_async_streams_get_the_error_and_the_engine_keeps_serving(model, monkeypatch) -> None:
    engine = AsyncLLM(LLM(model, max_num_seqs=8, block_size=16, max_model_len=128))
    _poison_sampler(monkeypatch, "victim")

    async def run(rid: str) -> list:
        return [d async for d in engine.generate([3, 4, 5], SamplingParams(max_tokens=8, ignore_eos=True), rid)]

    async def main() -> tuple:
        return await asyncio.gather(run("victim"), run("ok"))

    try:
        victim, ok = asyncio.run(main())
        assert victim[-1].finish_reason == "error" and "poisoned" in victim[-1].error
        assert ok[-1].finish_reason == "length" and sum(len(d.token_ids) for d in ok) == 8
        assert engine.is_running
        after = asyncio.run(asyncio.wait_for(run("after"), 30))
        assert after[-1].finish_reason == "length"
    finally:
        engine.shutdown(timeout=5)


def test_a_failure_with_no_request_to_blame_is_the_engines(model, monkeypatch) -> None:
    engine = AsyncLLM(LLM(model, max_num_seqs=8, block_size=16, max_model_len=128))
    calls = []

    def sample(logits, seqs):  # fails in the batch, succeeds row by row: nobody to blame
        calls.append(len(seqs))
        if len(seqs) > 1:
            raise RuntimeError("broken batch")
        return real(logits, seqs)

    real = llm_engine.sample
    monkeypatch.setattr(llm_engine, "sample", sample)

    async def run(rid: str) -> None:
        async for _ in engine.generate([3, 4, 5], SamplingParams(max_tokens=8, ignore_eos=True), rid):
            pass

    async def main() -> list:
        return await asyncio.gather(run("x"), run("y"), return_exceptions=True)

    try:
        results = asyncio.run(main())
        assert any(isinstance(r, EngineDeadError) for r in results), results
        assert 1 in calls  # the rows were tried alone before the engine was declared broken
        assert engine.errored and "broken batch" in str(engine.dead_error) and not engine.is_running
    finally:
        engine.shutdown(timeout=5)
