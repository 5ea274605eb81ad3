"""`r1forge serve MODEL_DIR`: the OpenAI-compatible HTTP server (FastAPI + uvicorn) over the batched engine.

Binds 127.0.0.1 unless --host says otherwise. With --api-key (or R1FORGE_API_KEY) every route but /health
needs `Authorization: Bearer <key>`. Ctrl-C / SIGTERM shut down gracefully (see r1forge.serve.server).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from r1forge.commands.engine_args import add_engine_arguments, engine_kwargs

if TYPE_CHECKING:
    from r1forge.serve import ServerConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: the directory name)")
    p.add_argument("--api-key", default=None, help="require this bearer key (default: env R1FORGE_API_KEY)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--max-n", type=int, default=16, help="most completions per prompt")
    p.add_argument("--max-tokens", type=int, default=4096, help="most completion tokens per request")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests before 429")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences decoded together")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the latent cache")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may finish after SIGINT/SIGTERM")
    add_engine_arguments(p)
    p.add_argument("--log-level", default="info")


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig the arguments describe (the API key falls back to env R1FORGE_API_KEY)."""
    from r1forge.serve import ServerConfig, sampling_defaults

    return ServerConfig(
        model_name=args.served_model_name or Path(args.model).resolve().name, host=args.host, port=args.port,
        api_key=args.api_key or os.environ.get("R1FORGE_API_KEY") or None, max_body_bytes=args.max_body_bytes,
        max_n=args.max_n, max_tokens=args.max_tokens, shutdown_timeout=args.shutdown_timeout,
        default_sampling=sampling_defaults(args.model), log_level=args.log_level)


def run(args: argparse.Namespace) -> int:
    from r1forge.engine.async_llm import EngineDeadError
    from r1forge.serve import build_engine, serve
    from r1forge.train.cli import run_with_errors

    def start() -> int:
        config = server_config(args)
        engine = build_engine(args.model, max_waiting=args.max_waiting, max_num_seqs=args.max_num_seqs,
                              max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory,
                              **engine_kwargs(args))
        try:
            serve(engine, config)
        except EngineDeadError as e:  # e.g. a tensor-parallel worker died: say so in one message
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0

    return run_with_errors(start)
