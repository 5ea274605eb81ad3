"""`r1forge serve` under hostile input: extreme sampling values are 4xx naming the parameter and leave a healthy
engine; a broken chat template or sampling default refuses to start naming the file; template errors at request
time name the template and are never a 500; stop strings are bounded; an empty API key refuses to start; a
stalled body times out; a dead engine stops the process with exit code 1."""

from __future__ import annotations

import argparse
import json
import math
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_server import API_KEY, MODEL, build_llm, start_server, tokenizer_dir, user  # noqa: F401  (fixture)

from r1forge.engine.async_llm import AsyncLLM
from r1forge.serve import BackgroundServer, ServerConfig, create_app, sampling_defaults

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
EXTREMES: list[Any] = [math.nan, math.inf, -math.inf, 2**63, -(2**63), 10**30, 1e308, -1, 0, 1e-300, 0.5, 3,
                       True, "1", [1], None]
PARAMS = ["temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
          "seed", "n", "max_tokens", "max_completion_tokens", "top_logprobs", "stop", "ignore_eos"]
MUST_REFUSE = {"temperature": [math.nan, math.inf, 1e308, -1, 1e-300, True, "1"], "top_p": [0, math.inf, 3],
               "top_k": [2**63, 10**30, -(2**63), 1e308, 0.5, True], "min_p": [math.nan, 3, -1],
               "presence_penalty": [math.inf, 3, -1e308], "frequency_penalty": [-math.inf, 1e308],
               "repetition_penalty": [math.inf, 1e308, 0, 1e-300, -1], "seed": [2**63, 10**30, 0.5, True],
               "n": [0, 2**63, True, 0.5], "max_tokens": [0, 2**63, -1, 0.5], "max_completion_tokens": [0, 2**63],
               "top_logprobs": [-1, 2**63, 21, True], "stop": [[1], 3, True], "ignore_eos": ["1", 3, [1]]}
GOOD = {"model": MODEL, "messages": user("hello"), "max_tokens": 2}


@pytest.fixture(scope="module")
def server(tokenizer_dir):  # noqa: F811
    srv = start_server(tokenizer_dir)
    yield srv
    srv.stop()


def test_extreme_sampling_values_are_4xx_naming_the_parameter_and_the_engine_stays_healthy(server) -> None:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as http:
        for name in PARAMS:
            for value in [*EXTREMES, *MUST_REFUSE[name]]:
                extra = {"logprobs": True} if name == "top_logprobs" else {}
                body = json.dumps({**GOOD, **extra, name: value})  # NaN / Infinity as Python's json writes them
                r = http.post(CHAT, content=body, headers={"Content-Type": "application/json"})
                assert r.status_code in (200, 400), (name, value, r.status_code, r.text)
                if r.status_code == 400:
                    assert (r.json()["error"]["param"] or "").split(".")[0] == name, (name, value, r.text)
                else:
                    assert repr(value) not in map(repr, MUST_REFUSE[name]), (name, value, r.text)
                    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert http.get("/health").status_code == 200
        assert http.post(CHAT, json=GOOD).status_code == 200
        sampled = http.post(CHAT, json={**GOOD, "temperature": 1.0, "top_k": 5, "max_tokens": 4})
        assert sampled.status_code == 200


def test_top_k_beyond_the_vocabulary_is_400_naming_top_k(server) -> None:
    r = httpx.post(server.url + CHAT, headers=AUTH, json={**GOOD, "temperature": 1.0, "top_k": 10**6})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k", r.text
    assert "vocabulary size" in r.json()["error"]["message"]


def test_stop_strings_are_bounded(server) -> None:
    for stop in (["x"] * 65, ["y" * 5000]):
        r = httpx.post(server.url + COMPLETIONS, headers=AUTH, json={"prompt": "hi", "stop": stop})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text
    assert httpx.post(server.url + COMPLETIONS, headers=AUTH, json={"prompt": "hi", "stop": ["x"] * 8,
                                                                    "max_tokens": 2}).status_code == 200


def test_a_stalled_body_times_out(tokenizer_dir) -> None:  # noqa: F811
    with start_server(tokenizer_dir, body_timeout=0.5) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode()
                      + b"\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{\"messages\": ")
            t0 = time.monotonic()
            reply = b""
            while b"seconds" not in reply and (chunk := s.recv(4096)):  # headers and body may come apart
                reply += chunk
            reply = reply.decode()
        assert reply.startswith("HTTP/1.1 408"), reply
        assert "did not arrive within 0.5 seconds" in reply and time.monotonic() - t0 < 15
        assert httpx.post(srv.url + CHAT, headers=AUTH, json=GOOD).status_code == 200


def _engine_with_template(tokenizer_dir: Path, template: str) -> AsyncLLM:
    llm = build_llm(tokenizer_dir)
    llm.tokenizer.chat_template = template
    return AsyncLLM(llm)


