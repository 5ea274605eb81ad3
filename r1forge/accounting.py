"""Parameter and KV-cache accounting, computed on the meta device (no weights are allocated)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from r1forge.config import ModelConfig
from r1forge.dense_config import DenseConfig


def count_parameters(config: ModelConfig | DenseConfig, include_mtp: bool = False) -> tuple[int, int]:
    """(total, active per token) parameters of the main model (MTP excluded unless asked).

    Active = everything a token touches: embeddings and head, attention, dense FFNs, shared experts, the router,
    and `num_experts_per_tok` routed experts per MoE layer (DeepSeek-V3 report section 4.2: 671B total, 37B active).
    Counted on the meta device from one block of each kind (dense, MoE, MTP) times how many the model has: the
    numbers of `count_parameters_of` on the whole model, in a fraction of a second instead of seconds for V3.
    """
    from r1forge.model import DecoderLayer, MTPModule
    from r1forge.model.dense import DenseDecoderLayer

    L, D, V = config.num_hidden_layers, config.hidden_size, config.vocab_size
    blocks: dict[tuple[type, bool], list[int]] = {}  # (block class, is MoE) -> layer indices
    if isinstance(config, DenseConfig):  # every block alike, every parameter active, no MTP
        blocks[(DenseDecoderLayer, False)] = list(range(L))
    else:
        for i in range(L):
            blocks.setdefault((DecoderLayer, config.is_moe_layer(i)), []).append(i)
        for i in range(L, L + (config.num_nextn_predict_layers if include_mtp else 0)):
            blocks.setdefault((MTPModule, config.is_moe_layer(i)), []).append(i)
    with torch.device("meta"):
        parts = [(cls(config, idx[0]), len(idx)) for (cls, _), idx in blocks.items()]
    # embed_tokens [V, D], the final norm [D] and lm_head [V, D] unless tied, by hand: nn.Embedding's normal_
    # init on meta would import torch._dynamo (seconds, once per process)
    total = active = V * D * (1 if config.tie_word_embeddings else 2) + D
    for module, count in parts:
        n_total, n_active = count_parameters_of(module)
        total, active = total + count * n_total, active + count * n_active
    return total, active


def count_parameters_of(module: nn.Module) -> tuple[int, int]:
    """(total, active per token) parameters of any module: each DeepseekMoE in it has `num_experts_per_tok` of
    its routed experts active. Tied parameters count once."""
    from r1forge.model import DeepseekMoE

    total = sum(p.numel() for p in module.parameters())
    inactive = 0
    for moe in (m for m in module.modules() if isinstance(m, DeepseekMoE)):
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
    mla = config.latent_dim * L * element_size
    per_head = config.qk_head_dim + config.v_head_dim
    return CacheBytes(mla=mla, mha=H * per_head * L * element_size, gqa8=min(8, H) * per_head * L * element_size)


# ---------------------------------------------------------------------------------------------- will it fit?
def available_memory(device: str | torch.device) -> int | None:
    """Bytes free on `device`: CUDA from the driver, CPU from /proc/meminfo's MemAvailable (sysconf elsewhere);
    None where it cannot be told (meta, MPS, no /proc), in which case nothing is refused."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.mem_get_info(device.index if device.index is not None else torch.cuda.current_device())[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _gb(n: float) -> str:
    return f"{n / 1e12:.1f} TB" if n >= 1e12 else f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def check_model_fits(config: ModelConfig, device: str | torch.device, dtype: torch.dtype = torch.float32,
                     include_mtp: bool = False, copies: int = 1, what: str = "the model") -> int:
    """Refuse (ValueError) to allocate a model `device` cannot hold; returns the bytes it needs.

    Why: ModelConfig's defaults are DeepSeek-V3's, so an empty or partial config.json describes a 671B model,
    and allocating it fails only after minutes of swapping, or by the kernel's OOM killer with no message.
    `copies`: parameter-sized tensors per parameter (1 to load or serve; 4 to train with AdamW: weights,
    gradients and two moments). Activations and caches come on top, so passing is necessary, not sufficient.
    """
    total, _ = count_parameters(config, include_mtp=include_mtp)
    need = total * torch.empty((), dtype=dtype).element_size() * copies
    free = available_memory(device)
    if free is not None and need > free:
        per = f" x {copies} copies (weights, gradients, AdamW moments)" if copies > 1 else ""
        raise ValueError(
            f"{what} needs {need:,} bytes ({_gb(need)}: {total / 1e9:.2f}B parameters in {str(dtype).removeprefix('torch.')}"
            f"{per}) but {torch.device(device)} has {free:,} bytes ({_gb(free)}) available; refusing to allocate it. "
            f"(hidden_size={config.hidden_size}, num_hidden_layers={config.num_hidden_layers}, n_routed_experts="
            f"{config.n_routed_experts}: missing keys take DeepSeek-V3's 671B defaults, so an empty config.json "
            "means the full model)")
    return need
