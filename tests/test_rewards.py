"""Rule-based rewards on tricky inputs: answer extraction, numeric/symbolic equivalence under a time limit, the
format reward with and without a prompt that opened <think>, language consistency, DAPO's overlong penalty, user
rewards and their weighted sum. Every reward must return a float and never raise."""

from __future__ import annotations

import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from r1forge.rl.rewards import (REWARD_STATS, MathChecker, accuracy_reward, answers_match, combine_rewards,
                                extract_answer, extract_boxed, format_reward, format_reward_soft, get_reward,
                                language_consistency_reward, load_reward, make_accuracy_reward, overlong_penalty,
                                parse_number, register_reward)
from r1forge.rl.rewards.math_worker import NotMath, latex_to_expr
from r1forge.rl.rewards.registry import REWARD_FUNCTIONS

CHAT_PROMPT = "<｜User｜>What is 2+3?<｜Assistant｜><think>\n"
R1_ZERO_PROMPT = "... User: What is 2+3? Assistant:"


@pytest.fixture(autouse=True)
def _fresh_stats():
    REWARD_STATS.reset()
    yield
    REWARD_STATS.reset()


@pytest.fixture(scope="module")
def checker():
    """Our own sympy path (math-verify off), with a timeout generous enough for a loaded CI machine."""
    c = MathChecker(timeout_s=20.0, use_math_verify=False)
    yield c
    c.close()


@pytest.fixture(scope="module")
def accuracy(checker):
    return make_accuracy_reward(checker, name="accuracy_test")


# ------------------------------------------------------------------------------------------- extraction
def test_last_answer_tag_wins_and_nested_tags():
    assert extract_answer("<answer>3</answer> then <answer>5</answer>") == "5"
    assert extract_answer("<answer>outer <answer>7</answer></answer>") == "7"
    assert extract_answer("<answer>  \\boxed{12}  </answer>") == "12"
    assert extract_answer("no tags, \\boxed{1} and finally \\boxed{2}.") == "2"


def test_missing_closing_tag_scores_zero_and_is_counted(accuracy):
    assert extract_answer("<answer>5</answer> <answer>6") is None
    assert accuracy("", "<think>x</think><answer>5", answer="5") == 0.0
    assert REWARD_STATS.count("accuracy_test", "unparsable") == 1


def test_boxed_brace_matching():
    assert extract_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_boxed("x \\boxed{\\sqrt{\\frac{a}{b}} + {c}} y") == "\\sqrt{\\frac{a}{b}} + {c}"
    assert extract_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"  # escaped braces are not braces
    assert extract_boxed("\\boxed 5$") == "5"
    assert extract_boxed("\\boxed{\\frac{1}{2}") is None  # unbalanced
    assert extract_boxed("\\fbox{4}") == "4"


# ------------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("pred, gold, expected", [
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("0.5", "1/2", 1.0),
    ("\\frac12", "0.5", 1.0),
    ("\\dfrac{1}{2}", "\\frac12", 1.0),
    ("1,000", "1000", 1.0),
    ("1000.", "1,000", 1.0),
    ("-3", "-3.0", 1.0),
    ("50%", "0.5", 1.0),
    ("50\\%", "50", 1.0),
    ("x = 5", "5", 1.0),
    ("$\\$12.50$", "12.5", 1.0),
    ("10 \\text{ cm}", "10", 1.0),
    ("x+1", "1+x", 1.0),
    ("2x", "2*x", 1.0),
    ("\\left(x+1\\right)^2", "x^2+2x+1", 1.0),
    ("\\sqrt{8}", "2\\sqrt{2}", 1.0),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", 1.0),
    ("2 \\cdot 3", "6", 1.0),
    ("\\pi r^2", "r^{2} \\pi", 1.0),
    ("(1, 2)", "(2, 1)", 1.0),
    ("x+1", "x+2", 0.0),
    ("0.55", "0.5", 0.0),
    ("0.333", "1/3", 0.0),
    ("-5", "5", 0.0),
    ("2x", "x^2", 0.0),
])
def test_answer_equivalence(accuracy, pred, gold, expected):
    assert accuracy("", f"<think>...</think> <answer>{pred}</answer>", answer=gold) == expected


def test_numbers_never_reach_sympy():
    class Refuses:
        def equal(self, pred, gold):
            raise AssertionError("plain numbers must be compared without sympy")

    assert answers_match("0.5", "1/2", Refuses())
    assert answers_match("\\frac{3}{4}", "75%", Refuses())
    assert not answers_match("1,001", "1000", Refuses())
    assert parse_number("1/0") is None and parse_number("\\frac{1}{0}") is None
    assert parse_number("1e99999999") is None  # no giant integers from an exponent


