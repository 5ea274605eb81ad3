"""The OpenAI wire format of `r1forge serve`: request and response models, SSE framing, error objects.

Requests are validated strictly by type (`"2"` is not an `n`, `"true"` is not a `stream`) but unknown fields
are accepted and ignored, because OpenAI clients send fields we do not model (`parallel_tool_calls`, `store`,
`logit_bias`, `metadata`...). Sampling fields left out are None, meaning "the server's default" (from the
checkpoint's generation_config), so `sampling_kwargs()` returns only what the client set. Extensions beyond
OpenAI, named as in vLLM: `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `chat_template_kwargs`.
Server limits (max n, max tokens, context length) depend on the server's config and live in
`validate_limits`, which the app calls once the prompt is tokenised.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer, model_validator

from r1forge.serve.tool_calls import TOOL_NAME_CHARS

FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]
SSE_DONE = "data: [DONE]\n\n"
_MIN_LOGPROB = -9999.0  # what OpenAI sends for -inf (JSON has no infinity)


def new_id(prefix: str) -> str:
    """A response id such as `chatcmpl-<24 hex>`."""
    return f"{prefix}-{secrets.token_hex(12)}"


def sse(payload: BaseModel | dict[str, Any]) -> str:
    """One server-sent event carrying `payload` as JSON; end the stream with `SSE_DONE`."""
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


# ---------------------------------------------------------------- requests

class FunctionCall(_Request):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class MessageToolCall(_Request):
    """A call in an assistant message of the history."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    """One message of the conversation. `content` is normalised to a string: text parts are joined by "\\n"."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = Field(None, validate_default=True)
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages
    reasoning_content: str | None = None  # assistant messages sent back: DeepSeek's name for the reasoning
    reasoning: str | None = None  # vLLM's newer name for it; either is accepted, kept as reasoning_content

    @model_validator(mode="after")
    def _one_reasoning_field(self) -> ChatMessage:
        if self.reasoning is not None:
            if self.reasoning_content is not None and self.reasoning_content != self.reasoning:
                raise ValueError("reasoning and reasoning_content differ: send one of them (they are the same field)")
            self.reasoning_content, self.reasoning = self.reasoning, None
        return self

    @field_validator("role")
    @classmethod
    def _developer_is_system(cls, role: str) -> str:
        return "system" if role == "developer" else role  # OpenAI's newer name for the system role

    @field_validator("content", mode="before")
    @classmethod
    def _text_content(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            role = info.data.get("role")
            if role in ("system", "user", "tool"):
                raise ValueError(f"content is required for role '{role}'")
            return None
        if isinstance(value, list):
            texts = []
            for part in value:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(f"only text content parts ({{'type': 'text', 'text': ...}}) are supported, "
                                     f"got {kind!r}")
                texts.append(part["text"])
            return "\n".join(texts)
        return value


class FunctionDefinition(_Request):
    name: str = Field(pattern=rf"^[{TOOL_NAME_CHARS}]{{1,64}}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # JSON schema, passed to the chat template
    strict: bool | None = None


class ToolDefinition(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(_Request):
    include_usage: bool = False  # send a last chunk with `usage` and no choices


class ResponseFormat(_Request):
    type: str

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value != "text":
            raise ValueError(f"only 'text' is supported (this server has no constrained decoding), got {value!r}")
        return value


class _SamplingRequest(_Request):
    """Fields shared by both endpoints."""

    model: str | None = None  # None: the served model
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # extension; -1 or 0 disables
    min_p: float | None = Field(None, ge=0, le=1)  # extension
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)  # extension; 1 disables
    stop: list[str] | None = None  # a string is taken as a one-element list
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)  # int64, as OpenAI
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension: keep generating past eos (benchmarks)
    user: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        value = [value] if isinstance(value, str) else value
        if isinstance(value, list) and any(isinstance(s, str) and not s for s in value):
            raise ValueError("stop strings must be non-empty")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def _common_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"n": self.n}
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty", "seed"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        if self.top_k is not None:
            kwargs["top_k"] = max(self.top_k, 0)
        if self.stop:
            kwargs["stop"] = list(self.stop)
        if self.ignore_eos:
            kwargs["ignore_eos"] = True
        return kwargs


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = Field(None, ge=1)  # wins over max_tokens when both are given
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)  # needs logprobs=true
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # e.g. {"thinking": false}

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("logprobs") is False:
            raise ValueError("top_logprobs requires logprobs=true")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _choice_in_tools(cls, value: Any, info: ValidationInfo) -> Any:
        if "tools" not in info.data or value in (None, "none", "auto"):
            return value
        names = [t.function.name for t in info.data["tools"] or []]
        if not names:
            raise ValueError("tool_choice other than 'none' or 'auto' requires tools")
        if isinstance(value, NamedToolChoice) and value.function.name not in names:
            raise ValueError(f"function {value.function.name!r} is not among the tools {names}")
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def sampling_kwargs(self) -> dict[str, Any]:
        """The `SamplingParams` keyword arguments the client set; max_tokens only if given (see
        `effective_max_tokens`), logprobs = top_logprobs (or 0) when logprobs is true."""
        kwargs = self._common_kwargs()
        if self.requested_max_tokens is not None:
            kwargs["max_tokens"] = self.requested_max_tokens
        if self.logprobs:
            kwargs["logprobs"] = self.top_logprobs or 0
        return kwargs

    @property
    def uses_tools(self) -> bool:
        """Whether the output should go through the tool-call parser."""
        return bool(self.tools) and self.tool_choice != "none"

    def template_messages(self) -> list[dict[str, Any]]:
        """The messages as plain dicts for the chat template (unset fields left out)."""
        return [m.model_dump(exclude_none=True) for m in self.messages]


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. `prompt` is normalised to a list of prompts, each a string or token ids."""

    prompt: list[str | list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default; null: up to the context length
    logprobs: int | None = Field(None, ge=0, le=20)  # the sampled token's logprob plus this many top ones
    echo: bool = False  # prepend the prompt to the text

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_list(cls, value: Any) -> Any:
        def is_ids(x: Any) -> bool:
            return isinstance(x, list) and len(x) > 0 and all(type(t) is int and t >= 0 for t in x)
        if isinstance(value, str):
            return [value]
        if is_ids(value):
            return [value]
        if isinstance(value, list) and value and (all(isinstance(x, str) for x in value)
                                                  or all(is_ids(x) for x in value)):
            return value
        raise ValueError("must be a string, a list of strings, a non-empty list of token ids (ints >= 0), "
                         "or a list of such lists")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling_kwargs(self) -> dict[str, Any]:
        """The `SamplingParams` keyword arguments the client set (max_tokens None left out: see
        `effective_max_tokens`)."""
        kwargs = self._common_kwargs()
        if self.max_tokens is not None:
            kwargs["max_tokens"] = self.max_tokens
        if self.logprobs is not None:
            kwargs["logprobs"] = self.logprobs
        return kwargs


# ---------------------------------------------------------------- responses

class _OmitNone(BaseModel):
    """Leaves the fields named in `omit_if_none` out of the JSON when they are None, as OpenAI does."""

    omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        return {k: v for k, v in data.items() if v is not None or k not in self.omit_if_none}


def _finite(value: float) -> float:
    return value if math.isfinite(value) else _MIN_LOGPROB


class TopLogprob(BaseModel):
    token: str
    logprob: float  # -inf is sent as -9999.0
    bytes: list[int] | None = None  # UTF-8 bytes of the token

    @field_validator("logprob")
    @classmethod
    def _clamp(cls, value: float) -> float:
        return _finite(value)


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)

    @classmethod
    def of(cls, token: str, logprob: float, top: list[tuple[str, float]] | None = None) -> TokenLogprob:
        """Build an entry, bytes included, from a token string, its logprob and (token, logprob) alternatives."""
        tops = [TopLogprob(token=t, logprob=lp, bytes=list(t.encode("utf-8"))) for t, lp in top or []]
        return cls(token=token, logprob=logprob, bytes=list(token.encode("utf-8")), top_logprobs=tops)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ResponseFunction(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunction


class _MirrorsReasoning(_OmitNone):
    """The reasoning under both names clients read: `reasoning_content` (DeepSeek's API) and `reasoning` (the
    field vLLM moved to); clients reading only one of them get it either way. Set `reasoning_content`."""

    reasoning_content: str | None = None  # DeepSeek's field: the <think> block
    reasoning: str | None = None  # the same text

    @model_validator(mode="after")
    def _mirror(self) -> _MirrorsReasoning:
        self.reasoning = self.reasoning_content
        return self


class ChatResponseMessage(_MirrorsReasoning):
    omit_if_none: ClassVar[frozenset[str]] = frozenset({"reasoning_content", "reasoning", "tool_calls"})
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None = None) -> Usage:
        details = None if reasoning_tokens is None else CompletionTokensDetails(reasoning_tokens=reasoning_tokens)
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens, completion_tokens_details=details)


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaFunction(_OmitNone):
    omit_if_none: ClassVar[frozenset[str]] = frozenset({"name", "arguments"})
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_OmitNone):
    """Streaming call piece; `ToolCallDelta.to_openai()` gives one as a dict."""

    omit_if_none: ClassVar[frozenset[str]] = frozenset({"id", "type", "function"})
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction | None = None


class DeltaMessage(_MirrorsReasoning):
    omit_if_none: ClassVar[frozenset[str]] = frozenset({"role", "content", "reasoning_content", "reasoning",
                                                        "tool_calls"})
    role: Literal["assistant"] | None = None  # first chunk only
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE event of a streamed chat completion; with include_usage the last has no choices and a usage."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """Legacy completions logprobs: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)  # None for the first echoed prompt token
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)

    @field_validator("token_logprobs")
    @classmethod
    def _clamp(cls, values: list[float | None]) -> list[float | None]:
        return [None if v is None else _finite(v) for v in values]

    @field_validator("top_logprobs")
    @classmethod
    def _clamp_top(cls, values: list[dict[str, float] | None]) -> list[dict[str, float] | None]:
        return [None if d is None else {t: _finite(v) for t, v in d.items()} for d in values]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(BaseModel):
    """A completion, or one streamed chunk of it (same object in OpenAI's API)."""

    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "r1forge"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------- errors

