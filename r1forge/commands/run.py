"""The run commands `pretrain`, `sft`, `grpo`, `distill`: one code path, four table entries.

    r1forge pretrain CONFIG.yaml [--resume [latest|latest-intact]] [--print-config] [--SECTION.KEY VALUE ...]

`--resume` continues the newest checkpoint and refuses one whose checksums do not verify, naming the file;
`--resume latest-intact` falls back to the newest checkpoint that verifies (opt-in: a silent fall-back would
redo steps without saying so).

Each entry names its run-config class and the library function that runs it (imported only when the command
runs). Every config field can be overridden as a dotted option after the config file; `--print-config` shows
the resolved config and exits. Exit codes: 0 done, 2 bad input, 3 diverged (stopped by the non-finite loss
guard, or ended in a non-finite streak).

argparse sees the config path and the flags; everything after the path is read here, because argparse puts
every token after a REMAINDER positional into it (flags included).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Any, TypeVar

import yaml

from r1forge.commands.errors import run_with_errors

T = TypeVar("T")
_FLAGS = {"--print-config": "print_config"}


def add_run_arguments(p: argparse.ArgumentParser, command: str, example: str = "--train.lr 3e-4") -> None:
    """The run commands' arguments: CONFIG, --resume, --print-config, dotted overrides."""
    p.add_argument("config", help="YAML run config (see configs/); every field can be overridden after it")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in run_dir (fresh start if there is none); "
                        "`--resume latest-intact` skips damaged ones (checksums that do not match)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs=argparse.REMAINDER,
                   help=f"dotted config overrides, e.g. `r1forge {command} CONFIG {example}`")


def resolve_run_config(cls: type[T], args: argparse.Namespace) -> tuple[T | None, bool | str]:
    """(config, resume) from parsed arguments; config is None when only printing it (already printed).

    resume is False, "latest" or "latest-intact" (see r1forge.train.checkpointing).
    """
    from r1forge.train.checkpointing import RESUME_MODES
    from r1forge.train.config import config_to_dict, load_run_config

    flags: dict[str, bool | str] = {"resume": "latest" if args.resume else False,
                                    "print_config": bool(args.print_config)}
    overrides = []
    tokens = list(args.overrides or [])
    config = args.config
    if args.resume and config in RESUME_MODES and tokens:  # `--resume latest-intact CONFIG`: argparse took the
        flags["resume"], config = config, tokens.pop(0)   # mode for CONFIG (--resume is a plain flag there)
    while tokens:
        token = tokens.pop(0)
        if token.startswith("--resume="):
            flags["resume"] = token.split("=", 1)[1]
            if flags["resume"] not in RESUME_MODES:
                raise ValueError(f"--resume: expected one of {RESUME_MODES}, got {flags['resume']!r}")
        elif token == "--resume":
            flags["resume"] = tokens.pop(0) if tokens and tokens[0] in RESUME_MODES else "latest"
        elif token in _FLAGS:
            flags[_FLAGS[token]] = True
        else:
            overrides.append(token)
    cfg = load_run_config(cls, config, overrides)
    if flags["print_config"]:
        yaml.safe_dump(config_to_dict(cfg), sys.stdout, sort_keys=False)
        return None, flags["resume"]
    return cfg, flags["resume"]


def _load(target: str) -> Any:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class RunCommand:
    """`r1forge NAME CONFIG.yaml ...`: load a `config_class` run config and call `function(cfg, resume=...)`.

    Both are "module:name" strings so that building the parser imports neither torch nor the trainer. The
    function returns a result whose `status` is "completed" or "diverged" (the non-finite loss guard).
    """

    name: str
    config_class: str  # "module:RunConfigClass"
    function: str  # "module:run_x", called as run_x(cfg, resume=...)
    example: str  # an override shown in --help

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_run_arguments(p, self.name, self.example)

    def run(self, args: argparse.Namespace) -> int:
        def main() -> int:
            cfg, resume = resolve_run_config(_load(self.config_class), args)
            if cfg is None:
                return 0
            return 0 if _load(self.function)(cfg, resume=resume).status == "completed" else 3

        return run_with_errors(main)


RUN_COMMANDS = {c.name: c for c in (
    RunCommand("pretrain", "r1forge.train.config:PretrainRunConfig", "r1forge.train.run:run_pretrain",
               "--train.lr 3e-4 --train.steps=200"),
    RunCommand("sft", "r1forge.train.config:SFTRunConfig", "r1forge.train.run:run_sft",
               "--data.files data/rs.jsonl"),
    RunCommand("grpo", "r1forge.rl.config:GRPORunConfig", "r1forge.rl.run:run_grpo",
               "--grpo.loss_type grpo --grpo.beta 0.04"),
    RunCommand("distill", "r1forge.distill.config:DistillRunConfig", "r1forge.distill.run:run_distill",
               "--mode kl --teacher runs/sft-tiny"),
)}
