"""The student's shape: DeepSeek-R1's distilled models are dense, so by default the teacher's architecture with
every MoE layer replaced by the dense SwiGLU FFN (`first_k_dense_replace = num_hidden_layers`), optionally
narrower or shallower; or, as R1 itself did, another architecture: a Qwen2 / Llama student from a preset
(`deepseek-r1-distill-qwen-1.5b`, `tiny-qwen2`, ...) or a config.json, scaled down by the same shape fields.

Only what distillation needs is forced: the vocabulary (and bos/eos/pad ids) stays the teacher's, because the
student reads the teacher's tokenizer and, for forward-KL distillation, matches the teacher's distribution over
the same vocabulary; MTP modules are dropped (the student is trained on next-token targets only).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from r1forge.auto_config import config_from_dict
from r1forge.config_file import read_config_json
from r1forge.config import ModelConfig
from r1forge.dense_config import DenseConfig
from r1forge.model import CausalLM, build_model

_TIED_TO_TEACHER = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")


def _check_overrides(cls: type, teacher: ModelConfig, overrides: dict[str, Any]) -> None:
    """Every override a field of the student's config class; vocabulary and special ids the teacher's."""
    known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    for key in overrides:
        if key not in known:
            raise ValueError(f"student override {key!r} is not a {cls.__name__} field")
        if key in _TIED_TO_TEACHER and overrides[key] != getattr(teacher, key):
            raise ValueError(f"student override {key!r}={overrides[key]!r}: the student shares the teacher's "
                             f"tokenizer, so it must stay {getattr(teacher, key)!r}")


def dense_student_config(teacher: ModelConfig, *, dense: bool = True, num_hidden_layers: int | None = None,
                         hidden_size: int | None = None, intermediate_size: int | None = None,
                         num_attention_heads: int | None = None, **overrides: Any) -> ModelConfig:
    """A student config derived from the teacher's.

    Args:
        teacher: the teacher's config.
        dense: no MoE layers (R1's distilled students are dense); False keeps the teacher's MoE layout.
        num_hidden_layers, hidden_size, intermediate_size, num_attention_heads: a smaller student (None keeps
            the teacher's value).
        overrides: any other ModelConfig field (e.g. `kv_lora_rank`); vocab_size and the special token ids
            cannot change (ValueError), since the student shares the teacher's tokenizer and output space.

    Returns:
        the student's ModelConfig, validated (a bad value raises ValueError naming the key).
    """
    _check_overrides(ModelConfig, teacher, overrides)
    changes: dict[str, Any] = {"num_nextn_predict_layers": 0, **overrides}
    for key, value in (("num_hidden_layers", num_hidden_layers), ("hidden_size", hidden_size),
                       ("intermediate_size", intermediate_size), ("num_attention_heads", num_attention_heads)):
        if value is not None:
            changes[key] = value
    layers = changes.get("num_hidden_layers", teacher.num_hidden_layers)
    if dense:
        changes["first_k_dense_replace"] = layers
    else:
        changes.setdefault("first_k_dense_replace", min(teacher.first_k_dense_replace, layers))
    config = teacher.replace(**changes)
    if dense and config.is_moe:  # cannot happen unless replace() changes its rules; keep the promise explicit
        raise ValueError("student: a dense student must have first_k_dense_replace == num_hidden_layers")
    return config


def other_architecture_student_config(teacher: ModelConfig, source: str, *, num_hidden_layers: int | None = None,
                                     hidden_size: int | None = None, intermediate_size: int | None = None,
                                     num_attention_heads: int | None = None,
                                     **overrides: Any) -> ModelConfig | DenseConfig:
    """A student of its own architecture (Qwen2 / Llama) that reads the teacher's tokenizer.

    Args:
        teacher: the teacher's config: its vocab_size and bos/eos/pad ids become the student's.
        source: a preset name (r1forge.presets) or the path of a config.json.
        num_hidden_layers, hidden_size, intermediate_size, num_attention_heads: scale the shape down (None keeps
            the preset's); `overrides` set any other field, e.g. num_key_value_heads or head_dim.
    Returns:
        the validated config (a head count that does not divide is a ValueError naming the key).
    """
    from r1forge.presets import PRESETS

    raw = dict(PRESETS[source]) if source in PRESETS else read_config_json(source)
    cls = DenseConfig if raw.get("model_type") in ("qwen2", "llama") else ModelConfig
    _check_overrides(cls, teacher, overrides)
    if hidden_size is not None or num_attention_heads is not None:
        raw.pop("head_dim", None)  # derived again from the new width and head count
    for key, value in (("num_hidden_layers", num_hidden_layers), ("hidden_size", hidden_size),
                       ("intermediate_size", intermediate_size), ("num_attention_heads", num_attention_heads)):
        if value is not None:
            raw[key] = value
    raw.update(overrides)
    raw.update({key: getattr(teacher, key) for key in _TIED_TO_TEACHER})
    if cls is DenseConfig and raw.get("max_window_layers") is not None:
        raw["max_window_layers"] = min(raw["max_window_layers"], raw["num_hidden_layers"])
    return config_from_dict(raw)


def build_student(config: ModelConfig | DenseConfig, seed: int = 0, device: str | torch.device = "cpu") -> CausalLM:
    """A freshly initialised student (deterministic in `seed`), in training mode."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = build_model(config, device=device, with_mtp=config.num_nextn_predict_layers > 0)
    finally:
        torch.random.set_rng_state(state)
    model.train()
    return model
