"""The engine and process side of `r1forge serve` (app.py is the OpenAI wire side).

- `ServerConfig`, and `build_engine`: the shared engine, an `AsyncLLM`.
- `EngineRun`: the engine requests behind one HTTP request (one per prompt), submitted together, merged into one
  stream, and always cleaned up: whenever the HTTP request ends early (client disconnect while streaming or
  waiting, cancellation, error) its engine requests are aborted and their cache blocks freed. Every path goes
  through `EngineRun.close`, which is synchronous because it runs inside cancelled task scopes.
- `serve` runs the app under uvicorn; `BackgroundServer` runs it on a thread with an already-bound socket
  (port 0 picks a free one) for tests, benchmarks and notebooks.

Shutdown order (SIGINT / SIGTERM, or `BackgroundServer.stop()`): uvicorn stops listening while the engine stops
taking requests (new ones on open connections get 503), in-flight requests keep generating for up to
`shutdown_timeout` seconds, then the rest are aborted and their streams end with an error event (their
non-streaming callers get 503), and only then do the connections close. No response is cut off mid-byte.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import uvicorn
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from r1forge.engine.async_llm import AsyncLLM, EngineDeadError, QueueFullError
from r1forge.engine.llm import LLM
from r1forge.engine.outputs import StreamDelta
from r1forge.engine.sampling_params import SamplingParams
from r1forge.serve.metrics import ServerMetrics
from r1forge.serve.protocol import SSE_DONE, Usage, api_error, sse

_T = TypeVar("_T")
logger = logging.getLogger(__name__)

# generation_config.json keys that become server-side sampling defaults (R1 ships temperature 0.6, top_p 0.95)
SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class ServerConfig:
    """Settings of one server; every limit here is enforced per request with a 4xx naming the parameter."""

    model_name: str = "r1forge"  # the id in /v1/models; a request's `model` must be it (or absent)
    host: str = "127.0.0.1"  # loopback unless asked otherwise: the API has no rate limiting per client
    port: int = 8000  # 0 picks a free port
    api_key: str | None = None  # when set, every route but /health needs `Authorization: Bearer <key>`
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_n: int = 16  # most completions per prompt
    max_tokens: int = 4096  # most completion tokens per request; also the budget when a request names none
    shutdown_timeout: float = 30.0  # seconds in-flight requests may keep generating after a shutdown signal
    default_sampling: dict[str, Any] = field(default_factory=dict)  # e.g. generation_config's temperature
    log_level: str = "info"  # uvicorn's log level

    def __post_init__(self) -> None:
        checks = [
            ("max_body_bytes", self.max_body_bytes >= 1),
            ("max_n", self.max_n >= 1),
            ("max_tokens", self.max_tokens >= 1),
            ("shutdown_timeout", self.shutdown_timeout >= 0),
            ("port", 0 <= self.port <= 65535),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"ServerConfig.{name} is out of range: {getattr(self, name)!r}")
        unknown = sorted(set(self.default_sampling) - set(SAMPLING_DEFAULT_KEYS))
        if unknown:
            raise ValueError(f"ServerConfig.default_sampling has unknown keys {unknown}; "
                             f"allowed: {list(SAMPLING_DEFAULT_KEYS)}")


def sampling_defaults(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The sampling defaults in a checkpoint's generation_config.json (empty if it has none)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        gen = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable generation config ({e})") from e
    if not isinstance(gen, dict):
        raise ValueError(f"{path}: expected a JSON object")
    defaults = {k: gen[k] for k in SAMPLING_DEFAULT_KEYS if isinstance(gen.get(k), (int, float))}
    if gen.get("do_sample") is False:  # transformers' greedy flag
        defaults["temperature"] = 0.0
    return defaults




# ---------------------------------------------------------------- one HTTP request on the engine

class Refused(Exception):
    """An HTTP error with an OpenAI error body, raised anywhere below a route and answered by the app."""

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(body["error"]["message"])
        self.status, self.body, self.headers = status, body, headers

    @classmethod
    def of(cls, status: int, message: str, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> Refused:
        return cls(status, api_error(status, message, param=param, code=code), headers)


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[_T]) -> _T:
    """Await `work` unless the client hangs up first; then cancel it and raise ClientGone. Call only once the
    body has been read: from then on the ASGI `receive` only ever reports the disconnect."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    raise ClientGone


