"""`r1forge info --preset NAME` or `r1forge info CHECKPOINT_DIR`: what a model is, without loading its weights.

Prints the layer and expert layout, the attention shapes, total and per-token active parameters (MTP apart),
and what MLA saves: KV-cache bytes per token against multi-head attention and GQA-8 of the same head shapes,
and the cache for one long context. For a checkpoint directory it also reads the safetensors headers (a few
KB per shard, never the tensors: `r1forge.checkpoint.summary`) to report the on-disk dtypes and size.
Parameters are counted on the meta device: no weights are allocated, even for 671B.

Python use: `describe(config, checkpoint=summarize_checkpoint(path))` returns the same text.
"""

from __future__ import annotations

import argparse
import sys

from r1forge.accounting import count_parameters, kv_cache_bytes_per_token
from r1forge.auto_config import config_from_preset, load_config
from r1forge.checkpoint.summary import CheckpointSummary, summarize_checkpoint
from r1forge.config import ModelConfig
from r1forge.dense_config import DenseConfig

CACHE_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1}


def add_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("path", nargs="?", help="checkpoint directory (config.json and *.safetensors)")
    source.add_argument("--preset", help="a named shape: deepseek-v3, deepseek-r1, deepseek-v2-lite, tiny, small, "
                        "deepseek-r1-distill-qwen-1.5b/7b/14b/32b, deepseek-r1-distill-llama-8b/70b")
    p.add_argument("--context", type=int, default=32768, help="context length for the KV-cache size line")
    p.add_argument("--cache-dtype", choices=sorted(CACHE_DTYPE_BYTES), default="bf16",
                   help="element type of the KV cache (bytes per cached number)")


def run(args: argparse.Namespace) -> int:
    try:
        if args.preset:
            config, checkpoint, source = config_from_preset(args.preset), None, f"preset {args.preset}"
        else:
            config, source = load_config(args.path), str(args.path)
            checkpoint = summarize_checkpoint(args.path)
        if args.context <= 0:
            raise ValueError(f"--context must be positive, got {args.context}")
    except (ValueError, FileNotFoundError) as e:
        print(f"r1forge info: error: {e}", file=sys.stderr)
        return 2
    print(describe(config, checkpoint, context=args.context, cache_dtype=args.cache_dtype, source=source))
    return 0


# ---------------------------------------------------------------------------------------------- report
def human_count(n: float, digits: int = 1) -> str:
    """671026404352 -> '671.0B'; with digits=2, 1777088000 -> '1.78B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}f}{unit}"
    return str(int(n))


def human_bytes(n: float) -> str:
    """Binary units: 70272 -> '68.6 KiB'."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.{2 if n / scale < 10 else 1}f} {unit}"
    return f"{int(n)} B"


def mtp_parameters(config: ModelConfig) -> int:
    """Parameters of the MTP modules (one decoder block + eh_proj and norms each), counted on the meta device."""
    return count_parameters(config, include_mtp=True)[0] - count_parameters(config)[0]


def describe(config: ModelConfig | DenseConfig, checkpoint: CheckpointSummary | None = None, context: int = 32768,
             cache_dtype: str = "bf16", source: str | None = None) -> str:
    """The `r1forge info` report for a config (and, optionally, what its checkpoint holds on disk)."""
    if isinstance(config, DenseConfig):
        lines = describe_dense(config, context, cache_dtype, source)
    else:
        lines = describe_deepseek(config, context, cache_dtype, source)
    if checkpoint is not None:
        lines += describe_checkpoint(checkpoint, config)
    return "\n".join(lines)


def _kv(label: str, text: str) -> str:
    return f"  {label:<12}{text}"


def describe_dense(c: DenseConfig, context: int, cache_dtype: str, source: str | None) -> list[str]:
    """A Qwen2 / Llama student: shapes, parameters (all active) and its GQA cache against MHA's."""
    L, H, G, Dh = c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    lines = [f"{c.model_type} model" + (f" ({source})" if source else "")]
    lines.append(_kv("layers", f"{L} dense, hidden {c.hidden_size}, vocab {c.vocab_size}, SwiGLU FFN "
                     f"{c.intermediate_size}, embeddings {'tied' if c.tie_word_embeddings else 'untied'}"))
    bias = "q/k/v/o bias" if c.o_bias else "q/k/v bias" if c.qkv_bias else "no bias"
    lines.append(_kv("attention", f"GQA, {H} query heads sharing {G} kv heads ({c.num_kv_groups} per group), "
                     f"head {Dh}, {bias}"))
    rope = f"theta {c.rope_theta:g}"
    if c.rope_type == "llama3":
        s = c.rope_scaling
        rope = (f"llama3 x{s['factor']:g} over {s['original_max_position_embeddings']} positions (low_freq_factor "
                f"{s['low_freq_factor']:g}, high_freq_factor {s['high_freq_factor']:g}), " + rope)
    elif c.rope_type == "linear":
        rope = f"linear x{c.rope_scaling['factor']:g}, " + rope
    lines.append(_kv("rope", f"{rope}, max positions {c.max_position_embeddings}"))
    total, _ = count_parameters(c)
    lines.append(_kv("parameters", f"{human_count(total, digits=2)} ({total:,}), all active per token"))
    elem = CACHE_DTYPE_BYTES[cache_dtype]
    gqa = c.cache_spec().numbers_per_token * elem
    mha = 2 * H * Dh * L * elem
    lines.append(f"  KV cache per token ({cache_dtype}, all {L} layers):")
    lines.append(f"    {'GQA':<6}{gqa:>12,} B  {human_bytes(gqa):>10}  {100 * gqa / mha:6.2f}% of MHA"
                 f"  ({G} kv heads x 2 x {Dh} per layer)")
    lines.append(f"    {'MHA':<6}{mha:>12,} B  {human_bytes(mha):>10}  100.00% of MHA  ({H} heads x 2 x {Dh} per layer)")
    lines.append(f"  KV cache for a {context:,}-token context: GQA {human_bytes(gqa * context)}, "
                 f"MHA {human_bytes(mha * context)}")
    return lines