@pytest.mark.parametrize("template,fragment", [
    ("{% for m in messages %}{{ m['content'] }", "TemplateSyntaxError"),
    ("{{ range(10 ** 9) | length }}", "OverflowError"),  # the sandbox's range limit
    ("{{ messages[0].content | no_such_filter }}", "no_such_filter"),
])
def test_broken_template_refuses_to_start_naming_the_file(tokenizer_dir, template: str, fragment: str) -> None:  # noqa: F811
    engine = _engine_with_template(tokenizer_dir, template)
    try:
        with pytest.raises(ValueError, match=fragment) as info:
            create_app(engine, ServerConfig(chat_template_file="/ckpt/chat_template.jinja"))
        assert str(info.value).startswith("/ckpt/chat_template.jinja: the chat template")
    finally:
        engine.shutdown(timeout=5)


def test_template_errors_at_request_time_name_the_template_and_are_not_500(tokenizer_dir) -> None:  # noqa: F811
    template = ("{% if messages[0]['content'] == 'divide' %}{{ 1 // 0 }}{% endif %}"
                "{% if messages[0]['content'] == 'range' %}{{ range(messages | length * 200000) | length }}{% endif %}"
                "{% if messages[0]['content'] == 'raise' %}{{ raise_exception('no such turn') }}{% endif %}"
                "{% for m in messages %}<｜User｜>{{ m['content'] }}{% endfor %}<｜Assistant｜>")
    engine = _engine_with_template(tokenizer_dir, template)
    config = ServerConfig(model_name=MODEL, port=0, api_key=API_KEY, log_level="warning", shutdown_timeout=1,
                          chat_template_file="/ckpt/chat_template.jinja")
    with BackgroundServer(engine, config) as srv:
        for content, fragment in [("divide", "ZeroDivisionError"), ("range", "OverflowError"),
                                  ("raise", "no such turn")]:
            r = httpx.post(srv.url + CHAT, headers=AUTH, json={"messages": user(content), "max_tokens": 2})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == "messages" and error["code"] == "chat_template_error"
            assert "/ckpt/chat_template.jinja" in error["message"] and fragment in error["message"], error
        assert httpx.post(srv.url + CHAT, headers=AUTH, json=GOOD).status_code == 200


def _serve_args(model_dir: Path, *argv: str) -> argparse.Namespace:
    from r1forge.commands import serve as serve_command

    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    return parser.parse_args([str(model_dir), *argv])


def test_empty_api_key_refuses_to_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from r1forge.commands import serve as serve_command

    with pytest.raises(ValueError, match="--api-key is empty"):
        serve_command.server_config(_serve_args(tmp_path, "--api-key", ""))
    monkeypatch.setenv("R1FORGE_API_KEY", " ")
    with pytest.raises(ValueError, match="R1FORGE_API_KEY is set but empty"):
        serve_command.server_config(_serve_args(tmp_path))
    with pytest.raises(ValueError, match="api_key is empty"):
        ServerConfig(api_key="")


@pytest.mark.parametrize("gen,key", [({"temperature": -1}, "temperature"), ({"top_k": "fifty"}, "top_k"),
                                     ({"top_p": 0}, "top_p"), ({"repetition_penalty": 1e308}, "repetition_penalty")])
def test_bad_generation_config_is_a_startup_error_naming_file_and_key(tmp_path: Path, gen: dict, key: str) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    with pytest.raises(ValueError) as info:
        sampling_defaults(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'generation_config.json'}: {key} ") and "sampling default" in message


def test_sampling_default_beyond_the_vocabulary_refuses_to_start(tokenizer_dir) -> None:  # noqa: F811
    engine = AsyncLLM(build_llm(tokenizer_dir))
    try:
        with pytest.raises(ValueError, match="generation_config.json.*top_k"):
            create_app(engine, ServerConfig(default_sampling={"top_k": 10**6}))
    finally:
        engine.shutdown(timeout=5)


def test_a_dead_engine_stops_the_server_with_exit_code_1(tokenizer_dir, tmp_path, monkeypatch, capsys) -> None:  # noqa: F811
    from r1forge.commands import serve as serve_command

    def broken_engine(*args: Any, **kwargs: Any) -> AsyncLLM:
        llm = build_llm(tokenizer_dir)

        def has_unfinished() -> bool:
            raise RuntimeError("the device fell off the bus")

        llm.engine.has_unfinished = has_unfinished
        return AsyncLLM(llm)

    monkeypatch.setattr("r1forge.serve.server.build_engine", broken_engine)
    t0 = time.monotonic()
    code = serve_command.run(_serve_args(tmp_path, "--port", "0", "--log-level", "warning",
                                         "--shutdown-timeout", "1"))
    assert code == 1 and time.monotonic() - t0 < 30
    assert "the device fell off the bus" in capsys.readouterr().err
