"""Training throughput of the r1forge trainer: tokens/s and, on a GPU, model FLOPs utilisation (MFU).

    .venv/bin/python bench/train.py                                   # tiny preset, CPU, fp32
    .venv/bin/python bench/train.py --preset small --seq-len 256 --batch-size 8
    .venv/bin/python bench/train.py --preset small --device cuda --batch-size 32 --seq-len 1024   # bf16 autocast

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
    args = p.parse_args()

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
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(model, StatefulLoader(data, args.batch_size, seed=0), train, log, run_dir)
        times = []
        for i in range(args.steps + args.warmup):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            trainer.train_step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
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


if __name__ == "__main__":
    main()