def test_reference_answer_forms(accuracy):
    done = "<answer>72</answer>"
    assert accuracy("", done, answer=72) == 1.0
    assert accuracy("", done, answer=72.0) == 1.0
    assert accuracy("", done, answer="Natalia sold 48/2 = 24 clips ... #### 72") == 1.0
    assert accuracy("", done, answer="\\boxed{72}") == 1.0
    assert accuracy("", done, answer=None) == 0.0
    assert accuracy("", done) == 0.0
    assert REWARD_STATS.count("accuracy_test", "unparsable") == 2


def test_default_accuracy_reward_with_or_without_math_verify():
    assert accuracy_reward("", "<answer>\\frac{1}{2}</answer>", answer="0.5") == 1.0
    assert accuracy_reward("", "<answer>x+1</answer>", answer="1+x") == 1.0
    assert accuracy_reward("", "<answer>x+1</answer>", answer="x-1") == 0.0
    assert accuracy_reward("", "The answer is 4", answer="4") == 0.0
    assert REWARD_STATS.count("accuracy", "unparsable") == 1


def test_pathological_expression_times_out_and_worker_recovers():
    fast = MathChecker(timeout_s=2.0, use_math_verify=False)
    reward = make_accuracy_reward(fast, name="accuracy_timeout")
    try:
        assert reward("", "<answer>2x</answer>", answer="2*x") == 1.0  # worker started and warm
        start = time.perf_counter()
        assert reward("", "<answer>9^{9^{9}}</answer>", answer="x") == 0.0  # a 370-million-digit integer
        assert time.perf_counter() - start < 5 * fast.timeout_s  # the timeout fired, not the computation
        assert REWARD_STATS.count("accuracy_timeout", "timeout") == 1
        assert reward("", "<answer>x+1</answer>", answer="1+x") == 1.0  # a fresh worker answers again
        assert fast.restarts == 1
    finally:
        fast.close()


def test_checks_from_several_threads_at_once(accuracy):
    # rewards may be scored off the main thread (no signal-based timeouts), several at a time
    cases = [("x+1", "1+x", 1.0), ("2x", "2*x", 1.0), ("x^2", "x*x", 1.0), ("x+1", "x", 0.0)] * 3
    with ThreadPoolExecutor(max_workers=4) as pool:
        scores = list(pool.map(lambda c: accuracy("", f"<answer>{c[0]}</answer>", answer=c[1]), cases))
    assert scores == [c[2] for c in cases]


def test_model_output_is_never_evaluated_as_python(accuracy, tmp_path):
    target = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {target}')"
    assert accuracy("", f"<answer>{payload}</answer>", answer="0") == 0.0
    assert accuracy("", "<answer>exit()</answer>", answer="1") == 0.0
    assert accuracy("", "<answer>(2).n(100000000)</answer>", answer="2") == 0.0  # no attribute access
    for text in (payload, "(2).n(10)", "x_1", "'s'", "a;b", "\\input{/etc/passwd}"):
        with pytest.raises(NotMath):
            latex_to_expr(text)
    assert latex_to_expr("\\frac{\\frac{1}{2}}{\\sqrt[3]{x}}") == "((((1)/(2)))/(((x)**(1/(3)))))"
    assert not target.exists()
    assert accuracy("", "<answer>x+1</answer>", answer="1+x") == 1.0  # the worker survived


# ------------------------------------------------------------------------------------------- robustness
@pytest.mark.timeout(120)  # a hang guard only: quadratic parsing of these inputs would take hours
def test_very_long_outputs_finish_fast(accuracy):
    cases = [
        ("a" * 1_000_000 + "<answer>42</answer>", 1.0),
        ("<answer>" + "1+" * 500_000 + "1</answer>", 0.0),  # a 1 MB "answer" is not sent to sympy
        ("\\boxed{" + "{" * 1_000_000, 0.0),
        ("<think>" + "word " * 200_000 + "</think><answer>42</answer>", 1.0),
    ]
    for completion, expected in cases:
        assert accuracy("", completion, answer="42") == expected
        format_reward("", completion)
        format_reward_soft("", completion)
        language_consistency_reward("", completion)


def test_non_utf8_and_surrogates(accuracy):
    as_bytes = b"<think>\xff\xfe the caf\xc3\xa9</think> <answer>7</answer>"  # invalid bytes, then UTF-8
    with_surrogates = "<think>\udcff\udcfe reasoning</think> <answer>7</answer>"
    for completion, english in ((as_bytes, 0.5), (with_surrogates, 1.0)):
        assert accuracy("", completion, answer="7") == 1.0
        assert format_reward("", completion) == 1.0
        assert language_consistency_reward("", completion) == english  # "café" is not ASCII English
    assert accuracy("", b"<answer>7\xff</answer>", answer="7") == 0.0  # a garbled answer is not 7
    assert REWARD_STATS.count("accuracy_test", "error") == 0


