"""`CausalLM`: what the engine, the trainers, GRPO and distillation need from a model, whatever its architecture.

A causal LM here is `model` (embedding, decoder layers, final norm: `model(input_ids, positions, metadata)` ->
hidden states) and `lm_head`, with Hugging Face parameter names so that `state_dict()` is the checkpoint.
Beyond that a model says what it caches per token (`cache_spec`), which of its layers are MoE (`moe_layers`,
for load balancing and graph-safe dispatch) and how many MTP modules it has (`num_mtp`). Both families,
`DeepseekForCausalLM` (MLA + MoE) and `DenseForCausalLM` (GQA), derive from it; nothing downstream branches on
the architecture.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from r1forge.model.attention_metadata import AttentionMetadata
from r1forge.model.cache_spec import CacheSpec
from r1forge.model.norm import RMSNorm


class CausalLM(nn.Module):
    """Base of every r1forge model. `model(input_ids)` -> logits [B, T, vocab]."""

    config: Any
    model: nn.Module
    lm_head: nn.Linear

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                metadata: AttentionMetadata | None = None) -> torch.Tensor:
        return self.lm_head(self.model(input_ids, positions, metadata))

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      metadata: AttentionMetadata | None = None) -> torch.Tensor:
        """The final normed hidden states [B, T, D], through this module (so wrappers of `forward`, such as
        FSDP's root hooks, see the call); trainers that need hidden states for MTP call this."""
        return self.model(input_ids, positions, metadata)

    def cache_spec(self) -> CacheSpec:
        """Per-token layout of the paged cache the engine allocates for this model."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its cache")

    @property
    def num_mtp(self) -> int:
        """Multi-token prediction modules built (0 unless the architecture has them)."""
        return 0

    def moe_layers(self) -> list[nn.Module]:
        """The DeepSeekMoE layers (none in a dense model)."""
        from r1forge.model.moe import DeepseekMoE

        return [m for m in self.modules() if isinstance(m, DeepseekMoE)]

    def save_pretrained(self, directory: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
        """Write the Hugging Face layout (config.json + safetensors), loadable by transformers."""
        from r1forge.checkpoint import save_checkpoint

        save_checkpoint(self, directory, max_shard_size=max_shard_size)


class PreNormDecoderLayer(nn.Module):
    """h = h + self_attn(input_layernorm(h)); h = h + mlp(post_attention_layernorm(h)). Subclasses build the four
    modules (MLA or GQA attention, a dense FFN or DeepSeekMoE)."""

    self_attn: nn.Module
    mlp: nn.Module
    input_layernorm: RMSNorm
    post_attention_layernorm: RMSNorm

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                metadata: AttentionMetadata | None = None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, metadata)
        return h + self.mlp(self.post_attention_layernorm(h))


@torch.no_grad()
def init_normal_(module: nn.Module, std: float, also: type[nn.Module] | None = None) -> None:
    """Normal(0, std) for every Linear and Embedding weight (and, in the same pass, every `also` module's
    weight: DeepSeek's routers), zero biases, ones for RMSNorm weights. One pass in module order, so the same
    seed gives the same weights as before the dense family shared this function."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)) or (also is not None and isinstance(m, also)):
            nn.init.normal_(m.weight, 0.0, std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, RMSNorm):
            m.reset_parameters()