class Job:
    """One engine request: a prompt and its n completions, with what the metrics need."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, prompt_text: str) -> None:
        self.request_id, self.prompt_ids, self.params, self.prompt_text = request_id, prompt_ids, params, prompt_text
        self.first_token_time: float | None = None
        self.end_time: float | None = None
        self.num_tokens: dict[int, int] = {}  # completion index -> output tokens so far
        self.done = False


class EngineRun:
    """The engine requests behind one HTTP request, submitted together and merged into one stream.

    `start` submits them all at once and waits for each one's first delta, so a refusal (invalid prompt,
    full queue, shutdown) becomes an HTTP status before any byte is sent. `close` is idempotent and sync.
    """

    def __init__(self, engine: AsyncLLM, jobs: list[Job], metrics: ServerMetrics, prompt_param: str) -> None:
        self.engine, self.jobs, self.metrics, self.prompt_param = engine, jobs, metrics, prompt_param
        self.arrival = time.monotonic()
        self._gens = [engine.generate(j.prompt_ids, j.params, j.request_id) for j in jobs]
        self._queue: asyncio.Queue[tuple[int, StreamDelta | BaseException | None]] = asyncio.Queue()
        self._tasks: list[asyncio.Future] = []
        self._started = self._closed = False

    async def start(self) -> None:
        async def first(gen: AsyncIterator[StreamDelta]) -> StreamDelta | None:
            try:
                return await gen.__anext__()
            except StopAsyncIteration:
                return None

        try:
            firsts = await asyncio.gather(*(first(g) for g in self._gens), return_exceptions=True)
        except BaseException:
            self.close()
            raise
        errors = [e for e in firsts if isinstance(e, BaseException)]
        if errors:
            self.close()
            e = next((x for x in errors if not isinstance(x, ValueError)), errors[0])
            if isinstance(e, QueueFullError):
                raise Refused.of(429, f"The server is overloaded: {e}.", code="queue_full",
                                 headers={"Retry-After": "1"})
            if isinstance(e, EngineDeadError):
                raise Refused.of(503, f"The engine is not accepting requests: {e}.", code="unavailable")
            if isinstance(e, ValueError):
                raise Refused.of(400, f"Invalid {self.prompt_param}: {e}.", param=self.prompt_param)
            raise e
        self._started = True
        for i, (gen, delta) in enumerate(zip(self._gens, firsts)):
            self._tasks.append(asyncio.ensure_future(self._pump(i, gen, delta)))

    async def _pump(self, i: int, gen: AsyncIterator[StreamDelta], first: StreamDelta | None) -> None:
        try:
            if first is not None:
                self._queue.put_nowait((i, first))
                async for delta in gen:
                    self._queue.put_nowait((i, delta))
            self._queue.put_nowait((i, None))
        except Exception as e:  # EngineDeadError: handed to the consumer
            self._queue.put_nowait((i, e))

    async def deltas(self) -> AsyncIterator[tuple[int, StreamDelta]]:
        """(job index, delta) in arrival order until every job ended; raises EngineDeadError if the engine died.
        Every completion's last delta has its finish_reason (AsyncLLM ends a stream only after all n)."""
        pending = len(self.jobs)
        while pending:
            i, item = await self._queue.get()
            job = self.jobs[i]
            if item is None:
                job.done, job.end_time, pending = True, time.monotonic(), pending - 1
                continue
            if isinstance(item, BaseException):
                raise item
            if item.token_ids:
                job.first_token_time = job.first_token_time or time.monotonic()
                job.num_tokens[item.index] = job.num_tokens.get(item.index, 0) + len(item.token_ids)
            yield i, item

    def close(self) -> None:
        """Abort whatever has not finished and record the metrics; safe to call any number of times."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        now = time.monotonic()
        for job in self.jobs:
            if not job.done:
                self.engine.abort(job.request_id)
            if self._started:
                tokens = job.num_tokens.values()
                self.metrics.record_tokens(len(job.prompt_ids), sum(tokens))
                ttft = None if job.first_token_time is None else job.first_token_time - self.arrival
                self.metrics.record_latency(e2e=(job.end_time or now) - self.arrival, ttft=ttft,
                                            generation_tokens=max(tokens, default=0))

    async def collect(self, states: list[Any]) -> None:
        """Run to the end, feeding each delta to its choice state (`states[job * n + index]`)."""
        try:
            await self.start()
            async for j, delta in self.deltas():
                if delta.finish_reason == "abort":
                    raise Refused.of(503, _ABORTED, code="unavailable")
                states[j * self.jobs[j].params.n + delta.index].feed(delta)
        except EngineDeadError as e:
            raise Refused.of(503, f"The engine failed: {e}.", code="unavailable") from None
        finally:
            self.close()

    async def events(self, states: list[Any], chunk: Callable[..., str],
                     usage: Callable[[], Usage] | None) -> AsyncIterator[str]:
        """The SSE stream: the states' opening chunk, their chunks per delta, the usage chunk, [DONE]. An engine
        failure or a shutdown abort ends it with an error event, which OpenAI clients raise as an APIError."""
        try:
            opening = [c for s in states if (c := s.opening()) is not None]
            if opening:
                yield chunk(opening)
            async for j, delta in self.deltas():
                if delta.finish_reason == "abort":
                    yield sse(api_error(503, _ABORTED))
                    break
                for c in states[j * self.jobs[j].params.n + delta.index].chunks(delta):
                    yield chunk([c])
            else:
                if usage is not None:
                    yield chunk([], usage())
            yield SSE_DONE
        except EngineDeadError as e:
            yield sse(api_error(503, f"The engine failed: {e}."))
            yield SSE_DONE
        finally:
            self.close()


_ABORTED = "The request was ended because the server is shutting down."


class SSEResponse(StreamingResponse):
    """Server-sent events whose generator is closed however the response ends (finished, client gone,
    send error, cancellation) and whose `EngineRun` is closed even if the generator never started."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], run: EngineRun) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.run = run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:  # ASGI spec >= 2.4 servers report the disconnect as a send error
            pass
        finally:
            self.run.close()
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


