"""AsyncLLM: the engine on a background thread, driven from asyncio (the server's view of it).

One thread owns the engine and steps it while any request is live; asyncio callers talk to it through a
command queue and receive deltas through per-request asyncio queues. All requests share one engine and
so one continuous batch. Cancelling the consumer of `generate` (a client disconnect) aborts the request,
which frees its cache blocks at the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future
from typing import Any

from r1forge.engine.llm import LLM
from r1forge.engine.outputs import StreamDelta
from r1forge.engine.sampling_params import SamplingParams


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the caller should retry later (HTTP 429)."""


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shutdown or an internal error)."""


class AsyncLLM:
    def __init__(self, llm: LLM, max_waiting: int = 256) -> None:
        self.llm = llm
        self.engine = llm.engine
        self.tokenizer = llm.tokenizer
        self.max_waiting = max_waiting
        self._commands: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._error: BaseException | None = None
        self._stats: dict[str, float] = self.engine.stats()
        self._thread = threading.Thread(target=self._run, name="r1forge-engine", daemon=True)
        self._thread.start()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            while True:
                self._drain_commands()
                if self._stopping and not self.engine.has_unfinished():
                    break
                if not self.engine.has_unfinished():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                for delta in self.engine.step():
                    self._deliver(delta)
                self._stats = self.engine.stats()
        except BaseException as e:  # an engine bug must not leave clients hanging forever
            self._error = e
            for loop, q in list(self._streams.values()):
                loop.call_soon_threadsafe(q.put_nowait, e)
        finally:
            self._stats = self.engine.stats()

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                prompt, params, rid, fut = payload
                try:
                    waiting = len(self.engine.scheduler.waiting)
                    if waiting >= self.max_waiting:
                        raise QueueFullError(f"{waiting} requests are already waiting; try again later")
                    self.engine.add_request(prompt, params, rid)
                    fut.set_result(rid)
                except BaseException as e:
                    self._streams.pop(rid, None)
                    fut.set_exception(e)
            elif kind == "abort":
                self.engine.abort(payload)
                target = self._streams.pop(payload, None)
                if target is not None:  # tell a still-listening consumer (e.g. on shutdown) that it ended
                    loop, q = target
                    loop.call_soon_threadsafe(q.put_nowait, StreamDelta(payload, 0, [], "", finish_reason="abort"))
                    loop.call_soon_threadsafe(q.put_nowait, None)

    def _deliver(self, delta: StreamDelta) -> None:
        target = self._streams.get(delta.request_id)
        if target is None:
            return
        loop, q = target
        req = self.engine.requests.get(delta.request_id)
        finished = req is not None and req.finished
        loop.call_soon_threadsafe(q.put_nowait, delta)
        if finished:
            loop.call_soon_threadsafe(q.put_nowait, None)
            self._streams.pop(delta.request_id, None)
            self.engine.requests.pop(delta.request_id, None)

    # ------------------------------------------------------------------ asyncio side
    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[StreamDelta]:
        """Stream the deltas of every completion of one request; raises ValueError for invalid input."""
        if self._error is not None or not self._thread.is_alive():
            raise EngineDeadError(f"engine is not running: {self._error!r}")
        if self._stopping:
            raise EngineDeadError("server is shutting down")
        rid = request_id or f"req-{uuid.uuid4().hex}"
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (loop, q)
        fut: Future = Future()
        self._commands.put(("add", (prompt, params, rid, fut)))
        self._wake.set()
        await asyncio.wrap_future(fut)
        finished = False
        try:
            while True:
                item = await q.get()
                if item is None:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"engine failed: {item!r}") from item
                yield item
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def stats(self) -> dict[str, float]:
        return dict(self._stats)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting requests, let in-flight ones finish for up to `timeout` seconds, then abort the rest."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            for rid in list(self.engine.requests):
                self.abort(rid)
            self._thread.join(5.0)
