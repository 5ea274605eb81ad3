"""OpenAI protocol models (validation errors name the parameter; responses parse with the openai client's types)
and the Prometheus metrics of the server."""

import json

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk as OpenAIChunk
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from r1forge.serve.metrics import ServerMetrics
from r1forge.serve.protocol import (SSE_DONE, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                                    ChatCompletionRequest, ChatCompletionResponse, ChatResponseMessage,
                                    ChoiceLogprobs, CompletionChoice, CompletionLogprobs, CompletionRequest,
                                    CompletionResponse, DeltaMessage, ModelCard, ModelList, ResponseToolCall,
                                    TokenLogprob, Usage, api_error, effective_max_tokens, format_validation_error,
                                    sse, validate_limits)
from r1forge.serve.tool_calls import ToolCallDelta

MSG = [{"role": "user", "content": "What is 2 + 2?"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def chat(**fields):
    return ChatCompletionRequest.model_validate({"model": "r1", "messages": MSG, **fields})


def error_of(cls, body):
    with pytest.raises(ValidationError) as info:
        cls.model_validate(body)
    return format_validation_error(info.value)["error"]


def test_chat_request_full():
    req = ChatCompletionRequest.model_validate({
        "model": "r1", "temperature": 0.6, "top_p": 0.95, "top_k": -1, "min_p": 0.05, "max_tokens": 50,
        "max_completion_tokens": 100, "n": 2, "stop": "\n\n", "seed": 7, "stream": True,
        "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 3, "presence_penalty": 0.5,
        "frequency_penalty": -0.5, "repetition_penalty": 1.1, "tools": [TOOL], "tool_choice": "auto",
        "user": "u1", "response_format": {"type": "text"}, "chat_template_kwargs": {"thinking": False},
        "parallel_tool_calls": True, "store": False, "metadata": {"x": "y"},  # unknown to us: ignored
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": "in Paris?"}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ]})
    assert req.sampling_kwargs() == {
        "n": 2, "temperature": 0.6, "top_p": 0.95, "min_p": 0.05, "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "repetition_penalty": 1.1, "seed": 7, "top_k": 0, "stop": ["\n\n"], "max_tokens": 100, "logprobs": 3}
    assert req.include_usage and req.uses_tools and req.chat_template_kwargs == {"thinking": False}
    messages = req.template_messages()
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1]["content"] == "Weather\nin Paris?"
    assert messages[2] == {"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}
    assert messages[3] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


def test_chat_request_defaults_leave_sampling_to_the_server():
    req = chat()
    assert req.sampling_kwargs() == {"n": 1}
    assert req.requested_max_tokens is None and not req.include_usage and not req.uses_tools
    assert not chat(tools=[TOOL], tool_choice="none").uses_tools
    assert chat(logprobs=True).sampling_kwargs()["logprobs"] == 0


@pytest.mark.parametrize("fields,param,code", [
    ({"temperature": 5}, "temperature", "invalid_value"),
    ({"temperature": -0.1}, "temperature", "invalid_value"),
    ({"top_p": 0}, "top_p", "invalid_value"),
    ({"top_p": 1.5}, "top_p", "invalid_value"),
    ({"n": "x"}, "n", "invalid_type"),
    ({"n": "2"}, "n", "invalid_type"),  # strict: a string is not a number
    ({"n": 0}, "n", "invalid_value"),
    ({"max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", "invalid_value"),
    ({"presence_penalty": 2.5}, "presence_penalty", "invalid_value"),
    ({"frequency_penalty": -3}, "frequency_penalty", "invalid_value"),
    ({"repetition_penalty": 0}, "repetition_penalty", "invalid_value"),
    ({"top_k": -2}, "top_k", "invalid_value"),
    ({"min_p": 2}, "min_p", "invalid_value"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
    ({"top_logprobs": 2}, "top_logprobs", "invalid_value"),  # needs logprobs=true
    ({"stream": "true"}, "stream", "invalid_type"),
    ({"stop": ["ok", 3]}, "stop.1", "invalid_type"),
    ({"stop": ""}, "stop", "invalid_value"),
    ({"seed": 1.5}, "seed", "invalid_type"),
    ({"messages": []}, "messages", "invalid_value"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "invalid_value"),
    ({"messages": [{"content": "x"}]}, "messages.0.role", "missing_required_parameter"),
    ({"messages": [{"role": "user"}]}, "messages.0.content", "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages.0.content",
     "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name", "invalid_value"),
    ({"tool_choice": "sometimes"}, "tool_choice", "invalid_value"),
    ({"tool_choice": "required"}, "tool_choice", "invalid_value"),  # no tools
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "invalid_value"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {}}}, "tool_choice.function.name",
     "missing_required_parameter"),
    ({"response_format": {"type": "json_object"}}, "response_format.type", "invalid_value"),
    ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage", "invalid_type"),
])
def test_chat_validation_error_names_the_param(fields, param, code):
    err = error_of(ChatCompletionRequest, {"model": "r1", "messages": MSG, **fields})
    assert err["param"] == param and err["code"] == code and err["type"] == "invalid_request_error"
    assert f"'{param}'" in err["message"]


def test_validation_error_messages():
    err = error_of(ChatCompletionRequest, {"model": "r1"})
    assert err == {"message": "Missing required parameter: 'messages'.", "type": "invalid_request_error",
                   "param": "messages", "code": "missing_required_parameter"}
    err = error_of(ChatCompletionRequest, {"messages": MSG, "temperature": 5, "top_p": 9})
    assert err["param"] == "temperature" and "less than or equal to 2" in err["message"]
    assert "got 5" in err["message"] and "Also invalid: 'top_p'" in err["message"]
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate_json('{"messages": [')
    err = format_validation_error(info.value)["error"]
    assert err["param"] is None and err["code"] == "invalid_json"


def test_fastapi_style_locations_are_stripped():
    class FakeRequestValidationError:  # FastAPI's RequestValidationError: same errors(), loc prefixed by "body"
        def errors(self):
            return [{"type": "less_than_equal", "loc": ("body", "temperature"), "msg": "Input should be <= 2",
                     "input": 9}]
    assert format_validation_error(FakeRequestValidationError())["error"]["param"] == "temperature"


def test_completion_request():
    assert CompletionRequest.model_validate({"prompt": "hi"}).prompt == ["hi"]
    assert CompletionRequest.model_validate({"prompt": ["a", "b"]}).prompt == ["a", "b"]
    assert CompletionRequest.model_validate({"prompt": [1, 2, 3]}).prompt == [[1, 2, 3]]
    assert CompletionRequest.model_validate({"prompt": [[1], [2, 3]]}).prompt == [[1], [2, 3]]
    req = CompletionRequest.model_validate({"prompt": "x", "logprobs": 2, "echo": True, "stop": ["."], "seed": 1})
    assert req.sampling_kwargs() == {"n": 1, "seed": 1, "stop": ["."], "max_tokens": 16, "logprobs": 2}
    assert req.echo
    assert CompletionRequest.model_validate({"prompt": "x", "max_tokens": None}).requested_max_tokens is None
    for prompt in ([], [1, "a"], [[]], [-1], True, {"text": "x"}, [1.5]):
        assert error_of(CompletionRequest, {"prompt": prompt})["param"] == "prompt"
    assert error_of(CompletionRequest, {})["param"] == "prompt"
    assert error_of(CompletionRequest, {"prompt": "x", "logprobs": 21})["param"] == "logprobs"
    assert error_of(CompletionRequest, {"prompt": "x", "echo": "yes"})["code"] == "invalid_type"


def test_validate_limits():
    limits = dict(max_n=4, max_tokens_limit=1000, context_len=2048)
    assert validate_limits(chat(max_tokens=100), prompt_len=100, **limits) is None
    assert validate_limits(chat(n=5), prompt_len=10, **limits)["error"]["param"] == "n"
    assert validate_limits(chat(max_tokens=1001), prompt_len=10, **limits)["error"]["param"] == "max_tokens"
    err = validate_limits(chat(max_completion_tokens=1001), prompt_len=10, **limits)["error"]
    assert err["param"] == "max_completion_tokens" and "1000" in err["message"]
    err = validate_limits(chat(), prompt_len=2048, **limits)["error"]
    assert err["param"] == "messages" and err["code"] == "context_length_exceeded"
    err = validate_limits(chat(max_tokens=1000), prompt_len=1100, **limits)["error"]
    assert err["param"] == "max_tokens" and err["code"] == "context_length_exceeded" and "2100" in err["message"]
    completion = CompletionRequest.model_validate({"prompt": "x"})
    assert validate_limits(completion, prompt_len=4000, **limits)["error"]["param"] == "prompt"
    assert effective_max_tokens(chat(), prompt_len=1500, max_tokens_limit=1000, context_len=2048) == 548
    assert effective_max_tokens(chat(), prompt_len=10, max_tokens_limit=1000, context_len=2048) == 1000
    assert effective_max_tokens(chat(max_tokens=7), prompt_len=10, max_tokens_limit=1000, context_len=2048) == 7


def test_api_error():
    assert api_error(404, "The model 'x' does not exist.", param="model", code="model_not_found") == {"error": {
        "message": "The model 'x' does not exist.", "type": "not_found_error", "param": "model",
        "code": "model_not_found"}}
    assert api_error(400, "bad")["error"]["type"] == "invalid_request_error"
    assert api_error(500, "boom")["error"]["type"] == "server_error"
    assert api_error(503, "busy", type="overloaded")["error"]["type"] == "overloaded"


def test_chat_response_parses_with_the_openai_client():
    call = ResponseToolCall(id="call_1", function={"name": "get_weather", "arguments": '{"city": "Paris"}'})
    resp = ChatCompletionResponse(model="r1", usage=Usage.of(10, 20, reasoning_tokens=15), choices=[
        ChatChoice(index=0, finish_reason="stop", message=ChatResponseMessage(content="4", reasoning_content="2+2"),
                   logprobs=ChoiceLogprobs(content=[TokenLogprob.of("4", -0.1, [("4", -0.1), ("é", float("-inf"))])])),
        ChatChoice(index=1, finish_reason="tool_calls", message=ChatResponseMessage(tool_calls=[call]))])
    data = json.loads(resp.model_dump_json())
    assert data["id"].startswith("chatcmpl-") and data["object"] == "chat.completion"
    assert data["usage"] == {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30,
                             "completion_tokens_details": {"reasoning_tokens": 15}}
    first, second = data["choices"]
    assert first["message"] == {"role": "assistant", "content": "4", "reasoning_content": "2+2", "reasoning": "2+2"}
    assert second["message"] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    top = first["logprobs"]["content"][0]["top_logprobs"]
    assert top[1] == {"token": "é", "logprob": -9999.0, "bytes": [195, 169]}  # -inf is not JSON
    parsed = ChatCompletion.model_validate(data)
    assert parsed.choices[0].message.reasoning_content == "2+2"  # extra field kept by the client
    assert parsed.choices[1].message.tool_calls[0].function.name == "get_weather"


def test_chunks_omit_unset_delta_fields_and_parse_with_the_openai_client():
    deltas = [ToolCallDelta(0, '{"ci', "call_x", "get_weather"), ToolCallDelta(0, 'ty": 1}')]
    def chunk(delta=None, finish_reason=None, usage=None):
        choices = [] if delta is None else [ChatChunkChoice(index=0, delta=delta, finish_reason=finish_reason)]
        return ChatCompletionChunk(id="c1", model="r1", choices=choices, usage=usage)

    chunks = [chunk(DeltaMessage(role="assistant", content="")), chunk(DeltaMessage(reasoning_content="hm")),
              chunk(DeltaMessage(tool_calls=[d.to_openai() for d in deltas]), finish_reason="tool_calls"),
              chunk(usage=Usage.of(3, 4))]
    events = [sse(c) for c in chunks]
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in events) and SSE_DONE == "data: [DONE]\n\n"
    data = [json.loads(e[len("data: "):]) for e in events]
    assert data[0]["choices"][0] == {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}
    assert data[1]["choices"][0]["delta"] == {"reasoning_content": "hm", "reasoning": "hm"}
    assert data[2]["choices"][0]["delta"]["tool_calls"] == [
        {"index": 0, "id": "call_x", "type": "function", "function": {"name": "get_weather", "arguments": '{"ci'}},
        {"index": 0, "function": {"arguments": 'ty": 1}'}}]
    assert data[3]["usage"]["total_tokens"] == 7 and data[3]["object"] == "chat.completion.chunk"
    for d in data:
        OpenAIChunk.model_validate(d)


def test_completion_response_and_models():
    resp = CompletionResponse(model="r1", usage=Usage.of(2, 2), choices=[CompletionChoice(
        index=0, text="ab", finish_reason="length", logprobs=CompletionLogprobs(
            tokens=["a", "b"], token_logprobs=[None, float("-inf")], top_logprobs=[None, {"b": float("-inf")}],
            text_offset=[0, 1]))])
    data = json.loads(resp.model_dump_json())
    assert data["id"].startswith("cmpl-") and data["object"] == "text_completion"
    assert data["choices"][0]["logprobs"]["token_logprobs"] == [None, -9999.0]
    assert data["choices"][0]["logprobs"]["top_logprobs"] == [None, {"b": -9999.0}]
    # OpenAI sends null for an echoed first token, which the client's strict types do not model: check without
    logprobs = data["choices"][0]["logprobs"]
    logprobs["token_logprobs"][0], logprobs["top_logprobs"][0] = -1.0, {"a": -1.0}
    assert Completion.model_validate(data).choices[0].text == "ab"
    models = json.loads(ModelList(data=[ModelCard(id="r1", max_model_len=4096)]).model_dump_json())
    assert models["object"] == "list" and models["data"][0]["id"] == "r1" and models["data"][0]["object"] == "model"


# ---------------------------------------------------------------- metrics

def _families(metrics: ServerMetrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}


def _value(family, suffix: str = "", **labels) -> float:
    for s in family.samples:
        if s.name == family.name + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError(f"{family.name}{suffix} {labels}")


def test_metrics_exposition_parses():
    calls = []

    def stats():
        calls.append(1)
        return {"waiting": 3, "running": 5, "cache_usage": 0.25, "preemptions": 2}

    metrics = ServerMetrics("tiny-r1", engine_stats=stats)
    metrics.record_request("/v1/chat/completions", 200)
    metrics.record_request("/v1/chat/completions", 200)
    metrics.record_request("/v1/completions", 400)
    metrics.record_tokens(prompt_tokens=12, generation_tokens=9)
    metrics.record_latency(e2e=2.0, ttft=0.4, generation_tokens=9)
    metrics.record_latency(e2e=0.1, ttft=None, generation_tokens=0)
    assert calls == []  # engine stats are read at scrape time only
    fams = _families(metrics)
    assert len(calls) == 1
    assert fams["r1forge_requests"].type == "counter"
    assert _value(fams["r1forge_requests"], "_total", endpoint="/v1/chat/completions", status="200") == 2
    assert _value(fams["r1forge_requests"], "_total", endpoint="/v1/completions", status="400") == 1
    assert _value(fams["r1forge_prompt_tokens"], "_total", model_name="tiny-r1") == 12
    assert _value(fams["r1forge_generation_tokens"], "_total") == 9
    assert _value(fams["r1forge_num_requests_waiting"]) == 3 and _value(fams["r1forge_num_requests_running"]) == 5
    assert _value(fams["r1forge_kv_cache_usage_perc"]) == 0.25
    assert _value(fams["r1forge_num_preemptions"], "_total") == 2
    assert "r1forge_prefix_cache_hit_tokens" not in fams  # optional stat absent
    assert fams["r1forge_time_to_first_token_seconds"].type == "histogram"
    assert _value(fams["r1forge_time_to_first_token_seconds"], "_count") == 1
    assert _value(fams["r1forge_e2e_request_latency_seconds"], "_count") == 2
    assert _value(fams["r1forge_e2e_request_latency_seconds"], "_sum") == pytest.approx(2.1)
    assert _value(fams["r1forge_time_per_output_token_seconds"], "_sum") == pytest.approx(1.6 / 8)
    assert metrics.content_type.startswith("text/plain")


def test_metrics_registries_are_independent():
    a, b = ServerMetrics("a"), ServerMetrics("b")
    a.record_request("/v1/models", 200)
    assert _value(_families(a)["r1forge_requests"], "_total") == 1
    assert list(_families(b)["r1forge_requests"].samples) == []
    assert "r1forge_num_requests_waiting" not in _families(b)  # no engine callback, no engine gauges
    broken = ServerMetrics("c", engine_stats=lambda: {"running": 1})
    with pytest.raises(KeyError, match="waiting"):
        broken.render()
