"""Serving load test: concurrent streaming chat clients against `r1forge serve`, some hanging up mid-stream.

    .venv/bin/python bench/serve.py                       # tiny random model served from a subprocess, 64 clients, 20 s
    .venv/bin/python bench/serve.py --model DIR           # serve a checkpoint directory instead
    .venv/bin/python bench/serve.py --url http://127.0.0.1:8000 --model-name NAME --api-key KEY   # a running server

Each client loops until the time is up: one streaming chat request (`ignore_eos`, so every completion is
`--max-tokens` long), read to its end. The `--disconnect` clients instead ask for `--long-tokens` and hang up
after `--disconnect-after` chunks, every time. Any non-200 answer, error event, missing finish_reason or missing
[DONE] counts as an error. Printed: requests completed and disconnected, errors, output tokens/s of the
completed requests, p50 / p99 time to first token, and the server's KV-cache usage once the clients are done,
which must be back to 0 (a hung-up request that was not aborted would still hold its blocks).
`run_load` is also what tests/test_server_load.py runs, shorter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class LoadReport:
    completed: int = 0
    disconnected: int = 0
    errors: list[str] = field(default_factory=list)
    output_tokens: int = 0  # of the completed requests, from their usage
    ttft: list[float] = field(default_factory=list)  # seconds, every request that got a first token
    elapsed: float = 0.0

    def percentile(self, q: float) -> float:
        if not self.ttft:
            return float("nan")
        ordered = sorted(self.ttft)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]

    def summary(self) -> str:
        return (f"{self.completed} requests completed, {self.disconnected} disconnected mid-stream, "
                f"{len(self.errors)} errors in {self.elapsed:.1f}s\n"
                f"throughput: {self.output_tokens / self.elapsed:.1f} output tokens/s (completed requests)\n"
                f"time to first token: p50 {self.percentile(50) * 1e3:.0f} ms, p99 {self.percentile(99) * 1e3:.0f} ms "
                f"(mean {statistics.fmean(self.ttft) * 1e3 if self.ttft else float('nan'):.0f} ms)")


async def _one_request(client: httpx.AsyncClient, body: dict, hang_up_after: int | None, report: LoadReport) -> None:
    t0 = time.perf_counter()
    chunks, finish, done, usage = 0, None, False, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            report.errors.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                report.errors.append(f"error event: {event['error']['message']}")
                return
            for choice in event.get("choices", []):
                delta = choice.get("delta", {})
                if chunks == 0 and (delta.get("content") or delta.get("reasoning_content")):
                    report.ttft.append(time.perf_counter() - t0)
                if delta.get("content") or delta.get("reasoning_content"):
                    chunks += 1
                finish = choice.get("finish_reason") or finish
            usage = event.get("usage") or usage
            if hang_up_after is not None and chunks >= hang_up_after:
                report.disconnected += 1
                return  # leaving the block closes the connection mid-stream
    if not done or finish is None or usage is None:
        report.errors.append(f"stream ended without [DONE] / finish_reason / usage ({chunks} chunks)")
        return
    report.completed += 1
    report.output_tokens += usage["completion_tokens"]


async def run_load(base_url: str, model: str, api_key: str | None = None, clients: int = 64, disconnect: int = 16,
                   duration: float = 20.0, max_tokens: int = 64, long_tokens: int = 400, disconnect_after: int = 4,
                   requests_per_client: int | None = None) -> LoadReport:
    """Run the clients against `base_url` (see module docstring). Every client stops at `duration` seconds or
    after `requests_per_client` requests, whichever comes first; requests in flight at the deadline finish."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    report = LoadReport()
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=120) as client:
        start = time.perf_counter()

        async def loop(i: int) -> None:
            hang_up = i < disconnect
            body = {"model": model, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
                    "temperature": 1.0, "max_tokens": long_tokens if hang_up else max_tokens,
                    "messages": [{"role": "user", "content": f"Client {i}: tell me about the weather in Paris."}]}
            sent = 0
            while time.perf_counter() - start < duration and sent < (requests_per_client or float("inf")):
                sent += 1
                try:
                    await _one_request(client, body, disconnect_after if hang_up else None, report)
                except httpx.HTTPError as e:
                    report.errors.append(f"{type(e).__name__}: {e}")

        await asyncio.gather(*(loop(i) for i in range(clients)))
        report.elapsed = time.perf_counter() - start
    return report


