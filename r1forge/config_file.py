"""config.json on disk, for every config class: read with errors that name the file, written sorted.

`ConfigFile` gives a dataclass with `from_dict` / `to_dict` its `from_json`, `from_pretrained` and `save_json`,
so `ModelConfig` (DeepSeek) and `DenseConfig` (Qwen2, Llama) read and write checkpoints the same way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeVar

_C = TypeVar("_C", bound="ConfigFile")


def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """A config.json as a dict; a missing file or bad JSON is an error naming the file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return raw


class ConfigFile:
    """Mixin: the config.json side of a config dataclass that defines `from_dict` and `to_dict`."""

    @classmethod
    def from_json(cls: type[_C], path: str | os.PathLike) -> _C:
        return cls.from_dict(read_config_json(path))  # type: ignore[attr-defined]

    @classmethod
    def from_pretrained(cls: type[_C], directory: str | os.PathLike) -> _C:
        return cls.from_json(Path(directory) / "config.json")

    def save_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
