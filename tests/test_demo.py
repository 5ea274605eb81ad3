"""`make demo`'s pipeline at toy scale: every stage runs, the report has its numbers, a rerun skips finished stages
(structure and caching, not the accuracy numbers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from r1forge.demo import run_demo, stage_configs
from r1forge.demo.report import difficulty_rows, hard_problem_summary, paired_gain

QUIET = ["--log.progress", "false", "--log.tensorboard", "false"]
GRPO_TOY = ["--grpo.steps", "2", "--grpo.prompts_per_step", "2", "--grpo.num_generations", "2",
            "--grpo.max_completion_length", "16", "--data.synthetic_problems", "20",
            "--data.synthetic_eval_problems", "12", "--log.eval_problems", "12", "--log.save_every", "0", *QUIET]
TOY = {
    "pretrain": ["--train.steps", "20", "--data.synthetic_docs", "200", "--data.vocab_size", "320",
                 "--model.overrides", "{}", "--model.preset", "tiny", "--log.eval_every", "0", "--log.save_every", "0",
                 *QUIET],
    "sft": ["--train.steps", "4", "--data.synthetic_problems", "40", *QUIET],
    "grpo": [*GRPO_TOY, "--log.eval_every", "1"],
    "student_base": ["--train.steps", "6", "--data.synthetic_docs", "100", *QUIET],
    # a toy teacher never ends a sample (no trace survives rejection sampling): distil its distributions on the
    # reference solutions instead, through the same stage
    "distill": ["--mode", "kl", "--data.sequences", "dataset", "--train.steps", "3", "--train.batch_size", "2",
                "--data.synthetic_problems", "8", "--data.max_tokens", "16", "--data.synthetic_eval_problems", "12",
                *QUIET],
    "student_sft": ["--train.steps", "2", "--data.synthetic_problems", "20", *QUIET],
    "student_grpo": GRPO_TOY,
    "r1_zero": GRPO_TOY,
}


def test_demo_pipeline_runs_and_caches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = run_demo(tmp_path / "demo", overrides=TOY, pass_at_k_problems=4)
    out = capsys.readouterr().out
    for stage in ("pretrain", "sft", "grpo", "student-base", "distill", "student-sft", "student-grpo"):
        assert (tmp_path / "demo" / stage / "DONE.json").is_file(), stage
    for key in ("accuracy", "format_rate", "response_length", "pass@1", "pass@8", "problems"):
        assert key in summary["before"] and key in summary["after"]
    assert summary["before"]["problems"] == 12
    assert 0.0 <= summary["before"]["pass@1"] <= summary["before"]["pass@8"] <= 1.0
    assert "held-out accuracy (greedy)" in out and "per number of solution steps" in out
    # one sample trace per difficulty present among the held-out problems, the first of each
    levels = sorted(summary["by_steps"]["after"])
    assert [s["steps"] for s in summary["samples"]] == sorted({s["steps"] for s in summary["samples"]})
    assert {s["steps"] for s in summary["samples"]} == set(levels)
    assert sum(row["problems"] for row in summary["by_steps"]["after"].values()) == 12
    assert all(Path(p).is_file() for p in summary["plots"]) and summary["plots"]
    assert any(p.endswith("reasoning.png") for p in summary["plots"])  # held-out accuracy + length over steps
    evals = [json.loads(line) for line in (tmp_path / "demo" / "grpo" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert [e["step"] for e in evals] == [0, 1, 2]  # before, every step (eval_every 1), after
    assert any(k.startswith("eval/steps_") for k in evals[-1])
    distill = summary["distillation"]
    for arm in ("teacher", "student_base", "distilled", "rl_alone"):
        assert distill[arm]["problems"] == 12
    assert distill["distill_seconds"] > 0 and distill["rl_seconds"] > 0
    assert "distillation - RL alone" in out and "dense qwen2" in out
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["gain"] == summary["gain"]

    again = run_demo(tmp_path / "demo", overrides=TOY, pass_at_k_problems=4)
    out = capsys.readouterr().out
    # pretrain, student base + its evaluation, sft, both evaluations, grpo, distill, student sft, student grpo
    assert out.count("cached:") == 10
    assert again["before"] == summary["before"] and again["after"] == summary["after"]
    assert again["distillation"] == summary["distillation"]
    assert again["timings"] == {}


def test_demo_r1_zero_recipe_shares_the_base_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = run_demo(tmp_path / "demo", recipe="r1-zero", overrides=TOY, pass_at_k_problems=4)
    out = capsys.readouterr().out
    assert summary["recipe"] == "r1-zero" and summary["before"]["problems"] == 12
    assert (tmp_path / "demo" / "r1-zero" / "grpo" / "DONE.json").is_file()
    assert not (tmp_path / "demo" / "sft").exists()  # no cold start in R1-Zero
    assert "base" in out and "RL gain" in out
    resolved = yaml.safe_load((tmp_path / "demo" / "r1-zero" / "grpo" / "config.yaml").read_text())
    assert resolved["grpo"]["template"] == "r1-zero"
    assert resolved["model"]["init_from"] == str(tmp_path / "demo" / "pretrain")
    assert (tmp_path / "demo" / "r1-zero" / "summary.json").is_file()


def test_stage_configs_chain_the_stages(tmp_path: Path) -> None:
    configs = stage_configs(tmp_path)
    assert configs["sft"].model.init_from == str(tmp_path / "pretrain")
    assert configs["grpo"].model.init_from == str(tmp_path / "sft")
    assert configs["distill"].teacher == str(tmp_path / "grpo")
    assert configs["distill"].student.init_from == str(tmp_path / "student-base")
    assert configs["student_base"].data.tokenizer == str(tmp_path / "pretrain" / "tokenizer")
    assert configs["r1_zero"].grpo.template == "r1-zero"
    assert configs["r1_zero"].model.init_from == str(tmp_path / "pretrain")
    # the cold start shows the steps only part of the time; every stage sees the same difficulty range
    assert 0 < configs["sft"].data.shown_steps_fraction < 1
    ranges = {(c.data.min_steps, c.data.max_steps) for c in configs.values()}
    assert len(ranges) == 1
    with pytest.raises(ValueError, match="unknown stage"):
        stage_configs(tmp_path, {"nope": []})


def test_report_helpers() -> None:
    gain, se, z = paired_gain([True, True, False, True], [False, True, False, False])
    assert gain == pytest.approx(0.5) and se > 0 and z == pytest.approx(gain / se)
    with pytest.raises(ValueError):
        paired_gain([True], [True, False])
    examples = [{"steps": 1}, {"steps": 3}, {"steps": 3}, {"steps": 4}]
    before = {"correct": [True, False, False, False], "lengths": [5, 4, 6, 5]}
    after = {"correct": [True, True, False, True], "lengths": [5, 10, 12, 20]}
    rows = difficulty_rows(after, examples)
    assert rows[3] == {"problems": 2, "accuracy": 0.5, "length": 11.0}
    hard = hard_problem_summary(before, after, examples)
    assert hard["problems"] == 3 and hard["length_before"] == 5.0 and hard["length_after"] == 14.0
    assert hard["accuracy_before"] == 0.0 and hard["accuracy_after"] == pytest.approx(2 / 3)
