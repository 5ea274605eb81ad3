"""`r1forge demo [--out runs/demo] [--recipe r1|r1-zero]`: the main job. Tokenizer, pretraining, cold-start SFT,
evaluation, GRPO, evaluation again, a before/after table overall and per difficulty, plots, sample reasoning
traces, then distillation into a small dense student against RL alone; at most 20 minutes on a 2-core CPU.
`--recipe r1-zero` runs RL straight from the pretrained base instead. Finished stages are cached under --out:
a second run only prints the report."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="where every stage writes (default runs/demo); delete a "
                   "stage's folder to redo it")
    p.add_argument("--grpo-steps", type=int, default=None, help="GRPO steps (default: the demo's own)")
    p.add_argument("--recipe", choices=("r1", "r1-zero"), default="r1",
                   help="r1: cold start, GRPO, distillation (default); r1-zero: GRPO straight from the pretrained base")
    p.add_argument("--no-distill", action="store_true", help="recipe r1 without the distillation stage")


def run(args: argparse.Namespace) -> int:
    from r1forge.demo import run_demo
    from r1forge.commands.errors import run_with_errors

    def main() -> int:
        run_demo(args.out, recipe=args.recipe, grpo_steps=args.grpo_steps, distill=not args.no_distill)
        return 0

    return run_with_errors(main)
