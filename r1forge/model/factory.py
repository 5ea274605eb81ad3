"""Config -> model, for any architecture: the one place that maps a config class to its model class."""

from __future__ import annotations

import torch

from r1forge.config import ModelConfig
from r1forge.dense_config import DenseConfig
from r1forge.model.base import CausalLM
from r1forge.model.dense import DenseForCausalLM
from r1forge.model.transformer import DeepseekForCausalLM, keep_router_fp32


def new_model(config: ModelConfig | DenseConfig, with_mtp: bool = False) -> CausalLM:
    """An uninitialised model of the config's architecture (build under `torch.device("meta")` to skip memory).

    `with_mtp` builds DeepSeek's multi-token-prediction modules; a dense config has none and ignores it.
    """
    if isinstance(config, DenseConfig):
        return DenseForCausalLM(config)
    if isinstance(config, ModelConfig):
        return DeepseekForCausalLM(config, with_mtp=with_mtp)
    raise TypeError(f"expected a ModelConfig or DenseConfig, got {type(config).__name__}")


def build_model(config: ModelConfig | DenseConfig, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", with_mtp: bool = False) -> CausalLM:
    """A randomly initialised model (seeded by torch's global RNG)."""
    model = new_model(config, with_mtp=with_mtp)
    model.init_weights()
    model.to(device=device, dtype=dtype)
    keep_router_fp32(model)
    return model
