"""`r1forge chat MODEL_DIR`: an interactive chat; the reasoning inside <think> is shown dimmed, apart from the answer."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from r1forge.commands.engine_args import add_engine_arguments, engine_kwargs

DIM, RESET, BOLD = "\x1b[2m", "\x1b[0m", "\x1b[1m"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint directory with a tokenizer and chat template")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--no-think", action="store_true", help="do not open the assistant turn with <think>")
    add_engine_arguments(p)


def chat_turn(llm, messages: list[dict], params, thinking: bool, out: TextIO | None = None) -> str:
    """Stream one assistant reply, reasoning dimmed; returns the answer text (what goes into the history)."""
    from r1forge.serve.reasoning import ReasoningStreamParser

    out = out or sys.stdout  # looked up per call: sys.stdout may be redirected after import

    ids = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, thinking=thinking)
    parser = ReasoningStreamParser(prompt_opened_think=thinking)
    answer, in_reasoning = [], False
    color = out.isatty() if hasattr(out, "isatty") else False

    def show(reasoning: str, content: str) -> None:
        nonlocal in_reasoning
        if reasoning:
            if not in_reasoning:
                out.write((DIM if color else "") + "[thinking] ")
                in_reasoning = True
            out.write(reasoning)
        if content:
            if in_reasoning:
                out.write((RESET if color else "") + "\n\n")
                in_reasoning = False
            out.write(content)
            answer.append(content)
        out.flush()

    for delta in llm.stream(list(ids), params):
        show(*parser.feed(delta.text))
    show(*parser.finish())
    out.write((RESET if color and in_reasoning else "") + "\n")
    return "".join(answer).strip()


def run(args: argparse.Namespace) -> int:
    from r1forge.commands.errors import run_with_errors

    return run_with_errors(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from r1forge import LLM, SamplingParams

    llm = LLM(args.model, **engine_kwargs(args))
    if llm.tokenizer is None:
        raise SystemExit(f"{args.model} has no tokenizer.json")
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print(f"{BOLD}r1forge chat{RESET} ({args.model}) - empty line or Ctrl-D to quit, /reset to clear the history")
    while True:
        try:
            user = input(f"{BOLD}> {RESET}")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not user.strip():
            return 0
        if user.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": user})
        reply = chat_turn(llm, messages, params, thinking=not args.no_think)
        messages.append({"role": "assistant", "content": reply})
