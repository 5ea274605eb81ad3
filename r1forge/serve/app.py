"""The FastAPI app of `r1forge serve`: OpenAI's chat and completions endpoints over one shared engine.

Every HTTP request becomes one engine request per prompt (n completions each), all in the engine's one
continuous batch (their lifetime, disconnects included, is `EngineRun`'s, in engine_run.py). What the app adds:
- at startup: the chat template compiled and test-rendered and the sampling defaults checked, so a broken
  checkpoint refuses to start naming the file instead of failing every request;
- request side: bearer-key check (every route but /health), body size limit (Content-Length and the bytes
  actually received) and body timeout, strict validation with OpenAI error objects naming the parameter, the
  chat template (its errors name it), context and server limits;
- response side (choices.py): the `<think>` block into `reasoning_content`, DeepSeek-V3 tool calls into
  `tool_calls`, logprobs, usage with reasoning tokens; SSE framing.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from r1forge.engine.async_llm import AsyncLLM
from r1forge.engine.sampling_params import SamplingParamError, SamplingParams
from r1forge.serve.choices import ChatChoiceState, TextChoiceState, TokenText
from r1forge.serve.config import ServerConfig
from r1forge.serve.engine_run import ClientGone, EngineRun, Job, Refused, SSEResponse, unless_disconnected
from r1forge.serve.metrics import ServerMetrics
from r1forge.serve.protocol import (
    ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, CompletionChoice,
    CompletionRequest, CompletionResponse, ModelCard, ModelList, Usage, api_error, effective_max_tokens,
    format_validation_error, new_id, sse, validate_limits,
)
from r1forge.serve.reasoning import prompt_opens_think

ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"})
_RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "add_generation_prompt", "tools", "tool_choice", "tokenize"})
_M = TypeVar("_M", bound=BaseModel)


# ---------------------------------------------------------------- request side

class _Guard:
    """Pure ASGI middleware (streams pass untouched): the bearer key on every route but /health, and the
    per-endpoint request counter with the final status."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: ServerMetrics) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.metrics = metrics

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.key)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.key is not None and scope["path"] != "/health" and not self._authorized(scope):
                body = api_error(401, "Invalid or missing API key: send the header 'Authorization: Bearer <key>'.",
                                 code="invalid_api_key")
                await JSONResponse(body, 401, {"WWW-Authenticate": "Bearer"})(scope, receive, send_status)
                return
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.record_request(scope["path"] if scope["path"] in ENDPOINTS else "other", status)


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The body, refused with 413 past `limit` bytes (by its Content-Length, or as the bytes arrive: chunked
    uploads and lying headers) and with 408 when it has not all arrived within `timeout` seconds."""
    too_large = Refused.of(413, f"Request body is larger than this server's limit of {limit} bytes.",
                           code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Refused.of(400, f"Invalid Content-Length header {declared!r}.")
        if int(declared) > limit:
            raise too_large

    async def read() -> bytes:
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise Refused.of(408, f"The request body did not arrive within {timeout:g} seconds.",
                         code="request_timeout") from None


async def _parse(request: Request, model: type[_M], config: ServerConfig) -> _M:
    body = await _read_body(request, config.max_body_bytes, config.body_timeout)
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise Refused(400, format_validation_error(e)) from None


def _check_served(engine: AsyncLLM, config: ServerConfig) -> str:
    """At startup: the sampling defaults fit the model and the chat template compiles and renders a one-message
    conversation; a ValueError naming the file otherwise. Returns the template's name for request errors."""
    template = config.chat_template_file or "the tokenizer's chat template"
    try:
        SamplingParams(**config.default_sampling).check_vocab(engine.llm.model.config.vocab_size)
    except SamplingParamError as e:
        raise ValueError(f"the server's sampling defaults (generation_config.json): {e}") from None
    if getattr(engine.tokenizer, "chat_template", None) is None:
        return template
    try:
        engine.tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                             tokenize=False)
    except Exception as e:  # a syntax error, the sandbox's limits, an undefined name: the template is broken
        raise ValueError(f"{template}: the chat template cannot render a one-message conversation "
                         f"({type(e).__name__}: {e})") from None
    return template


