"""The DeepSeek-V3 architecture: MLA, DeepSeekMoE, MTP."""

from r1forge.model.attention_metadata import AttentionMetadata
from r1forge.model.mla import MultiHeadLatentAttention
from r1forge.model.moe import MLP, DeepseekMoE, Router, SortedDispatch
from r1forge.model.norm import RMSNorm
from r1forge.model.rope import RotaryEmbedding, apply_rope, rope_frequencies
from r1forge.model.transformer import (
    DecoderLayer,
    DeepseekForCausalLM,
    DeepseekModel,
    MTPModule,
    build_model,
    causal_lm_loss,
    keep_router_fp32,
)

__all__ = [
    "AttentionMetadata", "MultiHeadLatentAttention", "MLP", "DeepseekMoE", "Router", "SortedDispatch", "RMSNorm",
    "RotaryEmbedding", "apply_rope", "rope_frequencies", "DecoderLayer", "DeepseekForCausalLM", "DeepseekModel",
    "MTPModule", "build_model", "causal_lm_loss", "keep_router_fp32",
]
