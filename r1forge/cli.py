"""`r1forge <command>`: a table of subcommand -> command. A command is a module, or an object named as
"module:name" (the run commands of r1forge.commands.run), with `add_arguments(parser)` and `run(args) -> int`.

The work lives in the library; a command module only parses arguments and calls it. Modules are imported
lazily so `r1forge info` does not pay for the server's or trainer's imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("r1forge.commands.info", "model shapes, parameter counts and KV-cache bytes of a preset or checkpoint"),
    "demo": ("r1forge.commands.demo", "the main job: tokenizer, pretraining, cold-start SFT, GRPO, evaluation"),
    "generate": ("r1forge.commands.generate", "generate completions for prompts with the batched engine"),
    "chat": ("r1forge.commands.chat", "interactive chat that shows the reasoning apart from the answer"),
    "serve": ("r1forge.commands.serve", "OpenAI-compatible HTTP server"),
    "tokenizer": ("r1forge.commands.tokenizer", "train a byte-level BPE tokenizer"),
    "pretrain": ("r1forge.commands.run:RUN_COMMANDS.pretrain", "pretrain from a YAML run config"),
    "sft": ("r1forge.commands.run:RUN_COMMANDS.sft", "supervised fine-tuning on chat data"),
    "grpo": ("r1forge.commands.run:RUN_COMMANDS.grpo", "GRPO reinforcement learning with rule-based rewards"),
    "sample": ("r1forge.commands.sample", "sample completions; --rejection keeps only correct ones as SFT data"),
    "distill": ("r1forge.commands.run:RUN_COMMANDS.distill", "distil a teacher into a smaller dense student"),
    "plot": ("r1forge.commands.plot", "PNG plots of a run's metrics"),
    "export": ("r1forge.commands.export", "a sharded multi-process checkpoint -> Hugging Face safetensors"),
}


def _available() -> dict[str, tuple[str, str]]:
    out = {}
    for name, (target, help_text) in COMMANDS.items():
        if importlib.util.find_spec(target.split(":")[0]) is not None:
            out[name] = (target, help_text)
    return out


def load_command(target: str) -> Any:
    """"module" -> the module; "module:TABLE.key" -> that entry of the module's table (a RunCommand)."""
    module_name, _, entry = target.partition(":")
    command: Any = importlib.import_module(module_name)
    if entry:
        table, key = entry.split(".")
        command = getattr(command, table)[key]
    return command


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    parser = argparse.ArgumentParser(prog="r1forge", description="DeepSeek-R1, end to end: model, engine, training, GRPO.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (target, help_text) in _available().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        load_command(target).add_arguments(p)
        modules[name] = target
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Import only the chosen command's module (fast start), unless asking for help.
    if argv and argv[0] in COMMANDS and argv[0] in _available():
        command = load_command(COMMANDS[argv[0]][0])
        parser = argparse.ArgumentParser(prog=f"r1forge {argv[0]}", description=COMMANDS[argv[0]][1])
        command.add_arguments(parser)
        return int(command.run(parser.parse_args(argv[1:])) or 0)
    parser, _ = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
