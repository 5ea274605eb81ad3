"""The settings of one `r1forge serve` process: `ServerConfig`, and what a checkpoint directory gives it (the
sampling defaults of its generation_config.json, the file its chat template comes from).

What the server serves is checked when it starts, not when the first client pays for it: a bad sampling default
is an error naming generation_config.json and the key (not a 400 blaming the client's parameter), and the chat
template is compiled and test-rendered by `create_app`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1forge.data.tokenizer import CONFIG_FILE, TEMPLATE_FILE
from r1forge.engine.sampling_params import SamplingParamError, SamplingParams

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
    body_timeout: float = 30.0  # seconds a client may take to send its whole request body; then 408
    max_n: int = 16  # most completions per prompt
    max_tokens: int = 4096  # most completion tokens per request; also the budget when a request names none
    shutdown_timeout: float = 30.0  # seconds in-flight requests may keep generating after a shutdown signal
    default_sampling: dict[str, Any] = field(default_factory=dict)  # e.g. generation_config's temperature
    chat_template_file: str | None = None  # where the tokenizer's chat template came from, for error messages
    log_level: str = "info"  # uvicorn's log level

    def __post_init__(self) -> None:
        checks = [
            ("max_body_bytes", self.max_body_bytes >= 1),
            ("body_timeout", self.body_timeout > 0),
            ("max_n", self.max_n >= 1),
            ("max_tokens", self.max_tokens >= 1),
            ("shutdown_timeout", self.shutdown_timeout >= 0),
            ("port", 0 <= self.port <= 65535),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"ServerConfig.{name} is out of range: {getattr(self, name)!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("ServerConfig.api_key is empty: use None to serve without a key")
        unknown = sorted(set(self.default_sampling) - set(SAMPLING_DEFAULT_KEYS))
        if unknown:
            raise ValueError(f"ServerConfig.default_sampling has unknown keys {unknown}; "
                             f"allowed: {list(SAMPLING_DEFAULT_KEYS)}")
        try:
            SamplingParams(**self.default_sampling)
        except SamplingParamError as e:
            raise ValueError(f"ServerConfig.default_sampling[{e.param!r}]: {e}") from None


def sampling_defaults(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The sampling defaults in a checkpoint's generation_config.json (empty if it has none); a value the
    engine would refuse is an error naming the file and the key."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        gen = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable generation config ({e})") from e
    if not isinstance(gen, dict):
        raise ValueError(f"{path}: expected a JSON object")
    defaults = {k: gen[k] for k in SAMPLING_DEFAULT_KEYS if gen.get(k) is not None}
    if gen.get("do_sample") is False:  # transformers' greedy flag
        defaults["temperature"] = 0.0
    try:
        SamplingParams(**defaults)
    except SamplingParamError as e:
        raise ValueError(f"{path}: {e.param} {defaults[e.param]!r} is not a valid sampling default "
                         f"({e})") from None
    return defaults


def chat_template_file(model_dir: str | os.PathLike) -> str:
    """The file a checkpoint's chat template is read from (chat_template.jinja wins, as in load_tokenizer)."""
    directory = Path(model_dir)
    return str(directory / TEMPLATE_FILE if (directory / TEMPLATE_FILE).is_file() else
               directory / CONFIG_FILE)
