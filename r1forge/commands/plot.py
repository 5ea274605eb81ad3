"""`r1forge plot RUN_DIR [--out DIR]`: PNG plots of a run (loss curve, expert-load heatmap, load balance)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory with metrics.jsonl (what `r1forge pretrain` / `sft` write)")
    p.add_argument("--out", default=None, help="where to write the PNGs (default RUN_DIR/plots)")


def run(args: argparse.Namespace) -> int:
    from r1forge.train.cli import run_with_errors
    from r1forge.train.plots import plot_run

    def main() -> int:
        for path in plot_run(args.run_dir, args.out):
            print(path)
        return 0

    return run_with_errors(main)