_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                429: "rate_limit_error", 503: "service_unavailable_error"}
_FIELD_RE = re.compile(r"[a-z][a-z0-9_]*")
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list", "bytes"})


def api_error(status: int, message: str, param: str | None = None, type: str | None = None,
              code: str | None = None) -> dict[str, Any]:
    """An OpenAI error body `{"error": {...}}`; `type` defaults from the HTTP status."""
    if type is None:
        type = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _param(loc: tuple[Any, ...]) -> str | None:
    """Dotted parameter name from a pydantic location, without union tags such as `list[str]` or class names."""
    if loc and loc[0] == "body":  # FastAPI's RequestValidationError prefixes the body
        loc = loc[1:]
    parts = [str(p) for p in loc if isinstance(p, int) or (_FIELD_RE.fullmatch(p) and p not in _TYPE_TAGS)]
    return ".".join(parts) or None


def _short(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def format_validation_error(exc: Any) -> dict[str, Any]:
    """OpenAI error body for a failed request validation, naming the offending parameter.

    `exc` is a `pydantic.ValidationError` (or FastAPI's `RequestValidationError`: anything with `.errors()`).
    The first error is reported; when a union produced several for one field, the most specific one.
    Other invalid parameters are listed at the end of the message.
    """
    errors = list(exc.errors())
    if not errors:
        return api_error(400, "Invalid request.")
    first_param = _param(tuple(errors[0]["loc"]))
    top = first_param.split(".")[0] if first_param else None
    same = [e for e in errors if (_param(tuple(e["loc"])) or "").split(".")[0] == (top or "")]
    err = max(same, key=lambda e: len((_param(tuple(e["loc"])) or "").split(".")))
    param = _param(tuple(err["loc"]))
    kind, msg = err["type"], str(err["msg"]).removeprefix("Value error, ")
    if kind == "json_invalid":
        message, code, param = f"Invalid JSON body: {msg}.", "invalid_json", None
    elif kind == "missing":
        message, code = f"Missing required parameter: '{param}'.", "missing_required_parameter"
    elif param is None:
        message, code = f"Invalid request: {msg}.", "invalid_value"
    elif kind == "value_error":  # our own validators: the message already says what is wrong
        message, code = f"Invalid value for '{param}': {msg}.", "invalid_value"
    elif kind.endswith("_type") or kind.endswith("_parsing"):
        message, code = f"Invalid type for '{param}': {msg}, got {_short(err.get('input'))}.", "invalid_type"
    else:
        message, code = f"Invalid value for '{param}': {msg}, got {_short(err.get('input'))}.", "invalid_value"
    others = sorted({p.split(".")[0] for e in errors if (p := _param(tuple(e["loc"]))) and p.split(".")[0] != top})
    if others:
        message += " Also invalid: " + ", ".join(f"'{p}'" for p in others) + "."
    return api_error(400, message, param=param, code=code)


def validate_limits(req: ChatCompletionRequest | CompletionRequest, *, max_n: int, max_tokens_limit: int,
                    context_len: int, prompt_len: int) -> dict[str, Any] | None:
    """Check a parsed request against the server's limits; an error body naming the parameter, or None.

    Args:
        req: the validated request.
        max_n: most completions per prompt the server allows.
        max_tokens_limit: most completion tokens per request the server allows.
        context_len: the model's context length (prompt plus completion).
        prompt_len: the prompt's length in tokens (the longest prompt's, for a batch of completions).
    """
    if req.n > max_n:
        return api_error(400, f"n must be at most {max_n} on this server, got {req.n}.", param="n",
                         code="invalid_value")
    prompt_param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
    if prompt_len >= context_len:
        return api_error(400, f"This model's maximum context length is {context_len} tokens. However, your "
                              f"{prompt_param} resulted in {prompt_len} tokens.",
                         param=prompt_param, code="context_length_exceeded")
    requested = req.requested_max_tokens
    if requested is None:
        return None
    name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
    if requested > max_tokens_limit:
        return api_error(400, f"{name} must be at most {max_tokens_limit} on this server, got {requested}.",
                         param=name, code="invalid_value")
    if prompt_len + requested > context_len:
        return api_error(400, f"This model's maximum context length is {context_len} tokens. However, you "
                              f"requested {prompt_len + requested} tokens ({prompt_len} in the {prompt_param}, "
                              f"{requested} in the completion). Please reduce the length of the {prompt_param} "
                              f"or the completion.", param=name, code="context_length_exceeded")
    return None


def effective_max_tokens(req: ChatCompletionRequest | CompletionRequest, *, max_tokens_limit: int,
                         context_len: int, prompt_len: int) -> int:
    """The completion budget: what the client asked for, else whatever fits the context (capped by the server).

    Call after `validate_limits` passed, which guarantees the result is >= 1.
    """
    requested = req.requested_max_tokens
    return requested if requested is not None else min(max_tokens_limit, context_len - prompt_len)
