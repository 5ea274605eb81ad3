"""Held-out evaluation: greedy decoding on problems with verifiable answers, scored by the accuracy and format
rewards. Used by GRPO (before, during, after), distillation (teacher, student before and after) and the demo,
none of which needs the GRPO trainer for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from r1forge.engine import LLM, SamplingParams
from r1forge.rl.rewards import accuracy_reward, format_reward
from r1forge.rl.templates import render_prompt


@dataclass
class EvalResult:
    """Greedy decoding on held-out problems: the rates, and each problem's completion and verdict."""

    accuracy: float
    format_rate: float
    mean_length: float
    num_problems: int
    completions: list[str]
    correct: list[bool]
    lengths: list[int] = field(default_factory=list)  # each completion's tokens
    formatted: list[bool] = field(default_factory=list)  # each completion's strict format verdict

    @property
    def stderr(self) -> float:
        p = self.accuracy
        return (p * (1 - p) / max(self.num_problems, 1)) ** 0.5

    def to_dict(self) -> dict[str, float]:
        """The summary numbers (no completions), as reports store them."""
        return {"accuracy": self.accuracy, "stderr": self.stderr, "format_rate": self.format_rate,
                "mean_length": self.mean_length, "num_problems": self.num_problems}


@torch.no_grad()
def evaluate(llm: LLM, tokenizer: Any, examples: list[dict[str, Any]], template: str, max_tokens: int,
             progress: bool = False) -> EvalResult:
    """Greedy decoding on held-out problems: accuracy, format rate and mean response length (tokens)."""
    llm.model.eval()
    prompts, ids = zip(*(render_prompt(tokenizer, ex["question"], template) for ex in examples))
    outs = llm.generate([list(i) for i in ids], SamplingParams(temperature=0.0, max_tokens=max_tokens),
                        use_tqdm=progress)
    correct, formatted, lengths, texts = [], [], [], []
    for prompt, ex, out in zip(prompts, examples, outs):
        text = out.text
        correct.append(accuracy_reward(prompt, text, **ex) >= 1.0)
        formatted.append(format_reward(prompt, text, **ex) >= 1.0)
        lengths.append(len(out.token_ids))
        texts.append(text)
    n = len(examples)
    return EvalResult(sum(correct) / n, sum(formatted) / n, sum(lengths) / n, n, texts, correct, lengths, formatted)


@dataclass
class DifficultyRow:
    """One difficulty's share of an evaluation."""

    difficulty: Any
    problems: int
    accuracy: float
    mean_length: float
    format_rate: float


def by_difficulty(result: EvalResult, examples: list[dict[str, Any]], key: str = "steps") -> list[DifficultyRow]:
    """The evaluation split by `example[key]` (the built-in problems' number of steps), in increasing order.

    Why: the mean over all problems hides what RL changed; R1's signature is longer reasoning where the problem
    needs it, which shows only per difficulty. Examples without the key are left out.
    """
    if len(result.lengths) != len(examples) or len(result.correct) != len(examples):
        raise ValueError(f"by_difficulty: the evaluation has {len(result.correct)} problems, examples {len(examples)}")
    groups: dict[Any, list[int]] = {}
    for i, ex in enumerate(examples):
        if key in ex:
            groups.setdefault(ex[key], []).append(i)
    rows = []
    for level in sorted(groups):
        idx = groups[level]
        n = len(idx)
        rows.append(DifficultyRow(level, n, sum(result.correct[i] for i in idx) / n,
                                  sum(result.lengths[i] for i in idx) / n,
                                  sum(result.formatted[i] for i in idx) / n if result.formatted else float("nan")))
    return rows


def eval_record(result: EvalResult, prefix: str = "eval",
                examples: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """An evaluation as metrics.jsonl / TensorBoard scalars (`eval/accuracy`, ...); with the examples (that
    carry "steps"), also per difficulty: `eval/steps_3/accuracy`, `eval/steps_3/response_length`."""
    record = {f"{prefix}/accuracy": result.accuracy, f"{prefix}/accuracy_stderr": result.stderr,
              f"{prefix}/format_rate": result.format_rate, f"{prefix}/response_length": result.mean_length,
              f"{prefix}/problems": result.num_problems}
    if examples is not None and result.lengths:
        for row in by_difficulty(result, examples):
            record[f"{prefix}/steps_{row.difficulty}/accuracy"] = row.accuracy
            record[f"{prefix}/steps_{row.difficulty}/response_length"] = row.mean_length
    return record
