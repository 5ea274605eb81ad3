"""Decode throughput: r1forge's engine against transformers' `generate`, same weights, same prompts, one run.

    .venv/bin/python bench/decode.py                 # 80M-parameter (25M active) MoE, fp32 CPU, batch 1 and 32
    .venv/bin/python bench/decode.py --device cuda --dtype bfloat16 --preset v2-lite-shaped --cuda-graphs
    .venv/bin/python bench/decode.py --compile       # adds r1forge with torch.compile'd decode steps
    .venv/bin/python bench/decode.py --model-type qwen2 --prompt-len 32,512   # a dense GQA student (R1-Distill)
    .venv/bin/python bench/decode.py --tensor-parallel-size 2 [--enable-expert-parallel]   # adds r1forge over 2
        processes (gloo on CPU; on CUDA, NCCL over cuda:0..N-1), with each rank's resident parameter bytes

Prints decode tokens/s of both at each batch size and their ratio (each r1forge variant asked for runs in the
same process on the same weights), the physical limit of the run (the slower of: the bytes each step must
read over this device's measured copy bandwidth; 2 FLOPs per active parameter per token over its measured
matmul rate) and the share of it reached, and the KV-cache bytes per token that
r1forge's cache (MLA latent or GQA keys/values), transformers' cache and multi-head attention of the same shapes
hold. `--model-type qwen2` / `llama` times a dense GQA model (the R1-Distill students' architecture) instead.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import r1forge
import r1forge.parallel.tensor_parallel
from r1forge import LLM, SamplingParams

SHAPES = {
    # 80.3M parameters, 25.3M active: 6 layers, 32 routed experts (top-4) + 1 shared, MLA with q low-rank.
    "80m": dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, moe_intermediate_size=256,
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

# Dense GQA students (Qwen2 with q/k/v bias, Llama with llama3 rope), about 80M parameters: 4 query heads per kv head.
DENSE_SHAPES = {
    "qwen2": dict(model_type="qwen2", vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0,
                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=1),
    "llama": dict(model_type="llama", vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 1024},
                  bos_token_id=0, eos_token_id=1),
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


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large device-to-device copy (read + write), the memory system's practical limit."""
    src = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), 5)
    return 2 * src.numel() / seconds


