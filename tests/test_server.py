"""`r1forge serve` end to end: a real uvicorn server on a loopback port, a tiny model, the official openai client.

A random tiny model almost never writes `</think>` or a tool call, so the fixture makes some outputs scripted:
a prompt that contains one of the SCRIPTS keys gets that script's tokens, forced through the logits (the rest
of the batch keeps the model's own). The other test files of the server reuse `start_server` from here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

import r1forge
from r1forge.data import load_tokenizer, train_tokenizer
from r1forge.serve import BackgroundServer, ServerConfig
from r1forge.engine.async_llm import AsyncLLM

API_KEY = "test-key"
MODEL = "tiny-r1"
REASONING, ANSWER = "Let me think.\nThe sum is 42.", "The answer is 42."
TOOL_CALL = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
             '{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')
SCRIPTS = {  # trigger word in the prompt -> what the model writes (then eos)
    "SCRIPT_REASON": f"{REASONING}</think>\n\n{ANSWER}",  # the chat template already opened <think>
    "SCRIPT_OPEN": f"<think>\n{REASONING}</think>\n\n{ANSWER}",  # for thinking=false: the model opens it
    "SCRIPT_TOOL": f"I will call the tool.</think>\n\n{TOOL_CALL}",
}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CORPUS = [
    "Let me think. The sum is 42, so the answer is 42. I will call the tool to get the weather in Paris.",
    "The quick brown fox jumps over the lazy dog while the city sleeps.",
    *[f"Paris is a city in France; on day {i} the weather was sunny and the sum of {i} and {i} is {2 * i}."
      for i in range(60)],
]


def build_llm(tokenizer_dir: Path, max_model_len: int = 1024, max_num_seqs: int = 64) -> r1forge.LLM:
    """A tiny random model with decisive logits (large weights), so greedy decoding is robust to batching."""
    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = r1forge.build_model(r1forge.ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.3)
    return r1forge.LLM(model, tok, max_num_seqs=max_num_seqs, block_size=16, max_model_len=max_model_len)


def script_outputs(llm: r1forge.LLM) -> None:
    """Force the SCRIPTS: wrap the model runner so a scripted sequence's next token gets all the probability."""
    tok = llm.tokenizer
    scripts = {key: tok.encode(text) + [tok.eos_token_id] for key, text in SCRIPTS.items()}
    runner, execute = llm.engine.runner, llm.engine.runner.execute
    chosen: dict[int, list[int] | None] = {}

    def scripted(batch: Any) -> tuple[list, torch.Tensor | None]:
        seqs, logits = execute(batch)
        for row, seq in enumerate(seqs):
            if seq.seq_id not in chosen:
                prompt = tok.decode(seq.token_ids[: seq.num_prompt_tokens])
                chosen[seq.seq_id] = next((s for key, s in scripts.items() if key in prompt), None)
            script = chosen[seq.seq_id]
            if script is not None:
                with torch.inference_mode():  # the runner's logits are inference tensors
                    logits[row] = -30.0
                    logits[row, script[min(seq.num_output_tokens, len(script) - 1)]] = 30.0
        return seqs, logits

    runner.execute = scripted


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(None, tmp_path_factory.mktemp("tok"), vocab_size=420, texts=CORPUS)


def start_server(tokenizer_dir: Path, max_waiting: int = 256, max_num_seqs: int = 64,
                 **config: Any) -> BackgroundServer:
    llm = build_llm(tokenizer_dir, max_num_seqs=max_num_seqs)
    script_outputs(llm)
    defaults = dict(model_name=MODEL, port=0, api_key=API_KEY, max_n=8, max_tokens=400, max_body_bytes=64 * 1024,
                    shutdown_timeout=2.0, log_level="warning")
    return BackgroundServer(AsyncLLM(llm, max_waiting=max_waiting), ServerConfig(**{**defaults, **config}))


