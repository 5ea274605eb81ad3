"""The process of `r1forge serve`: the shared engine, uvicorn, and graceful shutdown.

- `build_engine`: a checkpoint loaded into the shared engine, an `AsyncLLM`.
- `serve` runs the app under uvicorn; `BackgroundServer` runs it on a thread with an already-bound socket
  (port 0 picks a free one) for tests, benchmarks and notebooks.

Shutdown order (SIGINT / SIGTERM, or `BackgroundServer.stop()`): uvicorn stops listening while the engine stops
taking requests (new ones on open connections get 503), in-flight requests keep generating for up to
`shutdown_timeout` seconds, then the rest are aborted and their streams end with an error event (their
non-streaming callers get 503), and only then do the connections close. No response is cut off mid-byte.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from typing import Any

import uvicorn

from r1forge.engine.async_llm import AsyncLLM, EngineDeadError
from r1forge.engine.llm import LLM
from r1forge.serve.app import create_app
from r1forge.serve.config import ServerConfig


class _GracefulServer(uvicorn.Server):
    """uvicorn, plus: drain the engine while uvicorn waits for the open connections (see module docstring), and
    stop when the engine loop has died (a broken engine: /health says 503 until the process ends)."""

    def __init__(self, config: uvicorn.Config, engine: AsyncLLM, drain_timeout: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.drain_timeout = drain_timeout

    async def on_tick(self, counter: int) -> bool:
        return self.engine.errored or await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        draining = loop.run_in_executor(None, self.engine.shutdown, self.drain_timeout)
        await super().shutdown(sockets)
        await draining


def _uvicorn_config(app: Any, config: ServerConfig) -> uvicorn.Config:
    # uvicorn's own backstop only: the engine drain ends every stream before it, see _GracefulServer.
    return uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                          timeout_graceful_shutdown=int(config.shutdown_timeout) + 10, access_log=False,
                          timeout_keep_alive=5)  # idle connections; a stalled body is the app's (body_timeout)


def build_engine(model_dir: str | os.PathLike, max_waiting: int = 256, **llm_kwargs: Any) -> AsyncLLM:
    """Load a checkpoint (and its tokenizer) into an `AsyncLLM`; `llm_kwargs` go to `LLM`."""
    llm = LLM(model_dir, **llm_kwargs)
    if llm.tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer.json: the server needs a tokenizer and chat template")
    return AsyncLLM(llm, max_waiting=max_waiting)


def serve(engine: AsyncLLM, config: ServerConfig) -> None:
    """Serve `engine` over HTTP until SIGINT / SIGTERM, then shut down gracefully (blocks).

    Raises EngineDeadError once the server stopped because the engine failed with no request to blame.
    """
    app = create_app(engine, config)
    server = _GracefulServer(_uvicorn_config(app, config), engine, config.shutdown_timeout)
    server.run()
    if engine.errored:
        raise EngineDeadError(f"the engine failed ({engine.dead_error!r}), so the server stopped")


class BackgroundServer:
    """The server on a daemon thread, listening on `config.host` at a free port when `config.port` is 0.

    Usage: `with BackgroundServer(engine, config) as srv: openai.OpenAI(base_url=srv.url + "/v1", ...)`.
    Leaving the block (or `stop()`) shuts down gracefully, the engine included.
    """

    def __init__(self, engine: AsyncLLM, config: ServerConfig, start_timeout: float = 30.0) -> None:
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
