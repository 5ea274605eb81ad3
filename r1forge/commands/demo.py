"""`r1forge demo [--out runs/demo]`: the main job. Tokenizer, pretraining, cold-start SFT, evaluation, GRPO,
evaluation again, a before/after table, plots and a sample reasoning trace; about 20 minutes on a 2-core CPU.
Finished stages are cached under --out: a second run only prints the report."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="where every stage writes (default runs/demo); delete a "
                   "stage's folder to redo it")
    p.add_argument("--grpo-steps", type=int, default=None, help="GRPO steps (default: the demo's own)")


def run(args: argparse.Namespace) -> int:
    from r1forge.demo import run_demo
    from r1forge.commands.errors import run_with_errors

    def main() -> int:
        run_demo(args.out, grpo_steps=args.grpo_steps)
        return 0

    return run_with_errors(main)
