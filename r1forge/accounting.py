"""Parameter and KV-cache accounting, computed on the meta device (no weights are allocated)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1forge.config import ModelConfig


def count_parameters(config: ModelConfig, include_mtp: bool = False) -> tuple[int, int]:
    """(total, active per token) parameters of the main model (MTP excluded unless asked).

    Active = everything a token touches: embeddings and head, attention, dense FFNs, shared experts, the router,
    and `num_experts_per_tok` routed experts per MoE layer (SPEC section 1: 671B total, ~37B active for V3).
    """
    from r1forge.model import DeepseekForCausalLM, DeepseekMoE

    with torch.device("meta"):
        model = DeepseekForCausalLM(config, with_mtp=include_mtp)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for moe in (m for m in model.modules() if isinstance(m, DeepseekMoE)):
        per_expert = sum(p.numel() for p in moe.experts[0].parameters())
        inactive += per_expert * (len(moe.experts) - moe.gate.top_k)
    return total, total - inactive


@dataclass
class CacheBytes:
    """KV-cache bytes per token across all layers, for MLA and for what MHA / GQA-8 would cache."""

    mla: int
    mha: int
    gqa8: int


def kv_cache_bytes_per_token(config: ModelConfig, element_size: int = 2) -> CacheBytes:
    """MLA caches c_kv + k_rope (C + R) per layer; MHA caches every head's K (Dn+R) and V (Dv)."""
    L, H = config.num_hidden_layers, config.num_attention_heads
    mla = (config.kv_lora_rank + config.qk_rope_head_dim) * L * element_size
    per_head = config.qk_head_dim + config.v_head_dim
    return CacheBytes(mla=mla, mha=H * per_head * L * element_size, gqa8=min(8, H) * per_head * L * element_size)