def matmul_flops(device: str, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in the model's dtype, the compute limit."""
    a = torch.randn(2048, 2048, device=device).to(dtype)
    seconds = timed(lambda: a @ a, 5)
    return 2 * 2048**3 / seconds


def step_bytes(cfg, batch: int, context: int, dtype: torch.dtype) -> float:
    """Bytes one decode step must read: every weight but the embedding table (batch rows of it), of each MoE
    layer only the experts some token picks (expected number under uniform routing), and the KV cache."""
    total, _ = r1forge.count_parameters(cfg)
    D = cfg.hidden_size
    unused_weights = 0.0
    if getattr(cfg, "n_routed_experts", None):
        E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
        moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        unused_weights = (E - E * (1 - (1 - K / E) ** batch)) * 3 * D * cfg.moe_intermediate_size * moe_layers
    weights = total - cfg.vocab_size * D + batch * D - unused_weights
    cache = cfg.cache_spec().bytes_per_token(dtype) * batch * context
    return weights * torch.empty((), dtype=dtype).element_size() + cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-type", choices=["deepseek", *DENSE_SHAPES], default="deepseek",
                    help="deepseek (MLA + MoE, --preset picks the shape) or a dense GQA student: qwen2, llama")
    ap.add_argument("--preset", choices=sorted(SHAPES), default="80m")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt-len", default="32", help="prompt length(s), comma-separated: 32,512")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--compile", action="store_true", help="also time r1forge with torch.compile'd decode steps")
    ap.add_argument("--cuda-graphs", action="store_true", help="also time r1forge with CUDA-graph decode steps")
    ap.add_argument("--tensor-parallel-size", type=int, default=1,
                    help="also time r1forge sharded over this many processes (eager steps)")
    ap.add_argument("--enable-expert-parallel", action="store_true",
                    help="with --tensor-parallel-size: routed experts split over the ranks")
    args = ap.parse_args()
    import transformers

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.model_type == "deepseek":
        cfg = r1forge.ModelConfig.from_preset("tiny", **SHAPES[args.preset])
    else:
        from r1forge.auto_config import config_from_dict

        cfg = config_from_dict(DENSE_SHAPES[args.model_type])
    model = r1forge.build_model(cfg, dtype=dtype, device=args.device).eval()
    prompt_lens = [int(n) for n in args.prompt_len.split(",")]
    total, active = r1forge.count_parameters(cfg)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(args.device).eval()
    print(f"model: {total / 1e6:.1f}M parameters, {active / 1e6:.1f}M active; {args.device} {args.dtype}; "
          f"{cfg.model_type}, prompt {args.prompt_len}, {args.new_tokens} new tokens, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    max_batch = max(int(b) for b in args.batches.split(","))
    element_size = torch.empty((), dtype=dtype).element_size()
    # Each variant's pool holds the largest batch (on a GPU the default would take 90% of free memory each).
    pool = (max_batch + 1) * (max(prompt_lens) + args.new_tokens + 64) * cfg.cache_spec().bytes_per_token(dtype)
    engine = dict(max_num_seqs=max_batch, block_size=64, kv_cache_memory=pool)
    variants = {"r1forge": LLM(model, **engine)}
    if args.compile:
        variants["r1forge+compile"] = LLM(model, compile=True, **engine)
    if args.cuda_graphs:
        variants["r1forge+graphs"] = LLM(model, cuda_graphs=True, compile=args.compile, **engine)
    tp = args.tensor_parallel_size
    if tp > 1:
        name = f"r1forge+tp{tp}" + ("+ep" if args.enable_expert_parallel else "")
        variants[name] = LLM(model, tensor_parallel_size=tp, enable_expert_parallel=args.enable_expert_parallel,
                             **engine)
        for rank, held in sorted(variants[name].engine.runner.executor.rank_bytes.items()):
            print(f"{name} rank {rank} parameters: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in held.items()))
        full = r1forge.parallel.tensor_parallel.resident_bytes(model)
        print("one device parameters: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in full.items()))
    bandwidth = copy_bandwidth(args.device)
    flops = matmul_flops(args.device, dtype)
    print(f"measured copy bandwidth: {bandwidth / 1e9:.1f} GB/s, matmul {flops / 1e9:.0f} GFLOP/s")
    g = torch.Generator().manual_seed(1)
    runs = [(int(b), n) for n in prompt_lens for b in args.batches.split(",")]
    for batch, prompt_len in runs:
        prompts = torch.randint(2, cfg.vocab_size, (batch, prompt_len), generator=g)
        params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)

        def theirs() -> None:
            with torch.no_grad():
                hf.generate(prompts.to(args.device), attention_mask=torch.ones_like(prompts).to(args.device),
                            max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                            pad_token_id=0)

        tok = batch * args.new_tokens
        theirs()  # warm-up
        t_theirs = timed(theirs, args.repeats)
        # Limits for the whole generate call (prefill included): every step reads its bytes, and every token
        # (prompt and generated) costs 2 FLOPs per active parameter; the slower of the two bounds the run.
        memory_s = args.new_tokens * step_bytes(cfg, batch, prompt_len + args.new_tokens // 2, dtype) / bandwidth
        compute_s = 2 * active * batch * (prompt_len + args.new_tokens) / flops
        limit = tok / max(memory_s, compute_s)
        line = f"batch {batch:3d} prompt {prompt_len:4d}: transformers {tok / t_theirs:9.1f} tok/s"
        for name, llm in variants.items():
            def ours(llm: LLM = llm) -> None:
                llm.generate(prompts.tolist(), params)

            ours()  # warm-up (for compile and graphs: compilation and capture)
            t_ours = timed(ours, args.repeats)
            share = 100 * tok / t_ours / limit
            line += f" | {name} {tok / t_ours:9.1f} tok/s ({t_theirs / t_ours:5.2f}x, {share:4.1f}% of limit)"
        bound = "memory" if memory_s >= compute_s else "compute"
        print(line + f" | limit {limit:9.1f} tok/s ({bound}-bound)")
    llm = variants["r1forge"]
    if args.model_type != "deepseek":
        mha = 2 * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers * element_size
        print(f"KV cache per token (all layers): r1forge GQA {llm.cache_bytes_per_token} B "
              f"({cfg.num_key_value_heads} kv heads x k,v x {cfg.head_dim}) | MHA of the same heads {mha} B")
        return
    bytes_ = r1forge.kv_cache_bytes_per_token(cfg, element_size=element_size)
    print(f"KV cache per token (all layers): r1forge latent {llm.cache_bytes_per_token} B | transformers 5 "
          f"latent cache {bytes_.mla} B (re-expanded through kv_b_proj every step) | MHA {bytes_.mha} B "
          f"({bytes_.mha / bytes_.mla:.1f}x) | GQA-8 {bytes_.gqa8} B")
    v3 = r1forge.kv_cache_bytes_per_token(r1forge.ModelConfig.from_preset("deepseek-v3"))
    print(f"DeepSeek-V3 shapes, bf16: MLA {v3.mla} B/token vs MHA {v3.mha} B/token ({v3.mha / v3.mla:.1f}x, "
          f"MLA = {100 * v3.mla / v3.mha:.2f}%)")
    for llm in variants.values():
        llm.shutdown()


if __name__ == "__main__":
    main()
