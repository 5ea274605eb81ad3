"""Distillation: the dense student's config, the forward-KL loss against a hand computation, and end to end: a
student distilled from the tiny MoE teacher (SFT on its traces, or forward KL on its distributions) beats the same
student untrained on held-out problems, by far more than chance.

The teacher is test_rejection.py's (cached for the session): a copy task learned in a few hundred CPU steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from r1forge import ModelConfig, build_model
from r1forge.distill import (DistillRunConfig, ForwardKLLoss, build_student, dense_student_config, forward_kl,
                             run_distill)
from r1forge.model import DeepseekMoE
from r1forge.data.jsonl import write_jsonl
from r1forge.rl.rewards import accuracy_reward
from r1forge.train import load_run_config
from test_rejection import _one_thread, copy_examples, tiny_teacher  # noqa: F401 (autouse fixture)

STUDENT_STEPS = 180


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_teacher(tmp_path_factory.getbasetemp())


def test_dense_student_config_has_no_moe_layers() -> None:
    teacher = ModelConfig.from_preset("tiny", num_hidden_layers=3, vocab_size=300, pad_token_id=2)
    assert teacher.is_moe and teacher.num_nextn_predict_layers == 1
    student = dense_student_config(teacher)
    assert not student.is_moe and student.first_k_dense_replace == student.num_hidden_layers == 3
    assert not any(student.is_moe_layer(i) for i in range(3))
    assert student.num_nextn_predict_layers == 0
    for key in ("vocab_size", "hidden_size", "kv_lora_rank", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(student, key) == getattr(teacher, key), key
    model = build_student(student, seed=0)
    assert not any(isinstance(m, DeepseekMoE) for m in model.modules()) and model.num_mtp == 0
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in build_model(teacher).parameters())
    # Same seed, same student; a smaller one on request; the teacher's MoE layout kept when asked.
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), build_student(student, seed=0).parameters()))
    small = dense_student_config(teacher, num_hidden_layers=1, hidden_size=32, kv_lora_rank=16)
    assert (small.num_hidden_layers, small.hidden_size, small.kv_lora_rank, small.first_k_dense_replace) == (1, 32,
                                                                                                           16, 1)
    assert dense_student_config(teacher, dense=False).first_k_dense_replace == teacher.first_k_dense_replace
    with pytest.raises(ValueError, match="vocab_size"):
        dense_student_config(teacher, vocab_size=512)
    with pytest.raises(ValueError, match="hidden_sise"):
        dense_student_config(teacher, hidden_sise=32)
    with pytest.raises(ValueError, match="num_attention_heads"):
        dense_student_config(teacher, num_attention_heads=0)


def _softmax(row: list[float]) -> list[float]:
    z = sum(math.exp(x) for x in row)
    return [math.exp(x) / z for x in row]


def test_forward_kl_matches_a_hand_computation() -> None:
    # Position 0: p = (1/2, 1/4, 1/4), q = (1/4, 1/4, 1/2): KL = 1/2 ln 2 + 0 + 1/4 ln(1/2) = 1/4 ln 2.
    # Position 1: p uniform, q = (1/2, 1/4, 1/4): KL = 1/3 (ln(2/3) + 2 ln(4/3)) = 1/3 ln(32/27).
    # Position 2 differs wildly but is masked out (a prompt token).
    teacher = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.25)], [0.0, 0.0, 0.0], [9.0, -9.0, 0.0]])
    student = torch.tensor([[math.log(0.25), math.log(0.25), math.log(0.5)],
                            [math.log(0.5) + 3, math.log(0.25) + 3, math.log(0.25) + 3],  # shift-invariant
                            [-9.0, 9.0, 0.0]], requires_grad=True)
    mask = torch.tensor([True, True, False])
    expected = 0.25 * math.log(2) + math.log(32 / 27) / 3
    kl = forward_kl(teacher, student, mask)
    assert kl.item() == pytest.approx(expected, rel=1e-6)
    # d KL / d student logits = q - p at counted positions, 0 elsewhere.
    kl.backward()
    grad = torch.tensor([[0.25 - 0.5, 0.0, 0.5 - 0.25], [0.5 - 1 / 3, 0.25 - 1 / 3, 0.25 - 1 / 3], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(student.grad, grad)
    # Temperature: both softened by tau before the KL, computed by hand from the definition.
    t_rows, s_rows = teacher[:2].tolist(), student.detach()[:2].tolist()
    hand = 0.0
    for t_row, s_row in zip(t_rows, s_rows):
        p, q = _softmax([x / 2 for x in t_row]), _softmax([x / 2 for x in s_row])
        hand += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert forward_kl(teacher, student, mask, temperature=2.0).item() == pytest.approx(hand, rel=1e-6)
    assert forward_kl(teacher, teacher.clone()).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="same vocabulary"):
        forward_kl(teacher, student[:, :2])


def test_forward_kl_loss_is_the_token_mean_over_the_step() -> None:
    """Split into micro-batches, the step's loss (and gradient) is the same: a token mean over the whole step."""
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", vocab_size=64, num_nextn_predict_layers=0)
    teacher, student = build_model(config), build_student(dense_student_config(config), seed=1)
    loss = ForwardKLLoss(teacher, temperature=1.5, ce_weight=0.5)
    ids = torch.randint(0, 64, (4, 10))
    labels = torch.roll(ids, -1, 1)
    labels[:, :4] = -100  # prompt tokens
    labels[1, 4:7] = -100  # a shorter answer: micro-batches of unequal token counts
    full = {"input_ids": ids, "labels": labels}
    halves = [{"input_ids": ids[:1], "labels": labels[:1]}, {"input_ids": ids[1:], "labels": labels[1:]}]
    out = loss(student, full, loss.normalizers(student, [full]))
    norms = loss.normalizers(student, halves)
    assert norms["lm"] == int((labels != -100).sum())
    parts = [loss(student, b, norms, 2) for b in halves]
    assert sum(p.loss for p in parts).item() == pytest.approx(out.loss.item(), rel=1e-5)
    mask = labels != -100
    with torch.no_grad():
        t_logits, s_logits = teacher(ids)[mask], student(ids)[mask]
    by_hand = forward_kl(t_logits, s_logits, temperature=1.5) * 1.5**2 / mask.sum()
    assert out.metrics["kl"].item() == pytest.approx(by_hand.item(), rel=1e-5)
    ce = torch.nn.functional.cross_entropy(s_logits, labels[mask])
    assert out.metrics["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training


def _config(teacher_dir: Path, tmp_path: Path, *overrides: str) -> DistillRunConfig:
    prompts, held_out = tmp_path / "prompts.jsonl", tmp_path / "held_out.jsonl"
    write_jsonl(prompts, copy_examples(200, 3, held_out=False))
    write_jsonl(held_out, copy_examples(100, 1, held_out=True))
    return load_run_config(DistillRunConfig, None, [
        "--teacher", str(teacher_dir), "--run_dir", str(tmp_path / "run"), "--data.files", str(prompts),
        "--data.eval_files", str(held_out), "--data.samples_per_prompt", "1", "--data.temperature", "0",
        "--data.max_tokens", "32", "--data.max_len", "64", "--train.steps", str(STUDENT_STEPS), "--train.lr", "4e-3",
        "--train.warmup_steps", "10", "--train.device", "cpu", "--log.log_every", "50",
        "--log.save_every", "0", "--log.progress", "false", "--log.tensorboard", "false", *overrides])


@pytest.mark.parametrize("mode", ["sft", "kl"])
def test_distilled_student_beats_the_untrained_student(mode: str, teacher_dir: Path, tmp_path: Path) -> None:
    result = run_distill(_config(teacher_dir, tmp_path, "--mode", mode))
    assert result.status == "completed"
    before, after, teacher = result.student_before, result.student_after, result.teacher
    assert before is not None and before.num_problems == after.num_problems == 100
    # 100 held-out problems: a gap of 20 points is over 4 standard errors, not luck.
    assert after.accuracy >= before.accuracy + 0.2, (before.accuracy, after.accuracy, teacher.accuracy)
    assert after.accuracy - before.accuracy > 3 * math.hypot(before.stderr, after.stderr)
    assert teacher.accuracy >= 0.3  # a sanity check: the copy skill came from somewhere
    # The student is dense; the teacher is not.
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["student_params"]["moe_layers"] == 0 and report["student_after"]["accuracy"] == after.accuracy
    assert report["student_before"]["accuracy"] == before.accuracy and report["mode"] == mode
    assert report["teacher_params"]["moe_layers"] == 1
    assert report["student_params"]["total"] < report["teacher_params"]["total"]
    # The traces trained on are the teacher's correct samples only (rejection sampling).
    gold = {ex["question"]: ex["answer"] for ex in copy_examples(200, 3, held_out=False)}
    traces = [json.loads(line) for line in (tmp_path / "run" / "traces.jsonl").read_text().splitlines()]
    assert len(traces) == result.num_sequences == report["traces"]["kept"] > 0
    assert report["traces"]["kept"] <= report["traces"]["total"] == 200
    for record in traces:
        assert accuracy_reward("", record["messages"][1]["content"], answer=gold[record["messages"][0]["content"]]) == 1


def test_given_evaluations_replace_the_runs_own(teacher_dir: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo hands in the teacher's and the student base's evaluations it already made: they are reported as
    given and the run evaluates only the distilled student; a given evaluation of other problems is refused."""
    import r1forge.distill.run as distill_run
    from r1forge.rl.evaluate import EvalResult

    calls = []
    real = distill_run.evaluate_sharded
    monkeypatch.setattr(distill_run, "evaluate_sharded", lambda *a, **k: calls.append(1) or real(*a, **k))
    n = 100
    teacher = EvalResult(0.37, 1.0, 5.0, n, ["x"] * n, [True] * 37 + [False] * 63)
    before = EvalResult(0.01, 0.5, 9.0, n, ["y"] * n, [True] + [False] * 99)
    config = _config(teacher_dir, tmp_path, "--mode", "sft", "--train.steps", "2")
    result = run_distill(config, teacher_eval=teacher, student_before=before)
    assert result.teacher is teacher and result.student_before is before and len(calls) == 1
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["teacher"]["accuracy"] == 0.37 and report["student_before"]["accuracy"] == 0.01
    short = EvalResult(0.5, 1.0, 5.0, 10, ["x"] * 10, [True] * 5 + [False] * 5)
    with pytest.raises(ValueError, match="teacher_eval: an evaluation of 10 problems.*holds out 100"):
        run_distill(_config(teacher_dir, tmp_path / "again", "--mode", "sft"), teacher_eval=short)


def test_distill_config_errors(teacher_dir: Path, tmp_path: Path) -> None:
    from r1forge.cli import main

    with pytest.raises(ValueError, match="mode must be one of"):
        load_run_config(DistillRunConfig, None, ["--mode", "reverse_kl"])
    with pytest.raises(ValueError, match="r1forge sft"):
        load_run_config(DistillRunConfig, None, ["--data.sequences", "dataset"])
    with pytest.raises(ValueError, match="student.hidden_size"):
        load_run_config(DistillRunConfig, None, ["--student.hidden_size", "0"])
    with pytest.raises(ValueError, match="teacher: required"):
        run_distill(load_run_config(DistillRunConfig, None, ["--run_dir", str(tmp_path / "a")]))
    no_tokenizer = tmp_path / "bare"
    build_model(ModelConfig.from_preset("tiny", vocab_size=64)).save_pretrained(no_tokenizer)
    with pytest.raises(ValueError, match="tokenizer.json"):
        run_distill(load_run_config(DistillRunConfig, None, ["--teacher", str(no_tokenizer), "--run_dir",
                                                             str(tmp_path / "b")]))
    config = Path(__file__).resolve().parents[1] / "configs" / "distill_tiny.yaml"
    assert main(["distill", str(config), "--print-config"]) == 0
    assert main(["distill", str(config), "--teacher", str(tmp_path / "missing"), "--run_dir",
                 str(tmp_path / "c")]) == 2
    assert main(["distill", str(config), "--kl.temperature", "0"]) == 2
