"""`r1forge serve DIR --tensor-parallel-size 2` as a user runs it: a subprocess that starts its own worker, answers
the openai client (streaming, reasoning_content), and, when the worker is killed, turns /health to 503 and exits
with a message naming the worker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

import r1forge
from conftest import randomise_
from r1forge.data import load_tokenizer, make_pretrain_corpus, train_tokenizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned_children(pid: int) -> list[int]:
    """Processes `pid` started by multiprocessing's spawn (its TP worker; not the resource tracker), from /proc."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == pid and b"spawn_main" in cmdline:
                kids.append(int(entry.name))
    return kids


def _wait(predicate, bound: float, what: str):
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {bound} s")


def _health(url: str) -> int | None:
    try:
        return httpx.get(url + "/health", timeout=2).status_code
    except httpx.HTTPError:
        return None


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker through /proc")
def test_serve_tensor_parallel_answers_then_stops_when_a_worker_dies(tmp_path: Path) -> None:
    train_tokenizer(None, tmp_path, vocab_size=320, texts=make_pretrain_corpus(300, 0))
    tok = load_tokenizer(tmp_path)
    torch.manual_seed(0)
    model = r1forge.build_model(r1forge.ModelConfig.from_preset(
        "tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    randomise_(model, std=0.3)
    model.save_pretrained(tmp_path)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    server = subprocess.Popen(
        [sys.executable, "-c", "import sys; from r1forge.cli import main; sys.exit(main())", "serve", str(tmp_path), "--port", str(port), "--device", "cpu",
         "--tensor-parallel-size", "2", "--max-model-len", "256", "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: server.poll() is not None or _health(url) == 200, 180, "the server answering /health")
        assert server.poll() is None, server.communicate()
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        stream = client.chat.completions.create(
            model=tmp_path.name, messages=[{"role": "user", "content": "What is 2 + 3?"}], max_tokens=8,
            temperature=0.0, stream=True)
        reasoning = ""
        for chunk in stream:
            for c in chunk.choices:
                reasoning += (c.delta.model_extra or {}).get("reasoning_content") or ""
        # The template opens <think> and a random model never closes it: everything it wrote is reasoning.
        assert reasoning
        prompt_ids = tok.encode("The cat sat", add_special_tokens=True)  # as /v1/completions encodes it
        expected = r1forge.LLM(tmp_path, device="cpu").generate(
            [prompt_ids], r1forge.SamplingParams(temperature=0.0, max_tokens=6))[0].outputs[0].text
        done = client.completions.create(model=tmp_path.name, prompt="The cat sat", max_tokens=6, temperature=0.0)
        assert done.choices[0].text == expected  # the sharded server writes what one device writes

        (worker,) = _spawned_children(server.pid)
        os.kill(worker, signal.SIGKILL)
        _wait(lambda: _health(url) != 200, 30, "/health turning unhealthy")
        _wait(lambda: server.poll() is not None, 60, "the server exiting")
        _, err = server.communicate()
        assert server.returncode == 1
        assert "worker rank 1" in err and "died" in err, err
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
