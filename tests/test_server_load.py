"""A short version of bench/serve.py: 64 concurrent streaming clients on one engine, 16 of them hanging up
mid-stream. Every request completes without error, and the hung-up requests are aborted: their cache blocks
come back and they stop generating long before their max_tokens."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
from pathlib import Path

from test_server import API_KEY, MODEL, start_server, tokenizer_dir  # noqa: F401  (fixture)

_spec = importlib.util.spec_from_file_location("bench_serve", Path(__file__).parent.parent / "bench" / "serve.py")
bench = sys.modules["bench_serve"] = importlib.util.module_from_spec(_spec)  # dataclasses look themselves up
_spec.loader.exec_module(bench)


def test_64_streaming_clients_16_disconnect(tokenizer_dir) -> None:  # noqa: F811
    with start_server(tokenizer_dir) as srv:
        before = srv.engine.stats()["generated_tokens"]
        report = asyncio.run(bench.run_load(srv.url, MODEL, API_KEY, clients=64, disconnect=16, duration=60,
                                            max_tokens=32, long_tokens=400, disconnect_after=3,
                                            requests_per_client=1))
        assert report.errors == []
        assert (report.completed, report.disconnected) == (48, 16)
        assert report.output_tokens == 48 * 32
        assert len(report.ttft) == 64 and report.percentile(99) < 30
        deadline = time.monotonic() + 5
        while srv.engine.stats()["cache_blocks_used"] and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = srv.engine.stats()
        assert stats["cache_blocks_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
        assert bench.kv_cache_usage(srv.url, API_KEY, wait=0) == 0
        # Aborted, not run to completion: far fewer than the 16 * 400 tokens the hung-up requests asked for.
        generated = srv.engine.stats()["generated_tokens"] - before
        assert 48 * 32 <= generated < 48 * 32 + 16 * 200


def test_non_streaming_client_timeout_aborts(tokenizer_dir) -> None:  # noqa: F811
    """A client that gives up on a non-streaming request also frees its sequence."""
    import httpx

    with start_server(tokenizer_dir, max_tokens=1000) as srv:
        before = srv.engine.stats()["generated_tokens"]
        body = {"model": MODEL, "messages": [{"role": "user", "content": "fox"}], "max_tokens": 1000,
                "ignore_eos": True}
        try:
            httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=0.3,
                       headers={"Authorization": f"Bearer {API_KEY}"})
        except httpx.TimeoutException:
            pass
        else:
            raise AssertionError("1000 tokens in 0.3 s: the request should still have been running")
        deadline = time.monotonic() + 5
        while srv.engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = srv.engine.stats()
        assert stats["running"] == 0 and stats["cache_blocks_used"] == 0
        assert stats["generated_tokens"] - before < 900
