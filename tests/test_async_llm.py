"""AsyncLLM's guarantees to its callers (the server's): every completion of a request gets its final delta,
leaving early in any way aborts and frees the cache, stats are fresh after an abort, a dead engine loop is
visible (and /health says so), and the engine's abort ends every one of the n completions with a reason."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

import r1forge
from r1forge import LLM, SamplingParams
from r1forge.engine import AsyncLLM, EngineConfig, EngineDeadError, LLMEngine

VOCAB = 256


class _CharTokenizer:
    eos_token_id = 1

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) % VOCAB for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(65 + i % 26) for i in ids)


@pytest.fixture(scope="module")
def model() -> r1forge.DeepseekForCausalLM:
    torch.manual_seed(0)
    cfg = r1forge.ModelConfig.from_preset("tiny", vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=512)
    return r1forge.build_model(cfg).eval()


@pytest.fixture
def engine(model):
    engine = AsyncLLM(LLM(model, tokenizer=_CharTokenizer(), max_num_seqs=16, block_size=16))
    yield engine
    engine.shutdown(timeout=5)


def _prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _idle(engine: AsyncLLM) -> bool:
    stats = engine.stats()
    return stats["running"] == 0 and stats["waiting"] == 0 and stats["cache_blocks_used"] == 0


def test_n_completions_finishing_in_one_step_all_get_their_final_delta(engine):
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=5, ignore_eos=True)

    async def main():
        return [d async for d in engine.generate(_prompt(9), params)]

    deltas = asyncio.run(main())
    for index in range(4):
        mine = [d for d in deltas if d.index == index]
        assert sum(len(d.token_ids) for d in mine) == 5, index
        assert mine[-1].finish_reason == "length" and all(d.finish_reason is None for d in mine[:-1])


def test_stats_are_fresh_after_an_abort_leaves_the_engine_idle(engine):
    async def main():
        async for _ in engine.generate(_prompt(20), SamplingParams(max_tokens=400, ignore_eos=True)):
            break  # the last client hangs up: nothing steps the engine afterwards

    asyncio.run(main())
    assert _wait_until(lambda: _idle(engine)), engine.stats()


def test_abort_ends_every_completion_with_abort(engine):
    params = SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=400, ignore_eos=True)

    async def main():
        deltas = []
        async for d in engine.generate(_prompt(12), params, request_id="cut"):
            if not deltas:
                engine.abort("cut")  # as shutdown() does: the consumer keeps listening until the stream ends
            deltas.append(d)
        return deltas

    deltas = asyncio.run(main())
    last = {d.index: d for d in deltas}
    assert sorted(last) == [0, 1, 2] and {d.finish_reason for d in last.values()} == {"abort"}
    assert _wait_until(lambda: _idle(engine)) and not engine.engine.requests


def test_cancelled_before_the_first_delta_aborts(engine):
    """Consumers cancelled while their request is being added (A) or still queued behind it (B): both must be
    aborted (A after its add, B never added) and the engine must keep running."""
    inner = engine.engine
    adding, release = threading.Event(), threading.Event()
    add_request = inner.add_request

    def slow_add(prompt, params, request_id=None):
        adding.set()
        release.wait(10)
        return add_request(prompt, params, request_id)

    inner.add_request = slow_add
    params = SamplingParams(max_tokens=400, ignore_eos=True)

    async def consume(rid: str) -> None:
        async for _ in engine.generate(_prompt(10), params, request_id=rid):
            pass

    async def main():
        a = asyncio.ensure_future(consume("a"))
        assert await asyncio.to_thread(adding.wait, 5)
        b = asyncio.ensure_future(consume("b"))
        await asyncio.sleep(0.05)  # b's add is queued behind a's
        a.cancel()
        b.cancel()
        await asyncio.gather(a, b, return_exceptions=True)
        release.set()

    try:
        asyncio.run(main())
    finally:
        release.set()
        inner.add_request = add_request
    assert _wait_until(lambda: _idle(engine) and not inner.requests), engine.stats()
    assert engine.is_running and engine.stats()["generated_tokens"] == 0  # aborted before any step

    async def again():
        return [d async for d in engine.generate(_prompt(10), SamplingParams(max_tokens=3), request_id="a")]

    assert asyncio.run(again())[-1].finish_reason is not None


def test_consumer_loop_closed_mid_request_does_not_kill_the_engine(engine):
    """Deltas computed after the consumer's event loop closed are dropped and the request is aborted."""
    inner = engine.engine
    hold, held = threading.Event(), threading.Event()
    hold.set()
    step = inner.step

    def held_step():
        out = step()
        if not hold.is_set():
            held.set()
            hold.wait(10)
        return out

    inner.step = held_step

    async def main():
        gen = engine.generate(_prompt(10), SamplingParams(max_tokens=400, ignore_eos=True))
        await gen.__anext__()
        hold.clear()  # the next step's deltas are delivered only after this loop has closed
        assert await asyncio.to_thread(held.wait, 5)

    try:
        asyncio.run(main())
        hold.set()
        assert _wait_until(lambda: _idle(engine) and not inner.requests), engine.stats()
        assert engine.is_running
    finally:
        hold.set()
        inner.step = step


