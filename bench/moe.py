"""MoE layer and whole-forward time: r1forge against transformers, on the same weights, in one run.

    .venv/bin/python bench/moe.py                           # 8 layers, 64 experts, hidden 512, 2048 tokens, fp32 CPU
    .venv/bin/python bench/moe.py --tokens 8192 --device cuda --dtype bfloat16
    .venv/bin/python bench/moe.py --hf-experts eager        # transformers' per-expert loop instead of its default

A randomised transformers DeepseekV3ForCausalLM is saved with `save_pretrained` and loaded back with
`r1forge.load_model`, so both sides hold identical weights. Times one MoE layer (router + routed + shared
experts) and the whole forward (prefill of all tokens, no cache), median of `--repeats` after `--warmup` runs,
and prints both, their ratio and the relative difference of the outputs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import r1forge


def hf_config_kwargs(args: argparse.Namespace) -> dict:
    """DeepSeek-V3's structure (sigmoid noaux_tc routing over groups, q low-rank, shared expert) at a CPU size."""
    return dict(
        vocab_size=8192, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.hidden // 2,
        num_hidden_layers=args.layers, first_k_dense_replace=1, num_attention_heads=8, num_key_value_heads=8,
        q_lora_rank=args.hidden // 2, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        n_routed_experts=args.experts, n_shared_experts=1, num_experts_per_tok=args.top_k, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=max(4096, args.tokens),
    )


def timed(fn, warmup: int, repeats: int, device: torch.device) -> float:
    """Median wall time of `fn` in seconds."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def rel_diff(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((ref.float() - out.float()).norm() / ref.float().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per forward (batch x sequence length)")
    ap.add_argument("--batch", type=int, default=4, help="sequences the tokens are split into")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--hf-experts", default=None,
                    help="transformers' experts implementation (eager, batched_mm, grouped_mm); default: its own")
    args = ap.parse_args()
    import transformers

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.tokens % args.batch:
        raise SystemExit(f"--tokens {args.tokens} is not divisible by --batch {args.batch}")
    t_setup = time.perf_counter()
    torch.manual_seed(0)
    hf_config = transformers.DeepseekV3Config(**hf_config_kwargs(args))
    hf = transformers.DeepseekV3ForCausalLM(hf_config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.05)
        for name, b in hf.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0.0, 0.05)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = r1forge.load_model(tmp, dtype=dtype, device=device)
    if args.hf_experts:
        hf.set_experts_implementation(args.hf_experts)
    hf = hf.to(device=device, dtype=dtype).eval()
    experts_impl = getattr(hf.config, "_experts_implementation", "?")

    seq = args.tokens // args.batch
    ids = torch.randint(0, hf_config.vocab_size, (args.batch, seq), device=device)
    x = torch.randn(args.batch, seq, args.hidden, device=device, dtype=dtype)
    layer = args.layers // 2  # an MoE layer (first_k_dense_replace = 1)
    hf_moe, our_moe = hf.model.layers[layer].mlp, ours.model.layers[layer].mlp
    with torch.no_grad():
        moe_diff = rel_diff(hf_moe(x), our_moe(x))
        logits_diff = rel_diff(hf(ids).logits, ours(ids))

    total, active = r1forge.count_parameters(ours.config)
    print(f"bench/moe.py: {args.layers} layers, {args.experts} experts (top-{args.top_k}, 1 shared), hidden "
          f"{args.hidden}, {args.tokens} tokens ({args.batch} x {seq}), {args.dtype} on {device}, "
          f"{torch.get_num_threads()} threads; {total / 1e6:.0f}M params, {active / 1e6:.0f}M active "
          f"(setup {time.perf_counter() - t_setup:.0f}s)")
    print(f"transformers {transformers.__version__} (experts implementation: {experts_impl}), "
          f"torch {torch.__version__}")
    print(f"outputs agree: MoE layer rel diff {moe_diff:.1e}, logits rel diff {logits_diff:.1e}")
    rows = [
        ("MoE layer", lambda: hf_moe(x), lambda: our_moe(x)),
        ("forward", lambda: hf(ids), lambda: ours(ids)),
    ]
    print(f"{'':12}{'transformers':>14}{'r1forge':>12}{'speedup':>10}")
    for label, hf_fn, our_fn in rows:
        t_hf = timed(hf_fn, args.warmup, args.repeats, device)
        t_ours = timed(our_fn, args.warmup, args.repeats, device)
        print(f"{label:<12}{t_hf * 1e3:>11.1f} ms{t_ours * 1e3:>9.1f} ms{t_hf / t_ours:>9.2f}x")


if __name__ == "__main__":
    main()
