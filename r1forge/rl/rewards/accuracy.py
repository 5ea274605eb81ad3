"""The accuracy reward: does the final answer equal the reference, as a number or as a math expression?

Order of checks, cheapest first: equal strings after normalisation; equal plain numbers (exact fractions, so
`0.5` == `1/2` == `\\frac12`, `1,000` == `1000`, `50%` == `0.5`); otherwise symbolic equality in the sympy
worker under a time limit (`x+1` == `1+x`, `2x` == `2*x`, `\\sqrt{8}` == `2\\sqrt{2}`). Never by string only.
"""

from __future__ import annotations

from typing import Any

from r1forge.rl.rewards.answers import (MAX_ANSWER_CHARS, compare_key, extract_answer, normalize_answer, numbers_equal,
                                        parse_number, reference_answer, strip_assignment)
from r1forge.rl.rewards.checker import MathChecker, default_checker
from r1forge.rl.rewards.stats import RewardFunction, Unparsable, guarded, to_text


def answers_match(pred: str, gold: str, checker: MathChecker | None = None) -> bool:
    """pred (already extracted) equals gold? Raises Unparsable when pred is empty/too long or the symbolic
    check cannot read the answers, TimeoutError when it runs out of time."""
    pred_n, gold_n = strip_assignment(normalize_answer(pred), normalize_answer(gold))
    if not pred_n or len(pred_n) > MAX_ANSWER_CHARS:
        raise Unparsable(f"answer of {len(pred_n)} characters")
    if compare_key(pred_n) == compare_key(gold_n):
        return True
    pred_num, gold_num = parse_number(pred_n), parse_number(gold_n)
    if pred_num is not None and gold_num is not None:
        return numbers_equal(pred_num, gold_num)
    if len(gold_n) > MAX_ANSWER_CHARS:
        return False
    verdict = (checker or default_checker()).equal(pred_n, gold_n)
    if verdict is None:
        raise Unparsable("not parsable as math")
    return bool(verdict)


def make_accuracy_reward(checker: MathChecker | None = None, name: str = "accuracy") -> RewardFunction:
    """An accuracy reward with its own checker (timeout, math-verify on/off); counted under `name`."""

    @guarded(name)
    def accuracy(prompt: Any, completion: Any, /, **example: Any) -> float:
        pred = extract_answer(to_text(completion))
        if pred is None:
            raise Unparsable("no <answer>...</answer> or \\boxed{} in the completion")
        gold = reference_answer(example.get("answer"))
        if gold is None:
            raise Unparsable("the example has no reference answer")
        return 1.0 if answers_match(pred, to_text(gold), checker) else 0.0

    accuracy.__name__ = accuracy.__qualname__ = f"{name}_reward"
    return accuracy


accuracy_reward: RewardFunction = make_accuracy_reward()
accuracy_reward.__doc__ = """1.0 when the completion's final answer (last <answer>, else last \\boxed{}) equals
`example["answer"]` as a number or a math expression, else 0.0; never raises (see RewardStats)."""
