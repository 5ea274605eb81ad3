"""Prompts with verifiable answers, the input of GRPO, rejection sampling and distillation: JSONL files, or
problems from the built-in generator.

An example is a dict with a string "question" and a string "answer"; any other keys reach the reward
functions as keyword arguments. The prompt text is not part of it: each consumer renders the question with
its template (`r1forge.rl.templates`).
"""

from __future__ import annotations

import os
from typing import Any

from r1forge.data.jsonl import DataError, iter_jsonl
from r1forge.data.synthetic import Problem, rl_example
from r1forge.train.config import ProblemSet, ProblemSource

HELD_OUT_SEED_OFFSET = 7919  # held-out problems use another seed as well as the test split


def reward_example(problem: Problem) -> dict[str, Any]:
    """A built-in problem as an example: `rl_example` without the rendered prompt and messages."""
    return {k: v for k, v in rl_example(problem).items() if k not in ("prompt", "messages")}


def read_examples(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Examples from JSONL: `{"question", "answer"}`, or a chat record (the last user turn is the question) with
    an "answer"; errors name the file and line."""
    out = []
    for line, record in iter_jsonl(path):
        if "question" not in record and isinstance(record.get("messages"), list):
            users = [m for m in record["messages"] if isinstance(m, dict) and m.get("role") == "user"]
            if users and isinstance(users[-1].get("content"), str):
                record = {**record, "question": users[-1]["content"]}
        if not isinstance(record.get("question"), str):
            raise DataError(path, line, "needs a string 'question' (or a user message)")
        if record.get("answer") is None:
            raise DataError(path, line, "needs an 'answer' to check samples against")
        record = {k: v for k, v in record.items() if k not in ("messages", "prompt")}
        record["answer"] = str(record["answer"])
        out.append(record)
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def problem_examples(count: int, seed: int, split: str, source: ProblemSource) -> list[dict[str, Any]]:
    """`count` built-in problems of `split` at the source's difficulty."""
    return [reward_example(p) for p in source.problems(count, seed, split)]


def train_and_held_out(source: ProblemSet, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training examples, held-out examples): from `files` / `eval_files` where given, else generated from the
    train and test splits (which never share a problem)."""
    if source.files:
        train = [ex for path in source.files for ex in read_examples(path)]
    else:
        train = problem_examples(source.synthetic_problems, seed, "train", source)
    if source.eval_files:
        held_out = [ex for path in source.eval_files for ex in read_examples(path)]
    else:
        held_out = problem_examples(source.synthetic_eval_problems, seed + HELD_OUT_SEED_OFFSET, "test", source)
    return train, held_out
