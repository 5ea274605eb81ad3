"""`r1forge export RUN_DIR OUT_DIR`: a sharded (multi-process) checkpoint -> the Hugging Face safetensors layout.

RUN_DIR is a run directory (its newest complete checkpoint) or one `checkpoints/step-N` folder. The result
loads with transformers and `r1forge.load_model`. Runs under torchrun already do this into their last
checkpoint; this is for the others (and for copying a model out of a run). One process, no torchrun.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory or one of its checkpoints/step-N folders")
    p.add_argument("out_dir", help="where to write config.json, *.safetensors and the tokenizer")


def run(args: argparse.Namespace) -> int:
    from r1forge.parallel.checkpoint import export_checkpoint
    from r1forge.train.checkpointing import resolve_model_dir
    from r1forge.train.cli import run_with_errors

    def main() -> int:
        out = export_checkpoint(resolve_model_dir(args.run_dir), args.out_dir)
        print(f"exported {args.run_dir} -> {out}")
        return 0

    return run_with_errors(main)
