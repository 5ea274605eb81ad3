"""Pick the config class of a checkpoint from its `model_type`: DeepSeek (`ModelConfig`) or dense (`DenseConfig`).

`load_config(directory)`, `config_from_dict(raw)` and `config_from_preset(name)` are what `load_model`,
`r1forge info`, the trainers and the engine call when any architecture will do; code that needs DeepSeek's
fields calls `ModelConfig` directly and gets an error naming `model_type` for a dense config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

from r1forge.config import DEEPSEEK_MODEL_TYPES, ModelConfig
from r1forge.config_file import read_config_json
from r1forge.dense_config import DENSE_MODEL_TYPES, DenseConfig

AnyConfig = Union[ModelConfig, DenseConfig]
MODEL_TYPES = DEEPSEEK_MODEL_TYPES + DENSE_MODEL_TYPES


def config_from_dict(raw: dict[str, Any]) -> AnyConfig:
    """Dispatch on `model_type` (DeepSeek-V3 when absent, as DeepSeek's own configs predate the key)."""
    model_type = raw.get("model_type", "deepseek_v3")
    if model_type in DENSE_MODEL_TYPES:
        return DenseConfig.from_dict(raw)
    if model_type in DEEPSEEK_MODEL_TYPES:
        return ModelConfig.from_dict(raw)
    raise ValueError(f"unsupported `model_type` {model_type!r}; expected one of {', '.join(MODEL_TYPES)}")


def load_config(directory: str | os.PathLike) -> AnyConfig:
    """The config of a checkpoint directory (or of the directory holding a given file)."""
    directory = Path(directory)
    if directory.is_file():
        directory = directory.parent
    path = directory / "config.json"
    try:
        return config_from_dict(read_config_json(path))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def config_from_preset(name: str, **overrides: Any) -> AnyConfig:
    from r1forge.presets import PRESETS

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return config_from_dict({**PRESETS[name], **overrides})