def test_request_id_in_use_is_refused_without_harming_the_first(engine):
    async def main():
        first = engine.generate(_prompt(8), SamplingParams(max_tokens=20, ignore_eos=True), request_id="x")
        got = [await first.__anext__()]
        with pytest.raises(ValueError, match="already in use"):
            await engine.generate(_prompt(8), SamplingParams(max_tokens=2), request_id="x").__anext__()
        got += [d async for d in first]
        return got

    got = asyncio.run(main())
    assert sum(len(d.token_ids) for d in got) == 20 and got[-1].finish_reason == "length"


def test_dead_engine_loop_is_reported_and_health_says_so(engine):
    from fastapi.testclient import TestClient

    from r1forge.serve import ServerConfig, create_app

    app = create_app(engine, ServerConfig())
    with TestClient(app) as http:
        assert engine.is_running and not engine.errored and engine.dead_error is None
        assert http.get("/health").status_code == 200

        boom = RuntimeError("boom")

        def broken_step():
            raise boom

        engine.engine.step = broken_step

        async def main():
            async for _ in engine.generate(_prompt(5), SamplingParams(max_tokens=5)):
                pass

        with pytest.raises(EngineDeadError):
            asyncio.run(main())
        assert _wait_until(lambda: not engine._thread.is_alive())
        assert not engine.is_running and engine.errored and engine.dead_error is boom
        r = http.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "unavailable"}
        with pytest.raises(EngineDeadError, match="boom"):
            asyncio.run(main())


def test_engine_abort_during_prefill_ends_all_n_completions(model):
    """A request aborted while its prompt is still being prefilled has not forked its n - 1 siblings yet:
    each of the n completions must still get a final delta and output with finish_reason "abort"."""
    engine = LLMEngine(model, None, EngineConfig(num_blocks=32, block_size=16, max_num_batched_tokens=16))
    engine.add_request(_prompt(60), SamplingParams(n=3, max_tokens=5), request_id="r")
    assert engine.step() == []  # the first 16-token chunk of the prompt: nothing sampled yet
    assert engine.block_manager.num_used_blocks > 0
    deltas = engine.abort("r")
    assert sorted(d.index for d in deltas) == [0, 1, 2]
    assert all(d.finish_reason == "abort" and d.token_ids == [] for d in deltas)
    assert engine.block_manager.num_used_blocks == 0 and not engine.requests and not engine.has_unfinished()
    assert engine.abort("r") == []  # already gone


def test_engine_abort_after_forking_ends_only_the_unfinished(model):
    engine = LLMEngine(model, None, EngineConfig(num_blocks=32, block_size=16))
    engine.add_request(_prompt(10), SamplingParams(n=2, max_tokens=50, ignore_eos=True), request_id="r")
    first = engine.step()
    assert sorted(d.index for d in first) == [0, 1] and all(d.finish_reason is None for d in first)
    deltas = engine.abort("r")
    assert sorted(d.index for d in deltas) == [0, 1] and {d.finish_reason for d in deltas} == {"abort"}
    assert engine.block_manager.num_used_blocks == 0
