"""The demo's evaluations of a checkpoint: greedy on the held-out problems (per problem, so the report can split
them by difficulty and pair the before/after verdicts), and pass@1 / pass@k of samples at the RL temperature."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from r1forge.rl.evaluate import EvalResult

PASS_AT_K = 8


def pass_at_k(llm: Any, tokenizer: Any, examples: list[dict[str, Any]], k: int, max_tokens: int,
              temperature: float, template: str, seed: int = 0) -> tuple[float, float]:
    """(pass@1, pass@k) of k samples per problem at `temperature`: the headroom RL can turn into greedy accuracy."""
    from r1forge.engine import SamplingParams
    from r1forge.rl.rewards import accuracy_reward
    from r1forge.rl.templates import render_prompt

    rendered = [render_prompt(tokenizer, ex["question"], template) for ex in examples]
    params = [SamplingParams(n=k, temperature=temperature, max_tokens=max_tokens, seed=seed + i)
              for i in range(len(examples))]
    outs = llm.generate([ids for _, ids in rendered], params, use_tqdm=True)
    p1, pk = 0.0, 0.0
    for (prompt, _), ex, out in zip(rendered, examples, outs):
        correct = [accuracy_reward(prompt, c.text, **ex) >= 1.0 for c in out.outputs]
        p1 += sum(correct) / k
        pk += float(any(correct))
    return p1 / len(examples), pk / len(examples)


def evaluation_record(result: EvalResult) -> dict[str, Any]:
    """An EvalResult as the JSON the demo caches: the rates and every problem's verdict, length and completion."""
    return {"accuracy": result.accuracy, "stderr": result.stderr, "format_rate": result.format_rate,
            "response_length": result.mean_length, "problems": result.num_problems, "correct": result.correct,
            "lengths": result.lengths, "formatted": result.formatted, "completions": result.completions}


def as_eval_result(record: dict[str, Any]) -> EvalResult:
    """A cached evaluation back as the EvalResult GRPO logs as its step-0 evaluation."""
    return EvalResult(record["accuracy"], record["format_rate"], record["response_length"], record["problems"],
                      record.get("completions", []), record["correct"], record.get("lengths", []),
                      record.get("formatted", []))


def evaluate_checkpoint(model_dir: Path, examples: list[dict[str, Any]], max_tokens: int, template: str,
                        pass_at_k_problems: int = 0, temperature: float = 1.0,
                        greedy: EvalResult | None = None) -> dict[str, Any]:
    """Greedy evaluation (unless `greedy` already holds it for this model) and, on the first
    `pass_at_k_problems` problems, sampled pass@1 / pass@k."""
    from r1forge.data import load_tokenizer
    from r1forge.engine import LLM
    from r1forge.loading import load_model
    from r1forge.rl.evaluate import evaluate

    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, device="cpu")
    llm = LLM(model, tokenizer=tokenizer, max_num_seqs=256, block_size=16)
    result = greedy or evaluate(llm, tokenizer, examples, template, max_tokens, progress=True)
    record = evaluation_record(result)
    if pass_at_k_problems:
        p1, pk = pass_at_k(llm, tokenizer, examples[:pass_at_k_problems], PASS_AT_K, max_tokens, temperature,
                           template)
        record.update({"pass@1": p1, f"pass@{PASS_AT_K}": pk})
    return record