# ---------------------------------------------------------------- routes

def _json(model: BaseModel, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status, media_type="application/json")


class _Handlers:
    """The two generation endpoints; everything they share (engine, limits, metrics) lives here."""

    def __init__(self, engine: AsyncLLM, config: ServerConfig, metrics: ServerMetrics, template: str) -> None:
        self.engine, self.config, self.metrics, self.template = engine, config, metrics, template
        self.tokenizer = engine.tokenizer
        self.token_text = TokenText(engine.tokenizer)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.model_name:
            raise Refused.of(400, f"The model '{model}' does not exist: this server serves "
                                  f"'{self.config.model_name}'.", param="model", code="model_not_found")

    def _check_limits(self, req: ChatCompletionRequest | CompletionRequest, prompt_len: int) -> None:
        error = validate_limits(req, max_n=self.config.max_n, max_tokens_limit=self.config.max_tokens,
                                context_len=self.engine.max_model_len, prompt_len=prompt_len)
        if error is not None:
            raise Refused(400, error)

    def _job(self, req: ChatCompletionRequest | CompletionRequest, request_id: str, prompt_ids: list[int],
             prompt_text: str) -> Job:
        max_tokens = effective_max_tokens(req, max_tokens_limit=self.config.max_tokens,
                                          context_len=self.engine.max_model_len, prompt_len=len(prompt_ids))
        kwargs = {**self.config.default_sampling, **req.sampling_kwargs(), "max_tokens": max_tokens}
        try:
            params = SamplingParams(**kwargs)
        except SamplingParamError as e:
            raise Refused.of(400, str(e), param=e.param) from None
        return Job(request_id, prompt_ids, params, prompt_text)

    def _render(self, req: ChatCompletionRequest) -> str:
        kwargs = dict(req.chat_template_kwargs or {})
        reserved = sorted(_RESERVED_TEMPLATE_KWARGS & set(kwargs))
        if reserved:
            raise Refused.of(400, f"chat_template_kwargs may not set {reserved}: they are request parameters.",
                             param="chat_template_kwargs")
        tools = None
        if req.uses_tools:  # tool_choice "none": the model is not told about the tools at all
            tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
            choice = req.tool_choice
            kwargs["tool_choice"] = choice.model_dump() if isinstance(choice, BaseModel) else choice
        try:
            return self.tokenizer.apply_chat_template(req.template_messages(), add_generation_prompt=True,
                                                      tools=tools, tokenize=False, **kwargs)
        except Exception as e:  # it rendered at startup, so what fails now depends on these messages
            raise Refused.of(400, f"Cannot apply the chat template ({self.template}) to these messages: "
                                  f"{type(e).__name__}: {e}", param="messages", code="chat_template_error") from None

    async def _respond(self, request: Request, run: EngineRun, states: list[Any], stream: bool,
                       complete: Callable[[], BaseModel], chunk: Callable[..., str],
                       usage: Callable[[], Usage] | None) -> Response:
        if not stream:
            await unless_disconnected(request, run.collect(states))
            return _json(complete())
        await unless_disconnected(request, run.start())
        return SSEResponse(run.events(states, chunk, usage), run)

    async def chat(self, request: Request) -> Response:
        req = await _parse(request, ChatCompletionRequest, self.config)
        self._check_model(req.model)
        prompt = self._render(req)
        ids = self.tokenizer.encode(prompt)
        self._check_limits(req, len(ids))
        rid, created, model = new_id("chatcmpl"), int(time.time()), self.config.model_name
        run = EngineRun(self.engine, [self._job(req, rid, ids, prompt)], self.metrics, "messages")
        token_text = self.token_text if req.logprobs else None
        opened = prompt_opens_think(prompt)
        states = [ChatChoiceState(i, opened, req.uses_tools, req.stream, token_text) for i in range(req.n)]

        def usage() -> Usage:
            return Usage.of(len(ids), sum(s.num_tokens for s in states), sum(s.num_reasoning_tokens for s in states))

        def complete() -> ChatCompletionResponse:
            return ChatCompletionResponse(id=rid, created=created, model=model, choices=[s.choice() for s in states],
                                          usage=usage())

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage))

        return await self._respond(request, run, states, req.stream, complete, chunk,
                                   usage if req.include_usage else None)

    async def completions(self, request: Request) -> Response:
        req = await _parse(request, CompletionRequest, self.config)
        self._check_model(req.model)
        if req.echo and req.logprobs is not None:
            raise Refused.of(400, "echo together with logprobs is not supported: it needs the prompt's logprobs, "
                                  "which this server does not compute.", param="echo")
        prompts: list[tuple[list[int], str]] = []
        vocab = self.engine.llm.model.config.vocab_size
        for p in req.prompt:
            if isinstance(p, str):
                prompts.append((self.tokenizer.encode(p, add_special_tokens=True), p))
            elif max(p) >= vocab:
                raise Refused.of(400, f"Invalid prompt: token ids must be in [0, {vocab}), got {max(p)}.",
                                 param="prompt")
            else:
                prompts.append((list(p), self.tokenizer.decode(p) if req.echo else ""))
        self._check_limits(req, max(len(ids) for ids, _ in prompts))
        rid, created, model = new_id("cmpl"), int(time.time()), self.config.model_name
        jobs = [self._job(req, f"{rid}-{j}", ids, text) for j, (ids, text) in enumerate(prompts)]
        run = EngineRun(self.engine, jobs, self.metrics, "prompt")
        token_text = self.token_text if req.logprobs is not None else None
        states = [TextChoiceState(j * req.n + i, job.prompt_text if req.echo else "", token_text)
                  for j, job in enumerate(jobs) for i in range(req.n)]

        def usage() -> Usage:
            return Usage.of(sum(len(ids) for ids, _ in prompts), sum(s.num_tokens for s in states))

        def complete() -> CompletionResponse:
            return CompletionResponse(id=rid, created=created, model=model, choices=[s.choice() for s in states],
                                      usage=usage())

        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
            return sse(CompletionResponse(id=rid, created=created, model=model, choices=choices, usage=usage))

        return await self._respond(request, run, states, req.stream, complete, chunk,
                                   usage if req.include_usage else None)


