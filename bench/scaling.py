"""Data / expert-parallel training throughput: tokens/s for 1, 2, 4 processes and the weight-sync time.

    .venv/bin/python bench/scaling.py                            # CPU, gloo: 1, 2, 4 processes of the tiny preset
    .venv/bin/python bench/scaling.py --ep 2 --nprocs 2,4        # expert parallel over 2 ranks
    python3 bench/scaling.py --device cuda --preset small --nprocs 1,2,4,8 --seq-len 1024   # NCCL, bf16

Each configuration is launched by torchrun. Every rank trains `--batch-size` sequences per step (weak scaling:
the global batch grows with the world), through the same `Trainer` as `r1forge pretrain` (FSDP2, the EP
all-to-all, summed normalisers and loads, clipping over the sharded gradients). Reported: the median step time,
the global tokens/s, the scaling efficiency against one process, and the weight-sync time: gathering an
unsharded copy of every weight on every rank (`r1forge.parallel.gather`), what a GRPO rollout engine reads
after each update. On a 2-core CPU, more processes than cores only shows the communication overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from train import RandomTokens

    from r1forge import ModelConfig, build_model
    from r1forge.data import StatefulLoader
    from r1forge.parallel import ParallelConfig, init_parallel, parallelize
    from r1forge.parallel.gather import gather_full_state_dict
    from r1forge.train import LogConfig, TrainConfig, Trainer

    mesh = init_parallel(ParallelConfig(ep=args.ep))
    config = ModelConfig.from_preset(args.preset)
    torch.manual_seed(0)
    model = parallelize(build_model(config, with_mtp=True), mesh)
    steps = args.steps + args.warmup
    data = RandomTokens(config.vocab_size, args.seq_len, args.batch_size * mesh.world_size * steps)
    train = TrainConfig(steps=steps, batch_size=args.batch_size * mesh.world_size, warmup_steps=1, device=args.device)
    with tempfile.TemporaryDirectory() as run_dir:
        loader = StatefulLoader(data, args.batch_size, seed=0, rank=mesh.rank, world_size=mesh.world_size)
        trainer = Trainer(model, loader, train, LogConfig(progress=False, tensorboard=False), run_dir, parallel=mesh)
        times, syncs = [], []
        for i in range(steps):
            sync = torch.cuda.synchronize if mesh.device.type == "cuda" else (lambda: None)
            mesh.barrier()
            t = time.perf_counter()
            trainer.train_step()
            sync()
            mesh.barrier()
            t_sync = time.perf_counter()
            gather_full_state_dict(model, mesh)
            sync()
            mesh.barrier()
            if i >= args.warmup:
                times.append(t_sync - t)
                syncs.append(time.perf_counter() - t_sync)
    if mesh.is_main:
        print(json.dumps({"world": mesh.world_size, "ep": mesh.ep, "step_s": statistics.median(times),
                          "sync_s": statistics.median(syncs),
                          "tokens_per_s": args.batch_size * mesh.world_size * args.seq_len / statistics.median(times)}))
    mesh.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--nprocs", default="1,2,4", help="comma-separated process counts")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel degree (each count must be a multiple)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per rank per step")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, bf16, one GPU per process)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if args.device == "cpu":
        env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    base = None
    print(f"preset {args.preset}, {args.batch_size} x {args.seq_len} tokens per rank per step, ep {args.ep}, "
          f"{args.device}")
    print(f"{'procs':>5} {'step ms':>9} {'tokens/s':>10} {'efficiency':>10} {'weight sync ms':>15}")
    for n in (int(x) for x in args.nprocs.split(",")):
        if n % args.ep:
            print(f"{n:>5} skipped: not a multiple of --ep {args.ep}")
            continue
        ep = args.ep if n > 1 else 1
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", __file__,
               "--worker", "--preset", args.preset, "--ep", str(ep), "--batch-size", str(args.batch_size),
               "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--device", args.device]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode or not lines:
            print(f"{n:>5} failed:\n{out.stderr[-3000:]}")
            continue
        r = json.loads(lines[-1])
        base = base or r["tokens_per_s"]
        print(f"{n:>5} {r['step_s'] * 1e3:>9.1f} {r['tokens_per_s']:>10,.0f} {r['tokens_per_s'] / (base * n):>10.2f} "
              f"{r['sync_s'] * 1e3:>15.2f}")


if __name__ == "__main__":
    main()
