"""Command-line plumbing shared by the run commands (`pretrain`, `sft`, and later `grpo`, `distill`).

    r1forge pretrain CONFIG.yaml [--resume [latest|latest-intact]] [--print-config] [--SECTION.KEY VALUE ...]

`--resume` continues the newest checkpoint and refuses one whose checksums do not verify, naming the file;
`--resume latest-intact` falls back to the newest checkpoint that verifies (opt-in: a silent fall-back would
redo steps without saying so).

argparse sees the config path and the flags; everything after the path is read here, because argparse puts
every token after a REMAINDER positional into it (flags included).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TypeVar

import yaml

from r1forge.train.checkpointing import RESUME_MODES
from r1forge.train.config import config_to_dict, load_run_config

T = TypeVar("T")
_FLAGS = {"--print-config": "print_config"}


def add_run_arguments(p: argparse.ArgumentParser, command: str) -> None:
    """The run commands' arguments: CONFIG, --resume, --print-config, dotted overrides."""
    p.add_argument("config", help="YAML run config (see configs/); every field can be overridden after it")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in run_dir (fresh start if there is none); "
                        "`--resume latest-intact` skips damaged ones (checksums that do not match)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs=argparse.REMAINDER,
                   help=f"dotted config overrides, e.g. `r1forge {command} CONFIG --train.lr 3e-4 --train.steps=200`")


def resolve_run_config(cls: type[T], args: argparse.Namespace) -> tuple[T | None, bool | str]:
    """(config, resume) from parsed arguments; config is None when only printing it (already printed).

    resume is False, "latest" or "latest-intact" (see r1forge.train.checkpointing).
    """
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


def report_error(error: Exception) -> int:
    """Print a user error (bad config key, missing file) without a traceback; the exit code for it."""
    print(f"error: {error}", file=sys.stderr)
    return 2


def run_with_errors(fn: Any) -> int:
    """Call fn() and turn bad user input (ValueError, a missing file) into a one-line message and exit code 2."""
    try:
        return int(fn() or 0)
    except (ValueError, FileNotFoundError) as e:
        return report_error(e)