def create_app(engine: AsyncLLM, config: ServerConfig) -> FastAPI:
    """The OpenAI-compatible app over a running engine (its tokenizer needs a chat template for chat).

    The caller owns the engine: `serve` / `BackgroundServer` shut it down. Raises ValueError, naming the file,
    when what it would serve is broken (see `_check_served`).
    """
    if engine.tokenizer is None:
        raise ValueError("the engine has no tokenizer: the server needs one for text prompts and the chat template")
    template = _check_served(engine, config)
    metrics = ServerMetrics(config.model_name, engine.stats)
    handlers = _Handlers(engine, config, metrics, template)
    app = FastAPI(title="r1forge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.config, app.state.metrics = engine, config, metrics
    app.add_middleware(_Guard, api_key=config.api_key, metrics=metrics)

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> Response:
        return JSONResponse(exc.body, exc.status, exc.headers)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody is there to read it

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> Response:  # logged by Starlette, then re-raised
        return JSONResponse(api_error(500, f"Internal server error: {type(exc).__name__}."), 500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return JSONResponse(api_error(exc.status_code, str(exc.detail)), exc.status_code, exc.headers)

    app.add_api_route("/v1/chat/completions", handlers.chat, methods=["POST"])
    app.add_api_route("/v1/completions", handlers.completions, methods=["POST"])

    @app.get("/v1/models")
    async def models() -> Response:
        return _json(ModelList(data=[ModelCard(id=config.model_name, max_model_len=engine.max_model_len)]))

    @app.get("/health")
    async def health() -> Response:
        ok = engine.is_running  # False once the engine loop died or the server is shutting down
        return JSONResponse({"status": "ok" if ok else "unavailable"}, 200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    return app
