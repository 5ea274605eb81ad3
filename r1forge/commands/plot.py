"""`r1forge plot RUN_DIR [--out DIR]`: PNG plots of a run: loss, expert load and balance for pretrain / SFT runs;
reward, accuracy, response length and KL / entropy / clipping for GRPO runs."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory with metrics.jsonl (what `r1forge pretrain` / `sft` / `grpo` write)")
    p.add_argument("--out", default=None, help="where to write the PNGs (default RUN_DIR/plots)")


def run(args: argparse.Namespace) -> int:
    from r1forge.commands.errors import run_with_errors
    from r1forge.train.metrics import read_metrics
    from r1forge.train.plots import plot_run

    def main() -> int:
        if any("reward_mean" in r for r in read_metrics(args.run_dir)):
            from r1forge.rl.plots import plot_grpo_run

            paths = plot_grpo_run(args.run_dir, args.out)
        else:
            paths = plot_run(args.run_dir, args.out)
        for path in paths:
            print(path)
        return 0

    return run_with_errors(main)