def kv_cache_usage(base_url: str, api_key: str | None, wait: float = 5.0) -> float:
    """The server's r1forge_kv_cache_usage_perc, polled for up to `wait` seconds until it reads 0."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + wait
    while True:
        text = httpx.get(base_url + "/metrics", headers=headers).text
        match = re.search(r"^r1forge_kv_cache_usage_perc\{[^}]*\} (\S+)$", text, re.MULTILINE)
        usage = float(match.group(1)) if match else float("nan")
        if usage == 0.0 or time.monotonic() >= deadline:
            return usage
        time.sleep(0.1)


def make_tiny_checkpoint(directory: Path, preset: str) -> Path:
    """A random model of `preset` with a tokenizer trained on the synthetic corpus, saved as a checkpoint."""
    import torch

    import r1forge
    from r1forge.data import load_tokenizer, make_pretrain_corpus, train_tokenizer

    train_tokenizer(None, directory, vocab_size=1024, texts=make_pretrain_corpus(300, seed=0))
    torch.manual_seed(0)
    config = r1forge.ModelConfig.from_preset(preset, vocab_size=load_tokenizer(directory).vocab_size)
    r1forge.build_model(config).save_pretrained(directory)
    return directory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", help="an already running server (default: start one)")
    p.add_argument("--model", help="checkpoint directory to serve (default: a tiny random model)")
    p.add_argument("--preset", default="tiny", help="preset of the random model")
    p.add_argument("--model-name", default="bench")
    p.add_argument("--api-key", default=None)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--disconnect", type=int, default=16, help="clients that hang up mid-stream")
    p.add_argument("--duration", type=float, default=20.0, help="seconds")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--long-tokens", type=int, default=400, help="max_tokens of the hanging-up clients")
    p.add_argument("--disconnect-after", type=int, default=4, help="chunks read before hanging up")
    args = p.parse_args()

    server, url = None, args.url
    with tempfile.TemporaryDirectory() as tmp:
        if url is None:
            model_dir = args.model or make_tiny_checkpoint(Path(tmp), args.preset)
            port = _free_port()
            cmd = [sys.executable, "-m", "r1forge.cli", "serve", str(model_dir), "--port", str(port),
                   "--served-model-name", args.model_name, "--max-num-seqs", str(args.clients),
                   "--log-level", "warning", "--shutdown-timeout", "10"]
            env = {**os.environ, **({"R1FORGE_API_KEY": args.api_key} if args.api_key else {})}
            server = subprocess.Popen(cmd, env=env)
            url = f"http://127.0.0.1:{port}"
            for _ in range(600):
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None:
                    raise SystemExit(f"the server exited with {server.returncode}")
                time.sleep(0.1)
        print(f"{args.clients} streaming clients ({args.disconnect} hang up after {args.disconnect_after} chunks) "
              f"for {args.duration:.0f}s against {url}, max_tokens {args.max_tokens}")
        report = asyncio.run(run_load(url, args.model_name, args.api_key, args.clients, args.disconnect,
                                      args.duration, args.max_tokens, args.long_tokens, args.disconnect_after))
        print(report.summary())
        for error in report.errors[:10]:
            print("  error:", error)
        usage = kv_cache_usage(url, args.api_key)
        print(f"KV-cache usage after the run: {usage:.4f} ({'ok' if usage == 0 else 'NOT FREED'})")
        if server is not None:
            t = time.perf_counter()
            server.terminate()  # SIGTERM: graceful shutdown
            code = server.wait(60)
            how = "SIGTERM, which uvicorn re-raises after its graceful shutdown" if code == -15 else "exit code"
            print(f"server shut down in {time.perf_counter() - t:.1f}s ({how}: {code})")
    if report.errors or usage != 0:
        sys.exit(1)


if __name__ == "__main__":
    main()
