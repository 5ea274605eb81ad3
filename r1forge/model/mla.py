"""Multi-head Latent Attention (DeepSeek-V2 paper section 2.1, eq. 9-19; DeepSeek-V3 report section 2.1.1, eq. 1-11;
docs/design.md section 3).

Keys and values are compressed into one latent c_kv (kv_lora_rank = C) per token plus one rope key k_rope (R)
shared by all heads; only those C + R numbers are cached. Two paths compute the same function, chosen by
`attn_impl` (or the engine's metadata):

- "naive": expand the latent through kv_b_proj into per-head k_nope / v, then ordinary attention.
- "absorbed": fold W_UK into the query and W_UV after attention, so attention runs in latent space as
  multi-query attention over 576-wide keys and 512-wide values (V3 shapes); no per-head K/V ever exists.

Letters: B batch, T/Q query tokens, S key tokens, N flattened tokens, H heads, D model width,
C kv_lora_rank, R rope dim, Dn qk_nope_head_dim, Dv v_head_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from r1forge.config import ModelConfig
from r1forge.model.attention_metadata import AttentionMetadata
from r1forge.model.norm import RMSNorm
from r1forge.model.rope import apply_rope

ATTN_IMPLS = ("naive", "absorbed")


def per_head_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., H, A] times each head's own matrix w [H, A, B] -> [..., H, B]: one bmm over the heads.

    What einsum("...ha,hab->...hb") computes, bit for bit (the same bmm), without einsum's per-call planning,
    which measured about a third of the call at decode sizes (one token, the weights read once)."""
    lead, (H, A) = x.shape[:-2], x.shape[-2:]
    out = torch.bmm(x.reshape(-1, H, A).transpose(0, 1), w)  # [H, N, B]
    return out.transpose(0, 1).reshape(*lead, H, w.shape[-1])


def attention_with_narrower_value(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                                  scale: float) -> torch.Tensor:
    """SDPA for q, k [B,H,Q|S,Dq] and v [B,H,S,Dv] with Dv < Dq (MLA: Dq = Dn + R, Dv = Dn), mask [B,1,Q,S] (bool)
    or None (causal) -> [B,H,Q,Dv].

    On the CPU, v is zero-padded to Dq and the output cut back to Dv: the same numbers (a zero column adds
    nothing), but with equal widths SDPA runs its fused flash kernel instead of the math path (bmm, a
    materialised [Q, S] softmax, and the same again in the backward). Measured at one thread, 16 x 128
    tokens, Dq 48 / Dv 32: a masked prefill's forward 38 -> 10 ms (8 heads); forward + backward 55.6 -> 44.8 ms
    (8 heads), 25.1 -> 22.7 ms (4 heads), and 14.1 -> 14.7 ms at 4 heads of 24 / 16, where the flash backward is
    the slower half. GPUs keep SDPA's own choice, whose memory-efficient kernel takes unequal widths.
    """
    Dq, Dv = q.shape[-1], v.shape[-1]
    if q.device.type == "cpu" and Dv < Dq:
        v = F.pad(v, (0, Dq - Dv))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)[..., :Dv]