@pytest.mark.parametrize("completion", ["", None, "   ", "<answer></answer>", "</answer><answer>"])
def test_empty_inputs_score_zero_without_raising(accuracy, completion):
    for reward in (accuracy, accuracy_reward, format_reward, language_consistency_reward):
        value = reward("", completion, answer="1")
        assert isinstance(value, float) and value == 0.0
    assert 0.0 <= format_reward_soft("", completion) < 1.0  # partial credit for the answer tags is fine
    assert accuracy(None, "<answer>1</answer>", answer="1") == 1.0


# ------------------------------------------------------------------------------------------- format
def test_format_reward_plain_template():
    assert format_reward(R1_ZERO_PROMPT, " <think> 2+3=5 </think> <answer> 5 </answer>") == 1.0
    assert format_reward(R1_ZERO_PROMPT, "<think>a</think>\nso:\n<answer>5</answer>\n\n") == 1.0
    assert format_reward(R1_ZERO_PROMPT, "<answer>5</answer><think>a</think>") == 0.0  # reversed
    assert format_reward(R1_ZERO_PROMPT, "<think>a</think><answer>5</answer> more text") == 0.0
    assert format_reward(R1_ZERO_PROMPT, "<think>a</think><think>b</think><answer>5</answer>") == 0.0
    assert format_reward(R1_ZERO_PROMPT, "hi <think>a</think><answer>5</answer>") == 0.0
    assert format_reward(R1_ZERO_PROMPT, "<think>a</think><answer>5") == 0.0
    assert format_reward(R1_ZERO_PROMPT, "2+3=5 </think><answer>5</answer>") == 0.0  # prompt did not open it


def test_format_reward_when_the_prompt_opened_think():
    assert format_reward(CHAT_PROMPT, "2+3=5\n</think>\n\n<answer>5</answer>") == 1.0
    assert format_reward("<think>", "x</think><answer>5</answer>") == 1.0
    assert format_reward("<think> \n\t", "x</think><answer>5</answer>") == 1.0
    assert format_reward(CHAT_PROMPT, "<think>x</think><answer>5</answer>") == 0.0  # opened twice
    assert format_reward(CHAT_PROMPT, "<answer>5</answer></think>") == 0.0


def test_soft_format_partial_credit():
    assert format_reward_soft(R1_ZERO_PROMPT, "<think>a</think><answer>5</answer>") == 1.0
    assert format_reward_soft(R1_ZERO_PROMPT, "<think>a</think> 5") == 0.5
    assert format_reward_soft(R1_ZERO_PROMPT, "<think>a</think><answer>5") == 0.75
    assert format_reward_soft(R1_ZERO_PROMPT, "<think>a</think><answer>5</answer> trailing") == 0.75
    assert format_reward_soft(R1_ZERO_PROMPT, "nothing") == 0.0
    assert format_reward_soft(CHAT_PROMPT, "a</think>") == 0.5
    assert format_reward_soft(R1_ZERO_PROMPT, "<answer>5</answer><think>a</think>") == 0.25  # reversed


# ------------------------------------------------------------------------------------------- language
def test_language_consistency():
    assert language_consistency_reward("", "<think>First add two and three.</think><answer>5</answer>") == 1.0
    mixed = "<think>我们 compute 二加三</think><answer>5</answer>"  # 我 们 二 加 三 + "compute"
    assert language_consistency_reward("", mixed) == pytest.approx(1 / 6)
    assert language_consistency_reward("", mixed, language="zh") == pytest.approx(5 / 6)
    assert language_consistency_reward("", "<think>Сначала сложим 2 и 3</think>", language="ru") == 1.0
    assert language_consistency_reward("", "<think>café au lait</think>", language="fr") == 1.0
    assert language_consistency_reward("", "<think>café au lait</think>", language="en") == pytest.approx(2 / 3)
    assert language_consistency_reward(CHAT_PROMPT, "two plus three</think><answer>5</answer>") == 1.0
    assert language_consistency_reward("", "<think>   2 + 3 = 5 </think><answer>5</answer>") == 0.0  # no words
    assert language_consistency_reward("", "<think></think><answer>five</answer>") == 0.0  # empty reasoning
    assert language_consistency_reward("", "<think>hello</think>", language="klingon") == 0.0
    assert REWARD_STATS.count("language", "error") == 1


# ------------------------------------------------------------------------------------------- length
def test_overlong_penalty():
    assert overlong_penalty(80, 100, 20) == 0.0
    assert overlong_penalty(90, 100, 20) == pytest.approx(-0.5)
    assert overlong_penalty(100, 100, 20) == pytest.approx(-1.0)
    assert overlong_penalty(101, 100, 20) == -1.0
    assert overlong_penalty(100, 100, 0) == 0.0 and overlong_penalty(101, 100, 0) == -1.0
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(10, 100, 200)
    with pytest.raises(ValueError, match="max_len"):
        overlong_penalty(10, 0, 0)


