"""The demo's printed report: the before/after table, the same per number of solution steps, one sample trace per
difficulty, and the distillation comparison; every gain with the standard error of the paired difference (the
two evaluations score the same held-out problems)."""

from __future__ import annotations

import math
from typing import Any

from r1forge.demo.evaluation import PASS_AT_K
from r1forge.rl.evaluate import EvalResult, by_difficulty


def paired_gain(after: list[bool], before: list[bool]) -> tuple[float, float, float]:
    """(mean of after - before, its standard error, z = mean / SE) over the same problems."""
    n = len(before)
    if n == 0 or len(after) != n:
        raise ValueError(f"paired_gain: {len(after)} vs {len(before)} verdicts")
    diffs = [float(a) - float(b) for a, b in zip(after, before)]
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / max(n - 1, 1) / n)
    z = mean / se if se > 0 else (math.inf if mean > 0 else 0.0)
    return mean, se, z


def difficulty_rows(record: dict[str, Any], examples: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """{steps: {problems, accuracy, length}} of a cached evaluation (r1forge.rl.evaluate.by_difficulty's rows)."""
    result = EvalResult(0.0, 0.0, 0.0, len(examples), [], record["correct"], record["lengths"],
                        record.get("formatted", []))
    return {int(row.difficulty): {"problems": row.problems, "accuracy": row.accuracy, "length": row.mean_length}
            for row in by_difficulty(result, examples)}


def hard_problem_summary(before: dict[str, Any], after: dict[str, Any], examples: list[dict[str, Any]],
                         min_steps: int = 3) -> dict[str, float]:
    """Accuracy and mean length before/after on the problems with at least `min_steps` steps."""
    idx = [i for i, ex in enumerate(examples) if int(ex.get("steps", 0)) >= min_steps]
    if not idx:
        return {}
    mean = lambda xs: sum(xs) / len(idx)  # noqa: E731
    return {"problems": len(idx), "min_steps": min_steps,
            "accuracy_before": mean([before["correct"][i] for i in idx]),
            "accuracy_after": mean([after["correct"][i] for i in idx]),
            "length_before": mean([before["lengths"][i] for i in idx]),
            "length_after": mean([after["lengths"][i] for i in idx])}


def print_before_after(before: dict[str, Any], after: dict[str, Any], examples: list[dict[str, Any]],
                       steps: int, labels: tuple[str, str] = ("after SFT", "after GRPO")) -> dict[str, Any]:
    """The overall table, the per-difficulty table and the paired gain; returns them as numbers."""
    k = f"pass@{PASS_AT_K}"
    rows = [("held-out accuracy (greedy)", "accuracy", "{:.3f}"), ("format rate", "format_rate", "{:.3f}"),
            ("response length (tokens)", "response_length", "{:.1f}"), ("sampled pass@1", "pass@1", "{:.3f}"),
            (f"sampled {k}", k, "{:.3f}")]
    print(f"\n{'':30s}{labels[0]:>12s}{labels[1]:>12s}")
    for name, key, fmt in rows:
        if key in before and key in after:
            print(f"{name:30s}{fmt.format(before[key]):>12s}{fmt.format(after[key]):>12s}")
    gain, se, z = paired_gain(after["correct"], before["correct"])
    n = before["problems"]
    print(f"\nRL gain: {gain:+.3f} accuracy on {n} held-out problems ({steps} steps), {z:.1f} standard errors "
          f"(paired SE {se:.3f}); those problems are test-split: in no pretraining, SFT or RL data.")
    per_level_before = difficulty_rows(before, examples)
    per_level_after = difficulty_rows(after, examples)
    print(f"\nper number of solution steps   {'accuracy':>17s}   {'response length':>17s}")
    print(f"{'steps':>6s}{'problems':>10s}{labels[0]:>12s}{labels[1]:>12s}   {labels[0]:>9s}{labels[1]:>11s}{'ratio':>7s}")
    for level, b in per_level_before.items():
        a = per_level_after[level]
        ratio = a["length"] / b["length"] if b["length"] else math.nan
        print(f"{level:>6d}{b['problems']:>10d}{b['accuracy']:>12.3f}{a['accuracy']:>12.3f}   "
              f"{b['length']:>9.1f}{a['length']:>11.1f}{ratio:>6.2f}x")
    hard = hard_problem_summary(before, after, examples)
    if hard:
        print(f"problems with {hard['min_steps']}+ steps ({hard['problems']}): accuracy {hard['accuracy_before']:.3f} "
              f"-> {hard['accuracy_after']:.3f}, response length {hard['length_before']:.1f} -> "
              f"{hard['length_after']:.1f} tokens ({hard['length_after'] / max(hard['length_before'], 1e-9):.2f}x)")
    return {"gain": gain, "gain_se": se, "gain_z": z, "by_steps": {"before": per_level_before,
                                                                  "after": per_level_after}, "hard": hard}


def print_sample_traces(record: dict[str, Any], examples: list[dict[str, Any]], prompt_opens_think: bool,
                        title: str) -> list[dict[str, Any]]:
    """The first held-out problem of each difficulty and whatever the model wrote for it (greedy)."""
    print(f"\n{title}")
    shown: list[dict[str, Any]] = []
    first: dict[int, int] = {}
    for i, ex in enumerate(examples):
        first.setdefault(int(ex.get("steps", 0)), i)
    for level, i in sorted(first.items()):
        ex = examples[i]
        completion = record["completions"][i]
        verdict = ("correct" if record["correct"][i] else "wrong") + (
            ", well-formed" if record["formatted"][i] else ", malformed")
        print(f"\n  [{level} step{'s' if level != 1 else ''}] {ex['question']}  (reference {ex['answer']}; {verdict})")
        text = ("<think>\n" if prompt_opens_think else "") + completion
        print("\n".join("    " + line for line in text.splitlines()))
        shown.append({"steps": level, "question": ex["question"], "answer": ex["answer"], "completion": completion,
                      "correct": record["correct"][i], "formatted": record["formatted"][i]})
    return shown


def print_distillation(report: dict[str, Any]) -> None:
    """Teacher vs distilled student vs the same student by RL alone, on the same held-out problems."""
    t, d, r = report["teacher"], report["distilled"], report["rl_alone"]
    n = t["problems"]
    print(f"\ndistillation (DeepSeek-R1 section 4.1): greedy accuracy on the same {n} held-out problems")
    print(f"  {'teacher, R1 recipe (' + report['teacher_arch'] + ')':62s}{t['accuracy']:.3f}")
    print(f"  {'student base (' + report['student_arch'] + '), pretrained only':62s}"
          f"{report['student_base']['accuracy']:.3f}")
    print(f"  {'student distilled from the teacher (' + format(report['distill_seconds'], '.0f') + ' s)':62s}"
          f"{d['accuracy']:.3f}")
    print(f"  {'same student, cold start + GRPO alone (' + format(report['rl_seconds'], '.0f') + ' s)':62s}"
          f"{r['accuracy']:.3f}")
    gain, se, z = report["distill_minus_rl"]
    verdict = "holds here" if z >= 2 else ("is reversed here" if z <= -2 else "is within noise here")
    print(f"  distillation - RL alone: {gain:+.3f} ({z:.1f} standard errors, paired SE {se:.3f}): the paper's "
          f"finding (distillation beats RL at small scale) {verdict}")