@pytest.fixture(scope="module")
def server(tokenizer_dir: Path):
    srv = start_server(tokenizer_dir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def n_tokens(server: BackgroundServer, text: str) -> int:
    return len(server.engine.tokenizer.encode(text))


def collect_chat_stream(stream: Any) -> tuple[dict[int, dict[str, Any]], list[Any]]:
    """Per choice: reasoning, content, tool call pieces, finish reason and the order of the kinds of text."""
    out: dict[int, dict[str, Any]] = {}
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        for c in chunk.choices:
            st = out.setdefault(c.index, {"reasoning": "", "content": "", "calls": {}, "finish": None, "order": []})
            reasoning = getattr(c.delta, "reasoning_content", None) or (c.delta.model_extra or {}).get(
                "reasoning_content")
            if reasoning:
                st["reasoning"] += reasoning
                st["order"].append("reasoning")
            if c.delta.content:
                st["content"] += c.delta.content
                st["order"].append("content")
            for call in c.delta.tool_calls or []:
                entry = st["calls"].setdefault(call.index, {"id": None, "name": None, "arguments": ""})
                entry["id"] = call.id or entry["id"]
                entry["name"] = (call.function.name if call.function else None) or entry["name"]
                entry["arguments"] += (call.function.arguments or "") if call.function else ""
            if c.finish_reason:
                st["finish"] = c.finish_reason
    return out, chunks


def reasoning_of(message: Any) -> str | None:
    return getattr(message, "reasoning_content", None) or (message.model_extra or {}).get("reasoning_content")


# ---------------------------------------------------------------- tests

def test_models_health_and_metrics(server: BackgroundServer, client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # no key needed
    client.chat.completions.create(model=MODEL, messages=user("hello"), max_tokens=4, extra_body={"ignore_eos": True})
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    for name in ("r1forge_requests_total", "r1forge_prompt_tokens_total", "r1forge_generation_tokens_total",
                 "r1forge_num_requests_waiting", "r1forge_num_requests_running", "r1forge_kv_cache_usage_perc",
                 "r1forge_time_to_first_token_seconds_bucket", "r1forge_time_per_output_token_seconds_bucket"):
        assert name in text, name
    assert 'endpoint="/v1/chat/completions"' in text and 'status="200"' in text


def test_chat_splits_reasoning_when_template_opened_think(server: BackgroundServer, client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=user("SCRIPT_REASON please"), temperature=0)
    choice = r.choices[0]
    assert reasoning_of(choice.message) == REASONING
    assert choice.message.content == ANSWER
    assert choice.finish_reason == "stop"
    prompt = server.engine.tokenizer.apply_chat_template(user("SCRIPT_REASON please"), add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == n_tokens(server, SCRIPTS["SCRIPT_REASON"]) + 1  # + eos
    assert r.usage.completion_tokens_details.reasoning_tokens == n_tokens(server, REASONING + "</think>")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_reasoning_then_content_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=MODEL, messages=user("SCRIPT_REASON please"), temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    out, chunks = collect_chat_stream(stream)
    st = out[0]
    assert (st["reasoning"], st["content"], st["finish"]) == (REASONING, ANSWER, "stop")
    first_content = st["order"].index("content")
    assert "reasoning" not in st["order"][first_content:] and st["order"][0] == "reasoning"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens_details.reasoning_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_splits_reasoning_when_model_opens_think(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL, messages=user("SCRIPT_OPEN"), temperature=0,
                                  extra_body={"chat_template_kwargs": {"thinking": False}})
    r = client.chat.completions.create(**kwargs)
    assert (reasoning_of(r.choices[0].message), r.choices[0].message.content) == (REASONING, ANSWER)
    out, _ = collect_chat_stream(client.chat.completions.create(stream=True, **kwargs))
    assert (out[0]["reasoning"], out[0]["content"]) == (REASONING, ANSWER)


def test_stream_equals_non_stream_at_temperature_zero(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL, messages=user("The quick brown fox"), temperature=0, max_tokens=40)
    r = client.chat.completions.create(**kwargs)
    out, _ = collect_chat_stream(client.chat.completions.create(stream=True, **kwargs))
    assert out[0]["content"] == (r.choices[0].message.content or "")
    assert out[0]["reasoning"] == (reasoning_of(r.choices[0].message) or "")
    assert out[0]["finish"] == r.choices[0].finish_reason
    assert r.usage.completion_tokens >= 1


def test_tool_calls(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL, messages=user("SCRIPT_TOOL weather in Paris?"), temperature=0,
                                  tools=[WEATHER_TOOL])
    r = client.chat.completions.create(**kwargs)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert reasoning_of(choice.message) == "I will call the tool."
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")
    out, _ = collect_chat_stream(client.chat.completions.create(stream=True, **kwargs))
    assert out[0]["finish"] == "tool_calls" and out[0]["content"] == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in out[0]["calls"].values()] == [
        ("get_weather", {"city": "Paris"})]
    # without tools the same text is plain content, markers included
    r = client.chat.completions.create(model=MODEL, messages=user("SCRIPT_TOOL"), temperature=0)
    assert r.choices[0].finish_reason == "stop" and TOOL_CALL in r.choices[0].message.content


def test_n_choices_stream_every_last_token(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL, messages=user("Paris"), n=3, max_tokens=8, temperature=1.0, seed=7,
                                  extra_body={"ignore_eos": True})
    r = client.chat.completions.create(logprobs=True, **kwargs)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 24 and all(len(c.logprobs.content) == 8 for c in r.choices)
    out, chunks = collect_chat_stream(client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[-1].usage.completion_tokens == 24  # all three completions' last tokens arrived
    for c in r.choices:  # same seed: the same samples, streamed or not
        assert out[c.index]["finish"] == "length"
        assert out[c.index]["reasoning"] + out[c.index]["content"] == (reasoning_of(c.message) or "") + (
            c.message.content or "")


def test_penalties_change_greedy_output(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL, messages=user("The quick brown fox"), temperature=0, max_tokens=40,
                                  logprobs=True, extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    penalised = client.chat.completions.create(frequency_penalty=2.0, presence_penalty=2.0, **kwargs)
    tokens = [e.token for e in penalised.choices[0].logprobs.content]
    assert tokens != [e.token for e in plain]
    assert len(set(tokens)) > len({e.token for e in plain})  # repeats are discouraged


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=user("SCRIPT_REASON"), temperature=0, logprobs=True,
                                       top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    assert "".join(e.token for e in entries[:-1]) == SCRIPTS["SCRIPT_REASON"]  # the last one is eos
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3 and bytes(e.bytes).decode() == e.token
        assert e.top_logprobs[0].token == e.token  # forced: the sampled token is the most likely


def test_completions(server: BackgroundServer, client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="SCRIPT_REASON", max_tokens=50, temperature=0)
    assert r.choices[0].text == SCRIPTS["SCRIPT_REASON"] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == n_tokens(server, SCRIPTS["SCRIPT_REASON"]) + 1
    assert r.usage.prompt_tokens == len(server.engine.tokenizer.encode("SCRIPT_REASON", add_special_tokens=True))
    r = client.completions.create(model=MODEL, prompt="SCRIPT_REASON", stop=["sum"], temperature=0)
    assert r.choices[0].text == "Let me think.\nThe " and r.choices[0].finish_reason == "stop"
    stream = client.completions.create(model=MODEL, prompt="SCRIPT_REASON", stop=["sum"], temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == "Let me think.\nThe "
    r = client.completions.create(model=MODEL, prompt=["SCRIPT_REASON", "The fox"], n=2, max_tokens=6,
                                  temperature=0, logprobs=2, echo=False)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text and SCRIPTS["SCRIPT_REASON"].startswith(r.choices[0].text)
    assert all(c.finish_reason == "length" for c in r.choices)
    assert all(len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) >= 1 for c in r.choices)
    r = client.completions.create(model=MODEL, prompt="SCRIPT_REASON", max_tokens=3, temperature=0, echo=True)
    assert r.choices[0].text.startswith("SCRIPT_REASON") and r.choices[0].finish_reason == "length"


def test_max_tokens_defaults_to_the_room_left(server: BackgroundServer, client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=user("Paris"), extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 400  # the server's limit: less than the room in the context
    long = "Paris" * (700 // n_tokens(server, "Paris"))
    prompt_len = len(server.engine.tokenizer.apply_chat_template(user(long), add_generation_prompt=True))
    assert 1 < server.engine.max_model_len - prompt_len < 400
    r = client.chat.completions.create(model=MODEL, messages=user(long), extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == prompt_len
    assert r.usage.completion_tokens == 1024 - prompt_len and r.choices[0].finish_reason == "length"