# ---------------------------------------------------------------- the process

class _GracefulServer(uvicorn.Server):
    """uvicorn, plus: drain the engine while uvicorn waits for the open connections (see module docstring)."""

    def __init__(self, config: uvicorn.Config, engine: AsyncLLM, drain_timeout: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.drain_timeout = drain_timeout

    async def on_tick(self, counter: int) -> bool:
        """Exit when the engine died (a tensor-parallel worker lost): /health already says 503."""
        if self.engine.errored and not self.should_exit:
            logger.error("the engine stopped, shutting the server down: %s", self.engine.dead_error)
            self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        draining = loop.run_in_executor(None, self.engine.shutdown, self.drain_timeout)
        await super().shutdown(sockets)
        await draining


def _uvicorn_config(app: Any, config: ServerConfig) -> uvicorn.Config:
    # uvicorn's own backstop only: the engine drain ends every stream before it, see _GracefulServer.
    return uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                          timeout_graceful_shutdown=int(config.shutdown_timeout) + 10, access_log=False)


def build_engine(model_dir: str | os.PathLike, max_waiting: int = 256, **llm_kwargs: Any) -> AsyncLLM:
    """Load a checkpoint (and its tokenizer) into an `AsyncLLM`; `llm_kwargs` go to `LLM`."""
    llm = LLM(model_dir, **llm_kwargs)
    if llm.tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer.json: the server needs a tokenizer and chat template")
    return AsyncLLM(llm, max_waiting=max_waiting)


def serve(engine: AsyncLLM, config: ServerConfig) -> None:
    """Serve `engine` over HTTP until SIGINT / SIGTERM, then shut down gracefully (blocks)."""
    from r1forge.serve.app import create_app

    app = create_app(engine, config)
    server = _GracefulServer(_uvicorn_config(app, config), engine, config.shutdown_timeout)
    server.run()
    if engine.errored:
        raise EngineDeadError(f"the server stopped because the engine failed: {engine.dead_error}")


class BackgroundServer:
    """The server on a daemon thread, listening on `config.host` at a free port when `config.port` is 0.

    Usage: `with BackgroundServer(engine, config) as srv: openai.OpenAI(base_url=srv.url + "/v1", ...)`.
    Leaving the block (or `stop()`) shuts down gracefully, the engine included.
    """

    def __init__(self, engine: AsyncLLM, config: ServerConfig, start_timeout: float = 30.0) -> None:
        from r1forge.serve.app import create_app

        self.engine = engine
        self.config = config
        self.app = create_app(engine, config)
        self._socket = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((config.host, config.port))
        self.port: int = self._socket.getsockname()[1]
        self._server = _GracefulServer(_uvicorn_config(self.app, config), engine, config.shutdown_timeout)
        self._thread = threading.Thread(target=self._run, name="r1forge-http", daemon=True)
        self._error: BaseException | None = None
        self._thread.start()
        deadline = time.monotonic() + start_timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the server thread died while starting: {self._error!r}") from self._error
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the server did not start within {start_timeout}s")
            time.sleep(0.02)

    def _run(self) -> None:
        try:
            asyncio.run(self._server.serve(sockets=[self._socket]))
        except BaseException as e:  # raised again by __init__ / stop, on the caller's thread
            self._error = e

    @property
    def url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float | None = None) -> None:
        """Graceful shutdown (see module docstring); waits for the thread to end."""
        self._server.should_exit = True
        self._thread.join(timeout if timeout is not None else self.config.shutdown_timeout + 30)
        self._socket.close()
        if self._thread.is_alive():
            raise TimeoutError("the server thread did not stop")
        if self._error is not None:
            raise RuntimeError(f"the server thread failed: {self._error!r}") from self._error

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
