"""Rotary position embedding: MLA's decoupled rope dims (YaRN) and the dense students' heads (llama3 scaling).

DeepSeek's checkpoints lay the rope dims out as interleaved pairs (x0, x1), (x2, x3), ... each rotated by one
frequency; we rotate those pairs directly (`rope_interleave=True`). transformers permutes the pairs to the
half-split layout before `rotate_half`: the rotated vectors are a permutation of ours, applied to q and k
alike, so every q.k score is the same. With `rope_interleave=False` the checkpoint is already half-split.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from r1forge.config import ModelConfig


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(factor) + 1 for factor > 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_type_of(rope_scaling: dict[str, Any] | None) -> str:
    """"default", "yarn", "llama3", "linear": `rope_type` (or the older `type`) of a rope_scaling dict."""
    if not rope_scaling:
        return "default"
    return rope_scaling.get("rope_type", rope_scaling.get("type", "default"))


def inverse_frequencies(dim: int, theta: float, rope_scaling: dict[str, Any] | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] (float32, CPU) of a rotary width `dim`, and the cos/sin scale.

    theta^(-2i/dim) for pair i, then rescaled for a longer context by `rope_scaling`'s rope type:
    yarn (DeepSeek), llama3 (Llama 3.1+), linear (position interpolation).
    """
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
    inv_freq = 1.0 / (float(theta) ** exponents)
    rope_type = rope_type_of(rope_scaling)
    if rope_type == "yarn":
        return _yarn(inv_freq, dim, float(theta), rope_scaling)
    if rope_type == "llama3":
        return _llama3(inv_freq, rope_scaling), 1.0
    if rope_type == "linear":
        return inv_freq / float(rope_scaling["factor"]), 1.0
    return inv_freq, 1.0


def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """MLA's decoupled rope dims: inverse frequencies [R/2] and the attention factor (YaRN's mscale ratio)."""
    return inverse_frequencies(config.qk_rope_head_dim, config.rope_theta, config.rope_scaling)


def _yarn(inv_freq: torch.Tensor, dim: int, base: float, s: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071) blends interpolated (divided by `factor`) and original frequencies with a linear
    ramp between the dims that rotate `beta_fast` and `beta_slow` times over the original context."""
    factor = float(s["factor"])
    original = float(s["original_max_position_embeddings"])
    beta_fast, beta_slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1.0 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, float(mscale)) / yarn_mscale(factor, float(mscale_all_dim))
        else:
            attention_factor = yarn_mscale(factor)
    return inv_freq, float(attention_factor)


def _llama3(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's rescaling, by wavelength lambda = 2 pi / freq against the original context L:
    lambda < L / high_freq_factor keeps its frequency (local detail), lambda > L / low_freq_factor is divided by
    `factor` (long range), and the band between blends the two by s = (L / lambda - low) / (high - low)."""
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    original = float(s["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq
    smooth = ((original / wavelength - low) / (high - low)).clamp(0, 1)  # 0: long wavelengths, 1: short ones
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


class RotaryEmbedding(nn.Module):
    """Maps positions to (cos, sin) [..., R/2]; holds no parameters, so meta-device builds need no fix-up."""

    def __init__(self, dim: int, theta: float, rope_scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        inv_freq, self.attention_factor = inverse_frequencies(dim, theta, rope_scaling)
        self._inv_freq_cpu = inv_freq
        self._inv_freq_by_device: dict[torch.device, torch.Tensor] = {}

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = positions.device
        inv_freq = self._inv_freq_by_device.get(device)
        if inv_freq is None:
            inv_freq = self._inv_freq_by_device[device] = self._inv_freq_cpu.to(device)
        angles = positions.float()[..., None] * inv_freq  # [..., R/2]
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """Rotate the last dim of x [..., R] by cos/sin [..., R/2] broadcast over x's head dim.

    Interleaved: pairs (x[2i], x[2i+1]) rotate and stay in place. Half-split: (x[i], x[i+R/2]).
    Computed in float32, returned in x's dtype.
    """
    dtype = x.dtype
    x = x.float()
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = x.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(dtype)
