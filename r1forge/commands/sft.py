"""`r1forge sft CONFIG.yaml [--resume] [--train.lr 3e-4 ...]`: supervised fine-tuning from a YAML run config.

Every config field can be overridden as a dotted option after the config file; `--print-config` shows the
resolved config and exits. The work is `r1forge.train.run_sft`. Exit codes: 0 done, 2 bad input,
3 diverged (stopped by the non-finite loss guard, or ended in a non-finite streak).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from r1forge.train.cli import add_run_arguments

    add_run_arguments(p, "sft")


def run(args: argparse.Namespace) -> int:
    from r1forge.train import SFTRunConfig, run_sft
    from r1forge.train.cli import resolve_run_config, run_with_errors

    def main() -> int:
        cfg, resume = resolve_run_config(SFTRunConfig, args)
        if cfg is None:
            return 0
        return 0 if run_sft(cfg, resume=resume).status == "completed" else 3

    return run_with_errors(main)
