"""`r1forge serve MODEL_DIR`: the OpenAI-compatible HTTP server (FastAPI + uvicorn) over the batched engine.

Binds 127.0.0.1 unless --host says otherwise. With --api-key (or R1FORGE_API_KEY) every route but /health
needs `Authorization: Bearer <key>`. Ctrl-C / SIGTERM shut down gracefully (see r1forge.serve.server).
"""

from __future__ import annotations

import argparse
import os
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
    p.add_argument("--api-key", default=None, help="require this bearer key (default: env R1FORGE_API_KEY); "
                                                   "an empty key is refused, not taken as no key")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--max-n", type=int, default=16, help="most completions per prompt")
    p.add_argument("--max-tokens", type=int, default=4096, help="most completion tokens per request")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests before 429")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences decoded together")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the latent cache")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client may take to send its request body before 408")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may finish after SIGINT/SIGTERM")
    add_engine_arguments(p)
    p.add_argument("--log-level", default="info")


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig the arguments describe (the API key falls back to env R1FORGE_API_KEY)."""
    from r1forge.serve import ServerConfig, chat_template_file, sampling_defaults

    api_key = args.api_key
    if api_key is None:
        api_key = os.environ.get("R1FORGE_API_KEY")
        if api_key is not None and not api_key.strip():
            raise ValueError("R1FORGE_API_KEY is set but empty: unset it to serve without a key, or set a key")
    elif not api_key.strip():
        raise ValueError("--api-key is empty: leave it out to serve without a key, or give a key")
    return ServerConfig(
        model_name=args.served_model_name or Path(args.model).resolve().name, host=args.host, port=args.port,
        api_key=api_key, max_body_bytes=args.max_body_bytes, body_timeout=args.body_timeout,
        max_n=args.max_n, max_tokens=args.max_tokens, shutdown_timeout=args.shutdown_timeout,
        default_sampling=sampling_defaults(args.model), chat_template_file=chat_template_file(args.model),
        log_level=args.log_level)


def run(args: argparse.Namespace) -> int:
    """Exit 0 after a graceful shutdown, 2 for a bad argument or checkpoint, 1 when the engine failed."""
    import sys

    from r1forge.engine.async_llm import EngineDeadError
    from r1forge.serve import build_engine, serve
    from r1forge.commands.errors import run_with_errors

    def start() -> int:
        config = server_config(args)
        engine = build_engine(args.model, max_waiting=args.max_waiting, max_num_seqs=args.max_num_seqs,
                              max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory,
                              **engine_kwargs(args))
        try:
            serve(engine, config)
        except EngineDeadError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0

    return run_with_errors(start)
