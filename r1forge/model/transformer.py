"""The DeepSeek-V3 decoder: pre-norm blocks of MLA + (dense FFN | DeepSeekMoE), MTP modules, causal LM head.

Module names are the Hugging Face checkpoint's, so `state_dict()` is the checkpoint (docs/design.md section 6); the
one exception is MTP, held at `model.mtp.{k}` and stored at `model.layers.{num_hidden_layers + k}` by
`r1forge.checkpoint`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from r1forge.config import ModelConfig
from r1forge.model.attention_metadata import AttentionMetadata
from r1forge.model.base import CausalLM, PreNormDecoderLayer, init_normal_
from r1forge.model.cache_spec import CacheSpec
from r1forge.model.mla import ATTN_IMPLS, MultiHeadLatentAttention
from r1forge.model.moe import MLP, DeepseekMoE, Router
from r1forge.model.norm import RMSNorm
from r1forge.model.rope import RotaryEmbedding


class DecoderLayer(PreNormDecoderLayer):
    """h = h + MLA(norm(h)); h = h + FFN(norm(h))."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MultiHeadLatentAttention(config, layer_idx)
        if config.is_moe_layer(layer_idx):
            self.mlp: nn.Module = DeepseekMoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class SharedHead(nn.Module):
    """The MTP module's final norm; the projection itself is the main model's lm_head (shared)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPModule(DecoderLayer):
    """MTP depth k (DeepSeek-V3 report section 2.2, eq. 21-23): h' = Block(W_eh [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h_i)]).

    The concatenation order (embedding first) is the one DeepSeek's checkpoints are trained with (as read by
    vLLM and SGLang). Embedding and head are the main model's.
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                metadata: AttentionMetadata | None = None) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        return super().forward(x, cos, sin, metadata)


class DeepseekModel(nn.Module):
    """Embedding, decoder layers, final norm (transformers' `model.` prefix)."""

    def __init__(self, config: ModelConfig, num_mtp: int = 0) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.qk_rope_head_dim, config.rope_theta, config.rope_scaling)
        n = config.num_hidden_layers
        self.mtp = nn.ModuleList(MTPModule(config, n + k) for k in range(num_mtp))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                metadata: AttentionMetadata | None = None) -> torch.Tensor:
        """input_ids [B, T] (or [N] with metadata) -> final normed hidden states [B, T, D] ([N, D])."""
        if positions is None:
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
        cos, sin = self.rotary(positions)
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, metadata)
        return self.norm(h)


class DeepseekForCausalLM(CausalLM):
    """DeepSeek-V2/V3/R1 causal LM. `model(input_ids)` -> logits [B, T, vocab]."""

    def __init__(self, config: ModelConfig, with_mtp: bool = False) -> None:
        super().__init__()
        self.config = config
        self.model = DeepseekModel(config, config.num_nextn_predict_layers if with_mtp else 0)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def num_mtp(self) -> int:
        return len(self.model.mtp)

    def cache_spec(self) -> CacheSpec:
        """MLA caches one latent row per token and layer: c_kv and the shared rope key (C + R numbers)."""
        return self.config.cache_spec()

    def mtp_logits(self, hidden: torch.Tensor, input_ids: torch.Tensor,
                   positions: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Training-time MTP: logits of depth k (1-based) at position i predict token i + k + 1.

        hidden [B, T, D] (main model output), input_ids [B, T] -> k-th entry [B, T - k, vocab].
        """
        T = input_ids.shape[1]
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand_as(input_ids)
        out, h = [], hidden
        for k, module in enumerate(self.model.mtp, start=1):
            h = h[:, : T - k]
            cos, sin = self.model.rotary(positions[:, : T - k])
            emb = self.model.embed_tokens(input_ids[:, k:])
            h = module(h, emb, cos, sin)
            out.append(self.lm_head(module.shared_head.norm(h)))
        return out

    def set_attn_impl(self, impl: str) -> None:
        """The attention switch for the dense path: "naive" (expand K/V) or "absorbed" (latent space)."""
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
        for m in self.modules():
            if isinstance(m, MultiHeadLatentAttention):
                m.attn_impl = impl

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range) for every matrix, ones for norms, zeros for the correction bias."""
        init_normal_(self, self.config.initializer_range, also=Router)
        for m in self.modules():
            if isinstance(m, Router) and m.e_score_correction_bias is not None:
                m.e_score_correction_bias.zero_()


def keep_router_fp32(model: nn.Module) -> None:
    """Routers decide discrete choices: their weight and bias stay float32 in a bf16 model (as in DeepSeek)."""
    for m in model.modules():
        if isinstance(m, Router):
            m.float()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy; labels are already aligned with logits (labels[t] = token t+1)."""
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=ignore_index)
