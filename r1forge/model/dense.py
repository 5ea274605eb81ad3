"""The dense decoder of the R1-Distill students: Qwen2 and Llama (grouped-query attention, SwiGLU, RMSNorm, RoPE).

    h = h + o_proj(Attention(RoPE(W_q x), RoPE(W_k x), W_v x))      x = RMSNorm(h)
    h = h + down_proj(silu(gate_proj(x)) * up_proj(x))              x = RMSNorm(h)

Grouped-query attention (Ainslie et al. 2023): H query heads share H_kv key/value heads, query head h reading
kv head h // (H / H_kv), so a token caches 2 * H_kv * D_h numbers per layer (MHA would cache 2 * H * D_h).
RoPE rotates the half-split pairs (x_i, x_{i + D_h/2}) of every q and k head (`rotate_half` layout). Module names
are the Hugging Face checkpoint's, so `state_dict()` is the checkpoint for both families.

Letters: B batch, T/Q query tokens, S key tokens, N flattened tokens, H query heads, G kv heads (H_kv),
Dh head width, D model width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from r1forge.dense_config import DenseConfig
from r1forge.model.attention_metadata import AttentionMetadata
from r1forge.model.base import CausalLM, PreNormDecoderLayer, init_normal_
from r1forge.model.cache_spec import CacheSpec
from r1forge.model.moe import MLP
from r1forge.model.norm import RMSNorm
from r1forge.model.rope import RotaryEmbedding, apply_rope


class GroupedQueryAttention(nn.Module):
    """q/k/v/o projections (q/k/v biased in Qwen2) and attention over H query heads sharing G kv heads."""

    def __init__(self, config: DenseConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = H = config.num_attention_heads
        self.num_kv_heads = G = config.num_key_value_heads
        self.head_dim = Dh = config.head_dim
        self.softmax_scale = config.softmax_scale
        D = config.hidden_size
        self.q_proj = nn.Linear(D, H * Dh, bias=config.qkv_bias)
        self.k_proj = nn.Linear(D, G * Dh, bias=config.qkv_bias)
        self.v_proj = nn.Linear(D, G * Dh, bias=config.qkv_bias)
        self.o_proj = nn.Linear(H * Dh, D, bias=config.o_bias)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., D] -> q [..., H, Dh], k [..., G, Dh] (both rotated), v [..., G, Dh]."""
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
        return apply_rope(q, cos, sin, interleave=False), apply_rope(k, cos, sin, interleave=False), v

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q [B,Q,H,Dh], k/v [B,S,G,Dh], mask [B,Q,S] (True = may attend) or None (causal, Q == S) -> [B,Q,H,Dh].

        softmax(q_h . k_{g(h)} / sqrt(Dh)) v_{g(h)} with g(h) = h // (H / G); `enable_gqa` reads each kv head for
        its query group without materialising H copies of K and V.
        """
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=None if mask is None else mask[:, None], is_causal=mask is None,
            scale=self.softmax_scale, enable_gqa=self.num_kv_heads != self.num_heads,
        )  # [B,H,Q,Dh]
        return out.transpose(1, 2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                metadata: AttentionMetadata | None = None) -> torch.Tensor:
        """x [B,T,D] (dense causal path) or [N,D] with `metadata` (paged-cache path) -> same shape."""
        q, k, v = self.project(x, cos, sin)
        if metadata is None:
            return self.o_proj(self.attention(q, k, v, None).flatten(-2))
        # The layer's pool [blocks, block_size, 2, G, Dh] as one row per slot; new keys/values go in first.
        cache = metadata.kv_caches[self.layer_idx].view(-1, 2, self.num_kv_heads, self.head_dim)
        cache.index_copy_(0, metadata.slot_mapping, torch.stack([k, v], dim=1).to(cache.dtype))  # [N,2,G,Dh]
        k_all, v_all = metadata.gather_cached(cache).to(x.dtype).unbind(2)  # [B,S,G,Dh] each
        if metadata.decode:  # token b is sequence b's only query: a view, no boolean gather (graph-safe)
            out = self.attention(q[:, None], k_all, v_all, metadata.attn_mask)  # [B,1,H,Dh]
            return self.o_proj(out[:, 0].flatten(-2))  # [N,D]
        out = self.attention(metadata.gather_queries(q), k_all, v_all, metadata.attn_mask)  # [B,Q,H,Dh]
        return self.o_proj(out[metadata.query_valid].flatten(-2))  # [N,D]


class DenseDecoderLayer(PreNormDecoderLayer):
    """h = h + GQA(norm(h)); h = h + SwiGLU(norm(h))."""

    def __init__(self, config: DenseConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = GroupedQueryAttention(config, layer_idx)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DenseModel(nn.Module):
    """Embedding, decoder layers, final norm (transformers' `model.` prefix)."""

    def __init__(self, config: DenseConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DenseDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                metadata: AttentionMetadata | None = None) -> torch.Tensor:
        """input_ids [B, T] (or [N] with metadata) -> final normed hidden states [B, T, D] ([N, D])."""
        if positions is None:
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
        cos, sin = self.rotary(positions)  # [..., Dh/2]
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, metadata)
        return self.norm(h)


class DenseForCausalLM(CausalLM):
    """Qwen2 / Llama causal LM (the R1-Distill students). `model(input_ids)` -> logits [B, T, vocab]."""

    def __init__(self, config: DenseConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DenseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def cache_spec(self) -> CacheSpec:
        """GQA caches every kv head's key and value: (2, G, Dh) per token and layer."""
        return self.config.cache_spec()

    def moe_layers(self) -> list[nn.Module]:
        return []

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range) for every matrix, zero biases, ones for norms."""
        init_normal_(self, self.config.initializer_range)
