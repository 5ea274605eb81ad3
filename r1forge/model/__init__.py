"""The model architectures: DeepSeek-V3 (MLA, DeepSeekMoE, MTP) and the dense R1-Distill students (Qwen2, Llama)."""

from r1forge.model.attention_metadata import AttentionMetadata
from r1forge.model.base import CausalLM
from r1forge.model.cache_spec import CacheSpec
from r1forge.model.dense import DenseForCausalLM, DenseModel, GroupedQueryAttention
from r1forge.model.factory import build_model, new_model
from r1forge.model.mla import MultiHeadLatentAttention
from r1forge.model.moe import MLP, DeepseekMoE, Router, SortedDispatch
from r1forge.model.norm import RMSNorm
from r1forge.model.rope import RotaryEmbedding, apply_rope, rope_frequencies
from r1forge.model.transformer import (
    DecoderLayer,
    DeepseekForCausalLM,
    DeepseekModel,
    MTPModule,
    causal_lm_loss,
    keep_router_fp32,
)

__all__ = [
    "AttentionMetadata", "MultiHeadLatentAttention", "MLP", "DeepseekMoE", "Router", "SortedDispatch", "RMSNorm",
    "RotaryEmbedding", "apply_rope", "rope_frequencies", "DecoderLayer", "DeepseekForCausalLM", "DeepseekModel",
    "MTPModule", "build_model", "new_model", "causal_lm_loss", "keep_router_fp32", "CausalLM", "CacheSpec",
    "DenseForCausalLM", "DenseModel", "GroupedQueryAttention",
]
