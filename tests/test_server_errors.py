"""`r1forge serve` refusing bad input: status codes, OpenAI error objects naming the parameter, auth, the body
size limit, a full queue, and graceful shutdown. After every refusal the server must still answer."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import openai
import pytest
from test_server import API_KEY, MODEL, start_server, tokenizer_dir, user  # noqa: F401  (fixture)

from r1forge.serve import BackgroundServer

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MSG = user("hello")


@pytest.fixture(scope="module")
def server(tokenizer_dir):  # noqa: F811
    srv = start_server(tokenizer_dir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server: BackgroundServer):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


def assert_alive(http: httpx.Client) -> None:
    r = http.post(CHAT, json={"model": MODEL, "messages": MSG, "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


LONG = "hello " * 2000  # well over the 1024-token context
BAD_REQUESTS: list[tuple[str, str, Any, str | None, str]] = [
    # (name, path, body, param, message fragment)
    ("not json", CHAT, b'{"model": "tiny-r1", "messages": [', None, "Invalid JSON"),
    ("not an object", CHAT, [1, 2], None, "Invalid request"),
    ("no messages", CHAT, {"model": MODEL}, "messages", "Missing required parameter"),
    ("messages wrong type", CHAT, {"messages": "hi"}, "messages", "Invalid type"),
    ("temperature string", CHAT, {"messages": MSG, "temperature": "hot"}, "temperature", "Invalid type"),
    ("n string", CHAT, {"messages": MSG, "n": "2"}, "n", "Invalid type"),
    ("stream string", CHAT, {"messages": MSG, "stream": "yes"}, "stream", "Invalid type"),
    ("max_tokens float", CHAT, {"messages": MSG, "max_tokens": 2.5}, "max_tokens", "Invalid type"),
    ("top_p out of range", CHAT, {"messages": MSG, "top_p": 1.5}, "top_p", "Invalid value"),
    ("penalty out of range", CHAT, {"messages": MSG, "presence_penalty": 3}, "presence_penalty", "Invalid value"),
    ("bad role", CHAT, {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "Invalid value"),
    ("top_logprobs alone", CHAT, {"messages": MSG, "top_logprobs": 2}, "top_logprobs", "requires logprobs"),
    ("unknown model", CHAT, {"model": "gpt-9", "messages": MSG}, "model", "does not exist"),
    ("n over limit", CHAT, {"messages": MSG, "n": 9}, "n", "at most 8"),
    ("max_tokens over limit", CHAT, {"messages": MSG, "max_tokens": 401}, "max_tokens", "at most 400"),
    ("max_completion_tokens over limit", CHAT, {"messages": MSG, "max_completion_tokens": 500},
     "max_completion_tokens", "at most 400"),
    ("prompt over context", CHAT, {"messages": user(LONG)}, "messages", "maximum context length"),
    ("prompt + max_tokens over context", COMPLETIONS, {"prompt": "hello " * 150, "max_tokens": 400}, "max_tokens",
     "maximum context length"),
    ("template kwargs clash", CHAT, {"messages": MSG, "chat_template_kwargs": {"tools": []}}, "chat_template_kwargs",
     "may not set"),
    ("tool_choice without tools", CHAT, {"messages": MSG, "tool_choice": "required"}, "tool_choice", "requires tools"),
    ("prompt ids out of vocab", COMPLETIONS, {"prompt": [1, 2, 10**6]}, "prompt", "token ids"),
    ("prompt wrong type", COMPLETIONS, {"prompt": 5}, "prompt", "Invalid value"),
    ("echo with logprobs", COMPLETIONS, {"prompt": "hi", "echo": True, "logprobs": 1}, "echo", "not supported"),
    ("stop empty", COMPLETIONS, {"prompt": "hi", "stop": [""]}, "stop", "non-empty"),
]


@pytest.mark.parametrize("name,path,body,param,fragment", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_is_400_naming_the_parameter(http: httpx.Client, name: str, path: str, body: Any,
                                                 param: str | None, fragment: str) -> None:
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and fragment in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_server_answers_after_bad_requests(http: httpx.Client) -> None:
    for _, path, body, _, _ in BAD_REQUESTS:  # all of them again, back to back, then a good one
        http.post(path, json=body) if not isinstance(body, bytes) else http.post(path, content=body)
    assert_alive(http)


def test_openai_client_sees_the_error(server: BackgroundServer) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MSG, n=9)
    assert info.value.body["param"] == "n"


@pytest.mark.parametrize("path,method", [("/v1/models", "GET"), ("/metrics", "GET"), (CHAT, "POST"),
                                         (COMPLETIONS, "POST"), ("/nowhere", "GET")])
def test_api_key_required_except_health(server: BackgroundServer, path: str, method: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}, {"Authorization": "Basic x"}):
        r = httpx.request(method, server.url + path, headers=headers, json={"messages": MSG})
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/health").status_code == 200
    r = httpx.request(method, server.url + path, headers=AUTH, json={"messages": MSG, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == (404 if path == "/nowhere" else 200)


def test_body_over_limit_is_413(http: httpx.Client) -> None:
    big = b'{"messages": [{"role": "user", "content": "' + b"x" * 70_000 + b'"}]}'
    r = http.post(CHAT, content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "limit of 65536 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: chunked upload, counted as it arrives
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"x" * 8192
        yield b'"}]}'

    r = http.post(CHAT, content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert_alive(http)


def test_full_queue_is_429(tokenizer_dir) -> None:  # noqa: F811
    """429 only when the server really is full: both running slots taken by long streams, no waiting room."""
    with start_server(tokenizer_dir, max_waiting=0, max_num_seqs=2, max_tokens=1000) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=0)
        assert httpx.post(srv.url + CHAT, headers=AUTH, json={"messages": MSG, "max_tokens": 2}).status_code == 200
        streams = [client.chat.completions.create(model=MODEL, messages=user(f"fox {i}"), max_tokens=1000,
                                                  stream=True, extra_body={"ignore_eos": True}) for i in range(2)]
        for s in streams:
            next(iter(s))
        r = httpx.post(srv.url + CHAT, headers=AUTH, json={"messages": MSG})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert httpx.get(srv.url + "/health").status_code == 200
        for s in streams:
            s.close()
        deadline = time.monotonic() + 10
        while srv.engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.post(srv.url + CHAT, headers=AUTH, json={"messages": MSG, "max_tokens": 2}).status_code == 200


def test_batch_is_admitted_or_refused_as_a_unit(tokenizer_dir) -> None:  # noqa: F811
    """More prompts than max_waiting on an idle server: admitted when they fit waiting + running slots (every
    time, not by luck of timing), a 400 naming `prompt` when they never can."""
    with start_server(tokenizer_dir, max_waiting=2, max_num_seqs=4) as srv:
        for _ in range(3):
            r = httpx.post(srv.url + COMPLETIONS, headers=AUTH,
                           json={"prompt": [f"Paris {i}" for i in range(6)], "max_tokens": 3})
            assert r.status_code == 200, r.text
            assert sorted(c["index"] for c in r.json()["choices"]) == list(range(6))
        r = httpx.post(srv.url + COMPLETIONS, headers=AUTH, json={"prompt": ["x"] * 7, "max_tokens": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        assert "at most 6" in r.json()["error"]["message"]
        assert srv.engine.stats()["waiting"] == 0 and srv.engine.stats()["cache_blocks_used"] == 0


def test_graceful_shutdown(tokenizer_dir) -> None:  # noqa: F811
    """In-flight requests that end within the drain window finish; the rest end with an error event; the
    server then stops listening and the engine holds no cache blocks."""
    srv = start_server(tokenizer_dir, shutdown_timeout=2.0, max_tokens=1000)  # 5 tokens, not 1000, in 2 s
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=0)
    short = client.chat.completions.create(model=MODEL, messages=user("Paris"), max_tokens=5, stream=True,
                                           extra_body={"ignore_eos": True})
    long = client.chat.completions.create(model=MODEL, messages=user("fox"), max_tokens=1000, stream=True,
                                          extra_body={"ignore_eos": True})
    next(iter(short)), next(iter(long))
    stopper = threading.Thread(target=srv.stop)
    t0 = time.monotonic()
    stopper.start()
    finishes = [c.choices[0].finish_reason for c in short if c.choices]
    assert finishes[-1] == "length"
    with pytest.raises(openai.APIError, match="shutting down"):
        for _ in long:
            pass
    stopper.join(30)
    assert not stopper.is_alive() and time.monotonic() - t0 < 10
    assert srv.engine.stats()["cache_blocks_used"] == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/health")


def test_cli_config(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`r1forge serve` binds loopback by default, takes the key from R1FORGE_API_KEY and the sampling defaults
    from generation_config.json."""
    import argparse
    import json

    from r1forge.commands import serve as serve_command

    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95, "eos_token_id": 1}))
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    monkeypatch.setenv("R1FORGE_API_KEY", "from-env")
    config = serve_command.server_config(parser.parse_args([str(tmp_path)]))
    assert (config.host, config.api_key, config.max_body_bytes) == ("127.0.0.1", "from-env", 1 << 20)
    assert config.default_sampling == {"temperature": 0.6, "top_p": 0.95} and config.model_name == tmp_path.name
    config = serve_command.server_config(parser.parse_args([str(tmp_path), "--api-key", "k", "--host", "0.0.0.0"]))
    assert (config.host, config.api_key) == ("0.0.0.0", "k")
