"""AsyncLLM: the engine on a background thread, driven from asyncio (the server's view of it).

One thread owns the engine and steps it while any request is live; asyncio callers talk to it through a
command queue and receive deltas through per-request asyncio queues. All requests share one engine and
so one continuous batch. What a caller can rely on:
- a request's stream ends only after every one of its n completions has sent its final delta (with a
  finish_reason: "stop", "length", or "abort" when it was cancelled or cut by a shutdown);
- leaving `generate` early in any way (breaking out, closing the generator, cancelling the task, even
  before the first delta) aborts the request, which frees its cache blocks at once;
- `stats()` is refreshed after every step and every batch of commands (an abort included);
- `is_running` / `errored` / `dead_error` say whether the engine loop is alive (the server's /health);
- one request failing inside the engine ends that request (its stream's last deltas have finish_reason
  "error"); only an engine that fails with no request to blame ends the loop, which is logged and reported
  (`dead_error`) to every open stream as EngineDeadError; the server then exits with an error;
- `generate_many` submits several requests as one unit: all are admitted or all are refused. The queue limit
  counts what cannot start at once: a unit is refused with QueueFullError only while the waiting requests plus
  the unit would exceed `max_waiting` plus the free running slots, and with ValueError (never admissible) when
  it is larger than `max_waiting + max_num_seqs` even on an idle engine.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future
from typing import Any

from r1forge.engine.llm import LLM
from r1forge.engine.outputs import StreamDelta
from r1forge.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
_Add = tuple[str | list[int], SamplingParams, str]  # (prompt, params, request id) of one request of a unit


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the caller should retry later (HTTP 429)."""


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shutdown or an internal error)."""


def _submitted(fut: Future) -> bool:
    """Whether an "add" command reached the engine and was not refused (or may still be being added)."""
    return not fut.cancelled() and (not fut.done() or fut.exception() is None)


class AsyncLLM:
    def __init__(self, llm: LLM, max_waiting: int = 256) -> None:
        self.llm = llm
        self.engine = llm.engine
        self.tokenizer = llm.tokenizer
        self.max_waiting = max_waiting
        self._commands: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._lock = threading.Lock()  # orders queueing a command against the engine thread's exit
        self._closed = False  # the engine thread has ended: nothing reads the command queue any more
        self._stopping = False
        self._error: BaseException | None = None
        self._stats: dict[str, float] = self.engine.stats()
        self._thread = threading.Thread(target=self._run, name="r1forge-engine", daemon=True)
        self._thread.start()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_running(self) -> bool:
        """Whether the engine loop is alive and taking requests (False after shutdown() or a failure)."""
        return self._thread.is_alive() and not self._closed and not self._stopping and self._error is None

    @property
    def errored(self) -> bool:
        """Whether the engine loop died of an exception (`dead_error`)."""
        return self._error is not None

    @property
    def dead_error(self) -> BaseException | None:
        """The exception that ended the engine loop, or None."""
        return self._error

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            while True:
                if self._drain_commands():
                    self._stats = self.engine.stats()
                if not self.engine.has_unfinished():
                    if self._stopping:
                        break
                    self.engine.check_health()  # a dead tensor-parallel worker ends the loop while idle too
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self._deliver(self.engine.step())
                self._stats = self.engine.stats()
        except BaseException as e:  # an engine bug must not leave clients hanging forever
            logger.error("the engine loop failed; it takes no more requests", exc_info=e)
            self._error = e
            for rid in list(self._streams):
                self._send(rid, e)
        finally:
            with self._lock:
                self._closed = True
            self._refuse_commands()
            self._stats = self.engine.stats()
            self.engine.runner.shutdown()  # end tensor-parallel workers (a no-op on one device)

    def _drain_commands(self) -> int:
        """Run the queued commands; returns how many there were."""
        count = 0
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return count
            count += 1
            if kind == "add":
                self._add(*payload)
            elif kind == "abort":
                self._deliver(self.engine.abort(payload))  # a final "abort" delta for each unfinished completion
                self._end(payload)

    def _add(self, requests: list[_Add], fut: Future) -> None:
        """Admit a unit of requests, all or none (see the module docstring)."""
        if not fut.set_running_or_notify_cancel():  # the caller gave up before the engine got to it
            return
        added: list[str] = []
        try:
            self._check_room(len(requests))
            for prompt, params, rid in requests:
                self.engine.add_request(prompt, params, rid)
                added.append(rid)
            fut.set_result(None)
        except BaseException as e:
            for rid in added:
                self.engine.abort(rid)  # never stepped: nothing to deliver
            for _, _, rid in requests:
                self._streams.pop(rid, None)
            fut.set_exception(e)

    def _check_room(self, count: int) -> None:
        scheduler = self.engine.scheduler
        most = self.max_waiting + scheduler.max_num_seqs
        if count > most:
            raise ValueError(f"{count} prompts in one request, but this server takes at most {most} at once "
                             f"({self.max_waiting} waiting + {scheduler.max_num_seqs} running)")
        room = self.max_waiting + max(0, scheduler.max_num_seqs - len(scheduler.running))
        if len(scheduler.waiting) + count > room:
            raise QueueFullError(f"{len(scheduler.waiting)} requests are already waiting; try again later")

    def _refuse_commands(self) -> None:
        """After the loop ended: fail the adds still queued, whose callers would otherwise wait forever."""
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                requests, fut = payload
                for _, _, rid in requests:
                    self._streams.pop(rid, None)
                if fut.set_running_or_notify_cancel():
                    fut.set_exception(EngineDeadError(f"engine is not running: {self._error!r}"))

    def _deliver(self, deltas: list[StreamDelta]) -> None:
        """Hand each delta to its stream; then end the streams of the requests that finished. Ending them only
        after the whole batch matters for n > 1: the completions that finish in the same step all get their
        final delta."""
        items: list[tuple[str, StreamDelta | None]] = [(d.request_id, d) for d in deltas]
        # a request can only have finished in a step where one of its deltas carries a finish reason
        for rid in dict.fromkeys(d.request_id for d in deltas if d.finish_reason is not None):
            req = self.engine.requests.get(rid)
            if req is not None and req.finished:
                del self.engine.requests[rid]
                items.append((rid, None))
        self._send_many(items)
        for rid, item in items:
            if item is None:
                self._streams.pop(rid, None)

    def _send_many(self, items: list[tuple[str, StreamDelta | None]]) -> None:
        """Queue a step's items with one wake-up per consumer event loop, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[str, asyncio.Queue, StreamDelta | None]]] = {}
        for rid, item in items:
            target = self._streams.get(rid)
            if target is not None:
                by_loop.setdefault(target[0], []).append((rid, target[1], item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, [(q, item) for _, q, item in batch])
            except RuntimeError:  # the consumer's event loop is closed: nobody listens, so stop generating
                for rid in dict.fromkeys(rid for rid, _, _ in batch):
                    if self._streams.pop(rid, None) is not None:
                        self._commands.put(("abort", rid))

    def _end(self, request_id: str) -> None:
        self._send(request_id, None)
        self._streams.pop(request_id, None)

    def _send(self, request_id: str, item: StreamDelta | BaseException | None) -> None:
        target = self._streams.get(request_id)
        if target is None:
            return
        loop, q = target
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody listens, so stop generating
            self._streams.pop(request_id, None)
            self._commands.put(("abort", request_id))

    # ------------------------------------------------------------------ asyncio side
    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[StreamDelta]:
        """Stream the deltas of every completion of one request; raises ValueError for invalid input,
        QueueFullError when too many requests wait, EngineDeadError when the engine is not running."""
        ((rid, q, fut),) = self._submit([(prompt, params, request_id)])
        async for delta in self._stream(rid, q, fut):
            yield delta

    def generate_many(self, requests: list[tuple[str | list[int], SamplingParams, str | None]]
                      ) -> list[AsyncIterator[StreamDelta]]:
        """Submit requests as one unit, all admitted or all refused (module docstring); one stream each, which
        raises what `generate` raises. Call from the event loop that reads the streams."""
        return [self._stream(rid, q, fut) for rid, q, fut in self._submit(requests)]

    def _submit(self, requests: list[tuple[str | list[int], SamplingParams, str | None]]
                ) -> list[tuple[str, asyncio.Queue, Future]]:
        loop = asyncio.get_running_loop()
        fut: Future = Future()  # the unit's admission
        unit: list[_Add] = [(prompt, params, rid or f"req-{uuid.uuid4().hex}") for prompt, params, rid in requests]
        out = [(rid, asyncio.Queue(), fut) for _, _, rid in unit]
        with self._lock:
            if self._error is not None or self._closed:
                raise EngineDeadError(f"engine is not running: {self._error!r}")
            if self._stopping:
                raise EngineDeadError("engine is shutting down")
            rids = [rid for _, _, rid in unit]
            taken = [rid for rid in rids if rid in self._streams] or [r for r in set(rids) if rids.count(r) > 1]
            if taken:
                raise ValueError(f"request id {taken[0]!r} is already in use")
            for rid, q, _ in out:
                self._streams[rid] = (loop, q)
            self._commands.put(("add", (unit, fut)))
        self._wake.set()
        return out

    async def _stream(self, rid: str, q: asyncio.Queue, fut: Future) -> AsyncIterator[StreamDelta]:
        finished = False
        try:
            await asyncio.wrap_future(fut)
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
                if _submitted(fut):
                    self.abort(rid)  # queued after the add, so it finds the request even if the add is under way
                else:  # refused (the engine dropped the stream) or never taken by the engine
                    self._streams.pop(rid, None)

    def abort(self, request_id: str) -> None:
        """Cancel a request; its stream ends with a final "abort" delta for each unfinished completion."""
        with self._lock:
            if self._closed:
                return
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


def _put_all(items: list[tuple[asyncio.Queue, StreamDelta | None]]) -> None:
    for q, item in items:
        q.put_nowait(item)
