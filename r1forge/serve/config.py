"""The settings of one `r1forge serve` process: `ServerConfig`, and the sampling defaults a checkpoint's
generation_config.json gives it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
