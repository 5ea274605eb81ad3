"""`r1forge serve`: an OpenAI-compatible HTTP server over the batched engine (chat with reasoning_content and
tool calls, completions, Prometheus metrics). `create_app` builds the FastAPI app, `serve` runs it.

Exports load lazily, so that `r1forge chat` (which uses only the reasoning parser) and the parser tests do not
import FastAPI and uvicorn.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "create_app": "r1forge.serve.app",
    "ServerConfig": "r1forge.serve.config",
    "BackgroundServer": "r1forge.serve.server",
    "build_engine": "r1forge.serve.server",
    "sampling_defaults": "r1forge.serve.config",
    "chat_template_file": "r1forge.serve.config",
    "serve": "r1forge.serve.server",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'r1forge.serve' has no attribute {name!r}")