# ------------------------------------------------------------------------------------------- user rewards
USER_MODULE = '''
import math
def brevity(prompt, completion, **example):
    return 1.0 / (1 + len(completion))
def boom(prompt, completion, **example):
    raise RuntimeError("user bug")
def nan(prompt, completion, **example):
    return math.nan
def text(prompt, completion, **example):
    return "high"
def flag(prompt, completion, **example):
    return completion == "yes"
not_callable = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield path
    sys.modules.pop("my_rewards", None)


def test_load_reward_module_and_file_specs(user_module):
    assert load_reward("my_rewards:brevity")("", "abc") == pytest.approx(0.25)
    assert load_reward(f"{user_module}:brevity")("", "abc") == pytest.approx(0.25)
    assert load_reward("my_rewards:flag")("", "yes") == 1.0


def test_user_reward_errors_are_scored_zero_and_counted(user_module):
    for spec, kind in (("my_rewards:boom", "error"), ("my_rewards:nan", "non_finite"),
                       ("my_rewards:text", "error")):
        assert load_reward(spec)("", "x", answer="1") == 0.0
        assert REWARD_STATS.count(spec, kind) == 1
    metrics = REWARD_STATS.as_metrics()
    assert metrics["reward_stats/my_rewards:boom/error"] == 1.0


@pytest.mark.parametrize("spec", ["my_rewards", "my_rewards:missing", "my_rewards:not_callable",
                                  "no_such_module_xyz:f", "does/not/exist.py:f", ":f"])
def test_bad_reward_specs_raise_value_error_naming_the_spec(user_module, spec):
    with pytest.raises(ValueError, match="reward"):
        load_reward(spec)


def test_combine_rewards_weighted_sum_and_components(user_module):
    combined = combine_rewards({"format": 0.5, "format_soft": 1.0, "my_rewards:boom": 2.0})
    total, parts = combined(R1_ZERO_PROMPT, "<think>a</think> 5", answer="5")
    assert parts == {"format": 0.0, "format_soft": 0.5, "my_rewards:boom": 0.0}
    assert total == pytest.approx(0.5)
    both = combine_rewards(["format", ("language", 0.25)])
    total, parts = both(R1_ZERO_PROMPT, "<think>a b</think><answer>5</answer>")
    assert parts == {"format": 1.0, "language": 1.0} and total == pytest.approx(1.25)
    with pytest.raises(ValueError, match="unknown reward"):
        combine_rewards({"acuracy": 1.0})
    with pytest.raises(ValueError, match="weight"):
        combine_rewards({"format": float("nan")})
    with pytest.raises(ValueError, match="at least one"):
        combine_rewards({})


def test_examples_with_their_own_prompt_column(user_module):
    # synthetic/HF datasets carry "prompt" (and the rollout passes **example): no "multiple values" TypeError
    example = {"prompt": "the raw template", "completion": "stale", "answer": "5", "question": "2+3?"}
    done = "<think>two plus three</think><answer>5</answer>"
    combined = combine_rewards(["accuracy", "format", "language", "my_rewards:brevity"])
    total, parts = combined(R1_ZERO_PROMPT, done, **example)
    assert parts["accuracy"] == parts["format"] == parts["language"] == 1.0
    assert parts["my_rewards:brevity"] == pytest.approx(1 / (1 + len(done)))
    assert REWARD_STATS.count("my_rewards:brevity", "error") == 0


def test_registry_names_and_registration():
    assert {"accuracy", "format", "format_soft", "language"} <= set(REWARD_FUNCTIONS)
    assert get_reward("accuracy") is accuracy_reward
    try:
        flaky = register_reward("always_fails", lambda prompt, completion, **ex: 1 / 0)
        assert flaky("", "") == 0.0 and REWARD_STATS.count("always_fails", "error") == 1
        assert combine_rewards({"always_fails": 1.0})("", "") == (0.0, {"always_fails": 0.0})
    finally:
        REWARD_FUNCTIONS.pop("always_fails", None)
    with pytest.raises(ValueError, match="name"):
        register_reward("a:b", lambda *a, **k: 0.0)


def test_reward_stats_snapshot_and_reset(accuracy):
    accuracy("", "no answer here", answer="1")
    accuracy("", "<answer>1</answer>", answer="1")
    assert REWARD_STATS.snapshot()["accuracy_test"] == {"calls": 2, "unparsable": 1}
    REWARD_STATS.reset()
    assert REWARD_STATS.snapshot() == {}
    assert math.isfinite(format_reward("", "<think></think><answer>1</answer>"))
    assert Path(__file__).exists()
