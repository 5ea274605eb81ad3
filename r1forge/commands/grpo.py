"""`r1forge grpo CONFIG.yaml [--resume] [--grpo.beta 0.04 ...]`: GRPO from a YAML run config.

Every config field can be overridden as a dotted option after the config file; `--print-config` shows the
resolved config and exits. The work is `r1forge.rl.grpo_run.run_grpo`. Exit codes: 0 done, 2 bad input, 3 diverged
(the run ended in non-finite steps).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from r1forge.train.cli import add_run_arguments

    add_run_arguments(p, "grpo")


def run(args: argparse.Namespace) -> int:
    from r1forge.rl.grpo_run import GRPORunConfig, run_grpo
    from r1forge.train.cli import resolve_run_config, run_with_errors

    def main() -> int:
        cfg, resume = resolve_run_config(GRPORunConfig, args)
        if cfg is None:
            return 0
        result = run_grpo(cfg, resume=resume)
        for path in result.plots:
            print(f"plot: {path}")
        print(f"checkpoint: {result.checkpoint}")
        return 0 if result.status == "completed" else 3

    return run_with_errors(main)
