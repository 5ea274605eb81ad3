"""`r1forge <command>`: a table of subcommand -> module. Each module has `add_arguments(parser)` and `run(args) -> int`.

The work lives in the library; a command module only parses arguments and calls it. Modules are imported
lazily so `r1forge info` does not pay for the server's or trainer's imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("r1forge.commands.info", "model shapes, parameter counts and KV-cache bytes of a preset or checkpoint"),
    "demo": ("r1forge.commands.demo", "the main job: tokenizer, pretraining, cold-start SFT, GRPO, evaluation"),
    "generate": ("r1forge.commands.generate", "generate completions for prompts with the batched engine"),
    "chat": ("r1forge.commands.chat", "interactive chat that shows the reasoning apart from the answer"),
    "serve": ("r1forge.commands.serve", "OpenAI-compatible HTTP server"),
    "tokenizer": ("r1forge.commands.tokenizer", "train a byte-level BPE tokenizer"),
    "pretrain": ("r1forge.commands.pretrain", "pretrain from a YAML run config"),
    "sft": ("r1forge.commands.sft", "supervised fine-tuning on chat data"),
    "grpo": ("r1forge.commands.grpo", "GRPO reinforcement learning with rule-based rewards"),
    "sample": ("r1forge.commands.sample", "sample completions; --rejection keeps only correct ones as SFT data"),
    "distill": ("r1forge.commands.distill", "distil a teacher into a smaller dense student"),
    "plot": ("r1forge.commands.plot", "PNG plots of a run's metrics"),
}


def _available() -> dict[str, tuple[str, str]]:
    out = {}
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            out[name] = (module, help_text)
    return out


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    parser = argparse.ArgumentParser(prog="r1forge", description="DeepSeek-R1, end to end: model, engine, training, GRPO.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (module_name, help_text) in _available().items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        modules[name] = module_name
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Import only the chosen command's module (fast start), unless asking for help.
    if argv and argv[0] in COMMANDS and argv[0] in _available():
        module = importlib.import_module(COMMANDS[argv[0]][0])
        parser = argparse.ArgumentParser(prog=f"r1forge {argv[0]}", description=COMMANDS[argv[0]][1])
        module.add_arguments(parser)
        return int(module.run(parser.parse_args(argv[1:])) or 0)
    parser, _ = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
