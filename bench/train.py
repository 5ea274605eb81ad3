"""Training throughput of the r1forge trainer: tokens/s and, on a GPU, model FLOPs utilisation (MFU).

    .venv/bin/python bench/train.py                                   # tiny preset, CPU, fp32
    .venv/bin/python bench/train.py --preset small --seq-len 256 --batch-size 8
    .venv/bin/python bench/train.py --preset small --device cuda --batch-size 32 --seq-len 1024   # bf16 autocast
    .venv/bin/python bench/train.py --compare-transformers --threads 1 2      # against transformers, same weights

With `--compare-transformers` the same weights also train in transformers (`save_pretrained`, then its
`AutoModelForCausalLM`): the same batches, next-token cross-entropy over the same targets, backward, gradient
clipping and the same AdamW (decay on matrices only), steps of the two interleaved so that both see the same
machine load; MTP is off on both sides (transformers does not train it). It prints both medians and their ratio
at each `--threads` count.

Times full optimizer steps of `Trainer.train_step` (forward, MTP, backward, clipping, AdamW, router-bias update)
on random tokens, after `--warmup` untimed steps, and prints the median step time and tokens/s.

MFU = model FLOPs per second / the device's peak. Model FLOPs per token, the usual 6N rule plus attention:
  6 * (active parameters that multiply: everything a token touches except the embedding lookup; the MTP
       module and its second pass through the shared head when --mtp)
  + 6 * layers * heads * (qk_nope + qk_rope + v head dims) * T / 2   (causal QK^T and AV, forward + backward)
Peaks are dense bf16 tensor-core figures (H100/H200 SXM 989 TFLOP/s, A100 312); `--peak-tflops` sets another.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from r1forge import ModelConfig, build_model
from r1forge.accounting import count_parameters
from r1forge.data import StatefulLoader
from r1forge.train import LogConfig, TrainConfig, Trainer

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


class RandomTokens:
    """Rows of random token ids; labels are the next ids (the content does not matter for speed)."""

    def __init__(self, vocab_size: int, seq_len: int, rows: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab_size, (rows, seq_len + 1), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i, :-1], "labels": self.ids[i, 1:]}


def flops_per_token(config: ModelConfig, seq_len: int, mtp: bool) -> float:
    """Training FLOPs per token (forward + backward), see the module docstring."""
    _, active = count_parameters(config, include_mtp=mtp)
    embed = config.vocab_size * config.hidden_size
    matmul_params = active - embed  # the embedding is a lookup, not a matmul
    layers = config.num_hidden_layers
    if mtp and config.num_nextn_predict_layers:
        matmul_params += config.num_nextn_predict_layers * embed  # each MTP depth runs the shared head again
        layers += config.num_nextn_predict_layers
    head_dims = config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim
    attention = 6 * layers * config.num_attention_heads * head_dims * seq_len / 2
    return 6 * matmul_params + attention


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="model preset (tiny, small, ...)")
    p.add_argument("--vocab-size", type=int, default=None, help="override the preset's vocabulary")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-mtp", action="store_true", help="train without the MTP module")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    p.add_argument("--compare-transformers", action="store_true",
                   help="also train the same weights with transformers, interleaved, and print the ratio")
    p.add_argument("--threads", type=int, nargs="+", default=None, help="torch thread counts to run at (CPU)")
    args = p.parse_args()
    if args.compare_transformers:
        args.no_mtp = True
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        run(args)


def transformers_step(model: torch.nn.Module, data: RandomTokens, args: argparse.Namespace,
                      device: torch.device) -> Callable[[int], None]:
    """One training step of `model`'s weights in transformers: forward, the same cross-entropy, backward,
    clipping, AdamW; returned as a function of the step index (which batch to train on)."""
    import transformers

    from r1forge.train.schedule import build_optimizer

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).to(device)
    hf.train()
    optimizer = build_optimizer(hf, lr=3e-4)
    rows = args.batch_size * args.grad_accum

    def step(i: int) -> None:
        for j in range(args.grad_accum):
            start = i * rows + j * args.batch_size
            ids = data.ids[start : start + args.batch_size].to(device)
            logits = hf(input_ids=ids[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
            (loss / args.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run(args: argparse.Namespace) -> None:
    """Times the r1forge trainer (and, with --compare-transformers, transformers) at the current thread count."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    overrides = {"vocab_size": args.vocab_size} if args.vocab_size else {}
    config = ModelConfig.from_preset(args.preset, **overrides)
    mtp = not args.no_mtp and config.num_nextn_predict_layers > 0
    torch.manual_seed(0)
    model = build_model(config, device=device, with_mtp=mtp)
    data = RandomTokens(config.vocab_size, args.seq_len, args.batch_size * args.grad_accum * (args.steps + args.warmup))
    train = TrainConfig(steps=args.steps + args.warmup, batch_size=args.batch_size, grad_accum=args.grad_accum,
                        warmup_steps=1, mtp_lambda=0.3 if mtp else 0.0,
                        activation_checkpointing=args.activation_checkpointing)
    log = LogConfig(progress=False, tensorboard=False)
    theirs = transformers_step(model, data, args, device) if args.compare_transformers else None

    def timed(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(model, StatefulLoader(data, args.batch_size, seed=0), train, log, run_dir)
        times, their_times = [], []
        for i in range(args.steps + args.warmup):
            ours = timed(trainer.train_step)
            their = timed(lambda: theirs(i)) if theirs else 0.0  # noqa: B023 (called at once)
            if i >= args.warmup:
                times.append(ours)
                their_times.append(their)
    step_time = statistics.median(times)
    tokens = args.batch_size * args.grad_accum * args.seq_len
    tokens_per_s = tokens / step_time
    total, active = count_parameters(config, include_mtp=mtp)
    where = (f"{torch.cuda.get_device_name(device)}, bf16 autocast" if device.type == "cuda"
             else f"{torch.get_num_threads()} threads, fp32")
    print(f"preset {args.preset}: {total / 1e6:.2f}M parameters ({active / 1e6:.2f}M active), "
          f"MTP {'on' if mtp else 'off'}, {device} ({where})")
    print(f"batch {args.batch_size} x {args.grad_accum} x {args.seq_len} tokens: median step {step_time * 1e3:.1f} ms, "
          f"{tokens_per_s:,.0f} training tokens/s")
    per_token = flops_per_token(config, args.seq_len, mtp)
    flops = per_token * tokens_per_s
    peak = peak_flops(device, args.peak_tflops)
    line = f"model FLOPs: {flops / 1e12:.3f} TFLOP/s ({per_token / 1e6:.2f} MFLOP/token)"
    if peak:
        line += f", MFU {100 * flops / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s"
    print(line)
    if theirs:
        their_step = statistics.median(their_times)
        print(f"transformers: median step {their_step * 1e3:.1f} ms, {tokens / their_step:,.0f} training tokens/s; "
              f"r1forge {their_step / step_time:.2f}x transformers (steps interleaved, same batches)")


if __name__ == "__main__":
    main()