def latent_mqa(q: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor, scale: float, value_dim: int) -> torch.Tensor:
    """Multi-query attention over the latent: every head of q [B,Q,H,C+R] attends the one key latent [B,S,C+R]
    with the value latent[..., :value_dim], where mask [B,Q,S] (bool) allows -> [B,Q,H,value_dim].

    On the CPU it is two batched matmuls with the heads folded into the query axis and the mask broadcast over
    them: SDPA's CPU path, which needs the mask materialised per head, measured about 2x slower at the engine's
    decode shapes (a batch of 256 sequences over 64-128 cached tokens, the demo model's widths). Elsewhere SDPA,
    whose fused GPU kernels are the fast path there.
    """
    B, Q, H, W = q.shape
    S = latent.shape[1]
    if q.device.type != "cpu":
        heads_mask = mask[:, :, None].expand(-1, -1, H, -1).reshape(B, 1, Q * H, S)  # each query row once per head
        kv = latent[:, None]  # [B,1,S,C+R]
        o = F.scaled_dot_product_attention(q.reshape(B, 1, Q * H, W), kv, kv[..., :value_dim], attn_mask=heads_mask,
                                           scale=scale)  # [B,1,Q*H,C]
        return o.view(B, Q, H, value_dim)
    scores = torch.bmm(q.reshape(B, Q * H, W), latent.transpose(1, 2)).mul_(scale).view(B, Q, H, S)
    scores.masked_fill_(~mask[:, :, None, :], float("-inf"))
    probs = scores.view(B, Q * H, S).softmax(dim=-1)
    return torch.bmm(probs, latent[..., :value_dim]).view(B, Q, H, value_dim)


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = H = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = C = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = R = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.latent_dim = config.latent_dim  # C + R per token: the cache row
        self.softmax_scale = config.softmax_scale
        self.rope_interleave = config.rope_interleave
        self.attn_impl = "naive"
        d, bias = config.hidden_size, config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(d, H * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)  # eps 1e-6 as in DeepSeek's code, not rms_norm_eps
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, C + R, bias=bias)
        self.kv_a_layernorm = RMSNorm(C)
        self.kv_b_proj = nn.Linear(C, H * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_head_dim, d, bias=bias)

    # ------------------------------------------------------------------ projections
    def project_query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[q_nope ; q_rope] = W_UQ RMSNorm(W_DQ x) per head; q_rope rotated. x [..., D] -> [..., H, Dn], [..., H, R]."""
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.unflatten(-1, (self.num_heads, self.qk_head_dim))  # [..., H, Dn+R]
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos.unsqueeze(-2), sin.unsqueeze(-2), self.rope_interleave)
        return q_nope, q_rope

    def project_latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """[c_kv ; k_rope] = W_DKV x; c_kv normalised, k_rope rotated. x [..., D] -> latent [..., C+R] (what is cached)."""
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        k_rope = apply_rope(k_rope, cos, sin, self.rope_interleave)
        return torch.cat([c_kv, k_rope], dim=-1)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, Dn, C] and W_UV [H, Dv, C]: kv_b_proj split per head."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]

    # ------------------------------------------------------------------ attention kernels (torch reference)
    def naive_attention(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """q_nope [B,Q,H,Dn], q_rope [B,Q,H,R], latent [B,S,C+R], mask [B,Q,S] or None (causal) -> [B,Q,H,Dv]."""
        B, S = latent.shape[:2]
        c_kv, k_rope = latent.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(B, S, self.num_heads, -1)  # [B,S,H,Dn+Dv]
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rope[:, :, None, :].expand(-1, -1, self.num_heads, -1)], dim=-1)  # [B,S,H,Dn+R]
        q = torch.cat([q_nope, q_rope], dim=-1)  # [B,Q,H,Dn+R]
        out = attention_with_narrower_value(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            None if mask is None else mask[:, None], self.softmax_scale,
        )  # [B,H,Q,Dv]
        return out.transpose(1, 2)

    def absorbed_attention(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Same contract as naive_attention, computed in latent space (weight absorption, docs/design.md section 3.4).

        score_h = (W_UK_h^T q_nope_h) . c_kv + q_rope_h . k_rope ; out_h = W_UV_h (sum softmax(score_h) c_kv)
        All heads share one key/value, so heads fold into the query axis: one MQA over [C+R]-wide keys.
        """
        B, Q, H, _ = q_nope.shape
        S = latent.shape[1]
        w_uk, w_uv = self.absorbed_weights()
        q_latent = per_head_matmul(q_nope, w_uk)  # [B,Q,H,C]
        q = torch.cat([q_latent, q_rope], dim=-1)  # [B,Q,H,C+R]
        if mask is None:
            mask = torch.ones(Q, S, dtype=torch.bool, device=q.device).tril(S - Q)[None].expand(B, -1, -1)
        o = latent_mqa(q, latent, mask, self.softmax_scale, self.kv_lora_rank)  # [B,Q,H,C]
        return per_head_matmul(o, w_uv.transpose(1, 2))  # [B,Q,H,Dv]

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        metadata: AttentionMetadata | None = None,
    ) -> torch.Tensor:
        """x [B,T,D] (dense causal path) or [N,D] with `metadata` (paged-cache path) -> same shape."""
        if metadata is not None:
            return self._forward_paged(x, cos, sin, metadata)
        q_nope, q_rope = self.project_query(x, cos, sin)  # [B,T,H,Dn], [B,T,H,R]
        latent = self.project_latent(x, cos, sin)  # [B,T,C+R]
        attend = self.absorbed_attention if self.attn_impl == "absorbed" else self.naive_attention
        out = attend(q_nope, q_rope, latent, None)  # [B,T,H,Dv]
        return self.o_proj(out.flatten(-2))

    def _forward_paged(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        """Write the new tokens' latents into the paged cache, then attend over each sequence's slots."""
        q_nope, q_rope = self.project_query(x, cos, sin)  # [N,H,Dn], [N,H,R]
        latent = self.project_latent(x, cos, sin)  # [N,C+R]
        cache = metadata.kv_caches[self.layer_idx].view(-1, self.latent_dim)
        cache.index_copy_(0, metadata.slot_mapping, latent.to(cache.dtype))
        kv = metadata.gather_cached(cache).to(x.dtype)  # [B,S,C+R]
        attend = self.absorbed_attention if metadata.absorbed else self.naive_attention
        if metadata.decode:  # token b is sequence b's only query: a view, and no boolean gather (graph-safe)
            out = attend(q_nope[:, None], q_rope[:, None], kv, metadata.attn_mask)  # [B,1,H,Dv]
            return self.o_proj(out[:, 0].flatten(-2))  # [N,D]
        q_nope, q_rope = metadata.gather_queries(q_nope), metadata.gather_queries(q_rope)  # [B,Q,H,*]
        out = attend(q_nope, q_rope, kv, metadata.attn_mask)  # [B,Q,H,Dv]
        return self.o_proj(out[metadata.query_valid].flatten(-2))  # [N,D]
