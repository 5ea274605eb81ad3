"""Decode throughput: r1forge's engine against transformers' `generate`, same weights, same prompts, one run.

    .venv/bin/python bench/decode.py                 # ~45M-parameter MoE, fp32 CPU, batch 1 and 32
    .venv/bin/python bench/decode.py --device cuda --dtype bfloat16 --preset v2-lite-shaped

Prints decode tokens/s of both at each batch size and their ratio, and the KV-cache bytes per token that
r1forge's latent cache, transformers' cache and multi-head attention of the same shapes hold.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import r1forge
from r1forge import LLM, SamplingParams

SHAPES = {
    # About 45M parameters: 6 layers, 32 routed experts (top-4) + 1 shared, MLA with q low-rank.
    "45m": dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, moe_intermediate_size=256,
                num_hidden_layers=6, first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=256,
                kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32,
                n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, max_position_embeddings=4096,
                rope_scaling=None),
    # DeepSeek-V2-Lite's shapes (4.6B-parameter variant used in the H100 figures: fewer layers).
    "v2-lite-shaped": dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                           num_hidden_layers=8, first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=None,
                           kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                           n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
                           scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
                           routed_scaling_factor=1.0, max_position_embeddings=4096, rope_scaling=None),
}


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(SHAPES), default="45m")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    import transformers

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    cfg = r1forge.ModelConfig.from_preset("tiny", **SHAPES[args.preset])
    model = r1forge.build_model(cfg, dtype=dtype, device=args.device).eval()
    total, active = r1forge.count_parameters(cfg)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(args.device).eval()
    print(f"model: {total / 1e6:.1f}M parameters, {active / 1e6:.1f}M active; {args.device} {args.dtype}; "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    llm = LLM(model, max_num_seqs=max(int(b) for b in args.batches.split(",")), block_size=64)
    g = torch.Generator().manual_seed(1)
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = torch.randint(2, cfg.vocab_size, (batch, args.prompt_len), generator=g)
        params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)

        def ours() -> None:
            llm.generate(prompts.tolist(), params)

        def theirs() -> None:
            with torch.no_grad():
                hf.generate(prompts.to(args.device), attention_mask=torch.ones_like(prompts).to(args.device),
                            max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                            pad_token_id=0)

        ours()  # warm-up
        theirs()
        t_ours, t_theirs = timed(ours, args.repeats), timed(theirs, args.repeats)
        tok = batch * args.new_tokens
        print(f"batch {batch:3d}: r1forge {tok / t_ours:9.1f} tok/s | transformers {tok / t_theirs:9.1f} tok/s | "
              f"ratio {t_theirs / t_ours:5.2f}x")
    bytes_ = r1forge.kv_cache_bytes_per_token(cfg, element_size=torch.empty((), dtype=dtype).element_size())
    print(f"KV cache per token (all layers): r1forge latent {llm.cache_bytes_per_token} B | transformers 5 "
          f"latent cache {bytes_.mla} B (re-expanded through kv_b_proj every step) | MHA {bytes_.mha} B "
          f"({bytes_.mha / bytes_.mla:.1f}x) | GQA-8 {bytes_.gqa8} B")
    v3 = r1forge.kv_cache_bytes_per_token(r1forge.ModelConfig.from_preset("deepseek-v3"))
    print(f"DeepSeek-V3 shapes, bf16: MLA {v3.mla} B/token vs MHA {v3.mha} B/token ({v3.mha / v3.mla:.1f}x, "
          f"MLA = {100 * v3.mla / v3.mha:.2f}%)")


if __name__ == "__main__":
    main()
