"""RL examples: one reader and one generator serve GRPO, rejection sampling and distillation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1forge.data import make_problems
from r1forge.distill.config import DistillDataConfig
from r1forge.rl.examples import read_examples, reward_example, train_and_held_out
from r1forge.rl.config import GRPODataConfig


def test_generated_examples_hold_question_answer_and_no_prompt():
    p = make_problems(1, seed=0)[0]
    ex = reward_example(p)
    assert ex["question"] == p.question and ex["answer"] == p.answer
    assert "prompt" not in ex and "messages" not in ex


@pytest.mark.parametrize("config", [GRPODataConfig, DistillDataConfig])
def test_train_and_held_out_never_share_a_problem(config):
    cfg = config(synthetic_problems=200, synthetic_eval_problems=50, max_steps=2, max_operand=20)
    train, held_out = train_and_held_out(cfg, seed=3)
    assert len(train) == 200 and len(held_out) == 50
    assert not {e["question"] for e in train} & {e["question"] for e in held_out}
    assert train == train_and_held_out(cfg, seed=3)[0] != train_and_held_out(cfg, seed=4)[0]


def test_files_take_precedence_and_errors_name_file_and_line(tmp_path: Path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"question": "Compute 2 + 3.", "answer": 5, "kind": "sum"}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "Compute 4 * 4."}], "answer": "16"}) + "\n")
    train, held_out = train_and_held_out(GRPODataConfig(files=[str(good)], synthetic_eval_problems=5), seed=0)
    assert train == [{"question": "Compute 2 + 3.", "answer": "5", "kind": "sum"},
                     {"question": "Compute 4 * 4.", "answer": "16"}]
    assert len(held_out) == 5  # no eval_files: generated from the test split
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: no examples"):
        read_examples(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": 3, "answer": "3"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1:.*question"):
        train_and_held_out(GRPODataConfig(files=[str(good), str(bad)]), seed=0)
