"""`make demo`'s pipeline at toy scale: every stage runs, the report has its numbers, a rerun skips finished stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1forge.demo import run_demo

TOY = {
    "pretrain": ["--train.steps", "20", "--data.synthetic_docs", "200", "--data.vocab_size", "320",
                 "--model.overrides", "{}", "--model.preset", "tiny", "--log.eval_every", "0", "--log.save_every", "0",
                 "--log.progress", "false", "--log.tensorboard", "false"],
    "sft": ["--train.steps", "4", "--data.synthetic_problems", "40", "--log.progress", "false",
            "--log.tensorboard", "false"],
    "grpo": ["--grpo.steps", "2", "--grpo.prompts_per_step", "2", "--grpo.num_generations", "2",
             "--grpo.max_completion_length", "16", "--data.synthetic_problems", "20",
             "--data.synthetic_eval_problems", "12", "--log.eval_problems", "12", "--log.save_every", "0",
             "--log.progress", "false", "--log.tensorboard", "false"],
}


def test_demo_pipeline_runs_and_caches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = run_demo(tmp_path / "demo", overrides=TOY, pass_at_k_problems=4)
    out = capsys.readouterr().out
    for stage in ("pretrain", "sft", "grpo"):
        assert (tmp_path / "demo" / stage / "DONE.json").is_file()
    for key in ("accuracy", "format_rate", "response_length", "pass@1", "pass@8", "problems"):
        assert key in summary["before"] and key in summary["after"]
    assert summary["before"]["problems"] == 12
    assert 0.0 <= summary["before"]["pass@1"] <= summary["before"]["pass@8"] <= 1.0
    assert "held-out accuracy (greedy)" in out and "sample reasoning trace" in out
    assert all(Path(p).is_file() for p in summary["plots"]) and summary["plots"]
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["gain"] == summary["gain"]

    again = run_demo(tmp_path / "demo", overrides=TOY, pass_at_k_problems=4)
    out = capsys.readouterr().out
    assert out.count("cached:") == 5  # three training stages and both evaluations
    assert again["before"] == summary["before"] and again["after"] == summary["after"]
    assert again["timings"] == {}
