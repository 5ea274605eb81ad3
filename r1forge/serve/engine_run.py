"""One HTTP request's life on the engine (app.py is the OpenAI wire side, server.py the process).

- `EngineRun`: the engine requests behind one HTTP request (one per prompt), submitted together, merged into one
  stream, and always cleaned up: whenever the HTTP request ends early (client disconnect while streaming or
  waiting, cancellation, error) its engine requests are aborted and their cache blocks freed. Every path goes
  through `EngineRun.close`, which is synchronous because it runs inside cancelled task scopes.
- `SSEResponse`: the stream whose generator and run are closed however the response ends.
- `Refused` (an HTTP error with an OpenAI body) and `ClientGone`, with `unless_disconnected`, the watcher that
  turns a hang-up into `ClientGone` while a non-streaming request waits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from r1forge.engine.async_llm import AsyncLLM, EngineDeadError, QueueFullError
from r1forge.engine.outputs import StreamDelta
from r1forge.engine.sampling_params import SamplingParamError, SamplingParams
from r1forge.serve.metrics import ServerMetrics
from r1forge.serve.protocol import SSE_DONE, Usage, api_error, sse

_T = TypeVar("_T")


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
        self._queue: asyncio.Queue[tuple[int, StreamDelta | BaseException | None]] = asyncio.Queue()
        self._tasks: list[asyncio.Future] = []
        self._started = self._closed = False

    async def start(self) -> None:
        """Submit the jobs as one unit (all admitted or all refused) and wait for each one's first delta."""
        async def first(gen: AsyncIterator[StreamDelta]) -> StreamDelta | None:
            try:
                return await gen.__anext__()
            except StopAsyncIteration:
                return None

        try:
            gens = self.engine.generate_many([(j.prompt_ids, j.params, j.request_id) for j in self.jobs])
        except Exception as e:
            self.close()
            raise self._refusal(e) from None
        try:
            firsts = await asyncio.gather(*(first(g) for g in gens), return_exceptions=True)
        except BaseException:
            self.close()
            raise
        errors = [e for e in firsts if isinstance(e, BaseException)]
        if errors:
            self.close()
            raise self._refusal(next((x for x in errors if not isinstance(x, ValueError)), errors[0]))
        self._started = True
        for i, (gen, delta) in enumerate(zip(gens, firsts)):
            self._tasks.append(asyncio.ensure_future(self._pump(i, gen, delta)))

    def _refusal(self, e: BaseException) -> BaseException:
        """The HTTP answer to the engine refusing the jobs (anything else is raised as it is)."""
        if isinstance(e, QueueFullError):
            return Refused.of(429, f"The server is overloaded: {e}.", code="queue_full", headers={"Retry-After": "1"})
        if isinstance(e, EngineDeadError):
            return Refused.of(503, f"The engine is not accepting requests: {e}.", code="unavailable")
        if isinstance(e, SamplingParamError):  # a bound only the engine knows, e.g. top_k <= vocabulary
            return Refused.of(400, f"{e}.", param=e.param)
        if isinstance(e, ValueError):
            return Refused.of(400, f"Invalid {self.prompt_param}: {e}.", param=self.prompt_param)
        return e

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
                if delta.finish_reason == "error":
                    raise Refused.of(500, _failed(delta), code="engine_error")
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
                if delta.finish_reason == "error":
                    yield sse(api_error(500, _failed(delta), code="engine_error"))
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


def _failed(delta: StreamDelta) -> str:
    return f"The engine failed while processing this request ({delta.error}); the server keeps serving others."


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