def describe_deepseek(config: ModelConfig, context: int, cache_dtype: str, source: str | None) -> list[str]:
    """DeepSeek-V2/V3: layer and expert layout, MLA shapes, total and active parameters, MLA's cache saving."""
    c = config
    L, H = c.num_hidden_layers, c.num_attention_heads
    n_dense = L if not c.n_routed_experts else min(c.first_k_dense_replace, L)
    lines = [f"{c.model_type} model" + (f" ({source})" if source else "")]
    row = lines.append

    def kv(label: str, text: str) -> None:
        row(_kv(label, text))

    kv("layers", f"{L} ({n_dense} dense + {L - n_dense} MoE), hidden {c.hidden_size}, vocab {c.vocab_size}, "
       f"dense FFN {c.intermediate_size}")
    if c.n_routed_experts:
        groups = f"{c.n_group} groups, top-{c.topk_group} groups" if (c.n_group or 1) > 1 else "no groups"
        kv("experts", f"{c.n_routed_experts} routed + {c.n_shared_experts or 0} shared per MoE layer, "
           f"top-{c.num_experts_per_tok} of {c.n_routed_experts}, {groups}, expert FFN {c.moe_intermediate_size}")
        kv("router", f"{c.scoring_func} scores, {c.topk_method}, norm_topk_prob {c.norm_topk_prob}, "
           f"routed_scaling_factor {c.routed_scaling_factor}")
    q = f"q_lora_rank {c.q_lora_rank}" if c.q_lora_rank else "plain q_proj"
    kv("attention", f"MLA, {H} heads, {q}, kv_lora_rank {c.kv_lora_rank}, qk head {c.qk_nope_head_dim} nope + "
       f"{c.qk_rope_head_dim} rope, v head {c.v_head_dim}")
    rope = f"theta {c.rope_theta:g}"
    if c.rope_type == "yarn":
        s = c.rope_scaling
        rope = f"yarn x{s['factor']} over {s['original_max_position_embeddings']} positions, " + rope
    kv("rope", f"{rope}, max positions {c.max_position_embeddings}")

    total, active = count_parameters(c)
    kv("parameters", f"{human_count(total)} total, {human_count(active)} active per token "
       f"({total:,} / {active:,})")
    if c.num_nextn_predict_layers:
        kv("MTP", f"{human_count(mtp_parameters(c))} in {c.num_nextn_predict_layers} module(s), not counted above "
           f"(embedding and head shared with the main model)")
    else:
        kv("MTP", "none")

    elem = CACHE_DTYPE_BYTES[cache_dtype]
    cache = kv_cache_bytes_per_token(c, element_size=elem)
    row(f"  KV cache per token ({cache_dtype}, all {L} layers):")
    gqa = f"GQA-{min(8, H)}"  # GQA-8 of the same head shapes (fewer kv heads than 8 would be MHA itself)
    per_layer = {"MLA": f"{c.kv_lora_rank} + {c.qk_rope_head_dim} latent",
                 gqa: f"{min(8, H)} kv heads x ({c.qk_head_dim} + {c.v_head_dim})",
                 "MHA": f"{H} heads x ({c.qk_head_dim} + {c.v_head_dim})"}
    for name, value in (("MLA", cache.mla), (gqa, cache.gqa8), ("MHA", cache.mha)):
        row(f"    {name:<6}{value:>12,} B  {human_bytes(value):>10}  {100 * value / cache.mha:6.2f}% of MHA"
            f"  ({per_layer[name]} per layer)")
    row(f"  KV cache for a {context:,}-token context: MLA {human_bytes(cache.mla * context)}, "
        f"{gqa} {human_bytes(cache.gqa8 * context)}, MHA {human_bytes(cache.mha * context)}")
    return lines


def describe_checkpoint(checkpoint: CheckpointSummary, c: ModelConfig | DenseConfig) -> list[str]:
    """What the safetensors files hold: size, dtypes, and whether the MTP layers the config declares are there."""
    L = c.num_hidden_layers
    lines: list[str] = []
    row = lines.append

    def kv(label: str, text: str) -> None:
        row(_kv(label, text))

    total_bytes = sum(checkpoint.bytes_by_dtype.values()) or 1
    dtypes = ", ".join(f"{d} {human_count(n)} values ({100 * checkpoint.bytes_by_dtype[d] / total_bytes:.1f}%)"
                       for d, n in sorted(checkpoint.numel_by_dtype.items(), key=lambda kv: -kv[1]))
    kv("on disk", f"{human_bytes(checkpoint.file_bytes)} in {checkpoint.files} safetensors file(s), "
       f"{checkpoint.tensors} tensors")
    kv("dtypes", dtypes)
    mtp_layers = sorted(i for i in checkpoint.layer_indices if i >= L)
    if mtp_layers:
        kv("", f"MTP weights present (layers {', '.join(map(str, mtp_layers))})")
    elif c.num_nextn_predict_layers:
        kv("", "no MTP weights on disk (config.json declares num_nextn_predict_layers, the files do not)")
    return lines
