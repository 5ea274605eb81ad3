"""`r1forge distill CONFIG.yaml [--resume] [--mode kl ...]`: distil a teacher into a smaller dense student.

    r1forge distill configs/distill_tiny.yaml --teacher runs/sft-tiny              # SFT on teacher traces
    r1forge distill configs/distill_tiny.yaml --mode kl --run_dir runs/distill-kl  # forward KL

Every config field can be overridden as a dotted option after the config file; `--print-config` shows the
resolved config and exits. The work is `r1forge.distill.run_distill`; RUN_DIR/report.json holds the teacher's,
the untrained student's and the distilled student's held-out accuracy. Exit codes: 0 done, 2 bad input,
3 diverged (stopped by the non-finite loss guard, or ended in a non-finite streak).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from r1forge.train.cli import add_run_arguments

    add_run_arguments(p, "distill")


def run(args: argparse.Namespace) -> int:
    from r1forge.distill import DistillRunConfig, run_distill
    from r1forge.train.cli import resolve_run_config, run_with_errors

    def main() -> int:
        cfg, resume = resolve_run_config(DistillRunConfig, args)
        if cfg is None:
            return 0
        return 0 if run_distill(cfg, resume=resume).status == "completed" else 3

    return run_with_errors(main)
