"""The trainer's pieces: schedule, MTP targets, exact token mean under accumulation, activation checkpointing,
the NaN guard, atomic checkpoints and metrics truncation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from r1forge import ModelConfig, build_model
from r1forge.data import StatefulLoader
from r1forge.train import (
    CausalLMLoss, LogConfig, MetricsLogger, NonFiniteGuard, TrainConfig, Trainer, build_optimizer, build_scheduler,
    enable_activation_checkpointing, latest_checkpoint, list_checkpoints, load_training_checkpoint, mtp_labels,
    read_metrics, save_training_checkpoint, warmup_cosine,
)
from r1forge.train.loss import LossOutput

V = 64


def _model(seed: int = 0, mtp: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig.from_preset("tiny", vocab_size=V), with_mtp=mtp)


class _Rows:
    """Random rows with some ignored labels (like document boundaries / prompts)."""

    def __init__(self, n: int = 16, T: int = 12, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, V, (n, T + 1), generator=g)
        self.mask = torch.rand(n, T, generator=g) < 0.3

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.ids[i, 1:].masked_fill(self.mask[i], -100)
        return {"input_ids": self.ids[i, :-1], "labels": labels}


def _log(**kw: object) -> LogConfig:
    return LogConfig(**{"log_every": 1, "eval_every": 0, "save_every": 0, "progress": False, "tensorboard": False,
                        **kw})


def test_warmup_cosine() -> None:
    assert warmup_cosine(0, 4, 20) == 0.25 and warmup_cosine(3, 4, 20) == 1.0
    assert warmup_cosine(4, 4, 20) == 1.0
    assert math.isclose(warmup_cosine(19, 4, 20, 0.1), 0.1) and math.isclose(warmup_cosine(50, 4, 20, 0.1), 0.1)
    mid = warmup_cosine(4 + 15 // 2, 4, 20, 0.0)
    assert 0.45 < mid < 0.6
    model = _model()
    opt = build_optimizer(model, 1e-3, weight_decay=0.1)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.1, 0.0}
    assert all(p.ndim >= 2 for p in opt.param_groups[0]["params"])
    sched = build_scheduler(opt, 4, 20)
    assert opt.param_groups[0]["lr"] == pytest.approx(2.5e-4)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_mtp_labels_never_cross_an_ignored_target() -> None:
    labels = torch.tensor([[5, 6, -100, 8, 9, 10]])
    assert mtp_labels(labels, 1).tolist() == [[6, -100, -100, 9, 10]]
    assert mtp_labels(labels, 2).tolist() == [[-100, -100, -100, 10]]


def test_grad_accumulation_is_the_exact_token_mean() -> None:
    data = _Rows()
    batch = data.ids[:4]
    full = {"input_ids": batch[:, :-1], "labels": torch.stack([data[i]["labels"] for i in range(4)])}
    halves = [{k: v[:2] for k, v in full.items()}, {k: v[2:] for k, v in full.items()}]
    loss = CausalLMLoss(mtp_lambda=0.3)
    model = _model()
    out = loss(model, full, loss.normalizers(model, [full]))
    out.loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    norms = loss.normalizers(model, halves)
    parts = [loss(model, h, norms, 2) for h in halves]
    for p in parts:
        p.loss.backward()
    assert math.isclose(sum(p.metrics["loss"].item() for p in parts), out.metrics["loss"].item(), rel_tol=1e-5)
    assert "mtp_loss" in out.metrics
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, reference[name], rtol=1e-4, atol=1e-6, msg=name)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    data = _Rows()
    batch = {"input_ids": data.ids[:4, :-1], "labels": torch.stack([data[i]["labels"] for i in range(4)])}
    loss = CausalLMLoss(mtp_lambda=0.3)
    grads = []
    for checkpointing in (False, True):
        model = _model()
        if checkpointing:
            assert enable_activation_checkpointing(model) == 3  # 2 layers + the MTP module
        loss(model, batch, loss.normalizers(model, [batch])).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


class _NaNAt:
    """CausalLMLoss that returns NaN on the given (1-based) steps."""

    def __init__(self, bad_steps: set[int]) -> None:
        self.inner = CausalLMLoss(0.3)
        self.bad = bad_steps
        self.calls = 0

    def normalizers(self, model: torch.nn.Module, batches: list) -> dict:
        self.calls += 1
        return self.inner.normalizers(model, batches)

    def __call__(self, model: torch.nn.Module, batch: dict, norms: dict, n: int = 1) -> LossOutput:
        out = self.inner(model, batch, norms, n)
        if self.calls in self.bad:
            out.loss = out.loss * float("nan")
            out.metrics["loss"] = out.metrics["loss"] * float("nan")
        return out


def test_nan_step_is_skipped_and_logged(tmp_path: Path) -> None:
    model = _model()
    config = TrainConfig(steps=3, batch_size=4, warmup_steps=1, bias_update_gamma=0.01)
    trainer = Trainer(model, StatefulLoader(_Rows(), 4), config, _log(), tmp_path, loss=_NaNAt({2}))
    trainer.train_step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = trainer.train_step()
    assert not out.applied
    for key, value in model.state_dict().items():  # no update, no bias update
        assert torch.equal(value, before[key]), key
    assert trainer.train_step().applied
    trainer.step = 0
    result = Trainer(_model(), StatefulLoader(_Rows(), 4), config, _log(), tmp_path / "b", loss=_NaNAt({2})).fit()
    assert result.status == "completed"
    skipped = [r for r in read_metrics(tmp_path / "b") if r.get("event") == "skipped_step"]
    assert [r["step"] for r in skipped] == [2] and skipped[0]["loss"] is None
    assert [r["step"] for r in read_metrics(tmp_path / "b") if "loss" in r and not r.get("event")] == [1, 3]


def test_consecutive_nan_steps_stop_with_the_checkpoint_intact(tmp_path: Path) -> None:
    config = TrainConfig(steps=10, batch_size=4, warmup_steps=1, max_bad_steps=3)
    trainer = Trainer(_model(), StatefulLoader(_Rows(), 4), config, _log(save_every=2), tmp_path,
                      loss=_NaNAt({3, 4, 5, 6, 7}))
    result = trainer.fit()
    assert result.status == "diverged" and result.step == 5
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [2]
    weights = load_training_checkpoint(result.checkpoint, _model(1), restore_rng=False)
    assert weights["step"] == 2
    assert read_metrics(tmp_path)[-1]["event"] == "diverged"
    guard = NonFiniteGuard(2)
    assert guard.check(1.0) and not guard.check(math.inf) and not guard.should_stop
    assert not guard.check(1.0, math.nan) and guard.should_stop and guard.check(0.5) and guard.consecutive == 0


def test_a_failed_save_leaves_the_last_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    first = save_training_checkpoint(tmp_path, 1, model, extra={"x": 1})
    import r1forge.train.checkpointing as ck

    def boom(path: Path, state: dict) -> None:
        path.write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(ck, "_write_state", boom)
    with pytest.raises(OSError):
        save_training_checkpoint(tmp_path, 2, model)
    assert latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]
    (tmp_path / "step-00000009").mkdir()  # a directory without its state files is not a checkpoint
    assert latest_checkpoint(tmp_path) == first
    assert load_training_checkpoint(first, _model(3))["extra"] == {"x": 1}


def test_keep_last_prunes_old_checkpoints(tmp_path: Path) -> None:
    model = _model(mtp=False)
    for step in (1, 2, 3):
        save_training_checkpoint(tmp_path, step, model, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]


def test_metrics_resume_drops_records_past_the_checkpoint(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in range(1, 6):
            log.log(step, {"loss": float(step), "bad": math.nan})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # torn by a kill
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["bad"] is None
    with MetricsLogger(tmp_path, tensorboard=False, resume_step=3) as log:
        log.log(4, {"loss": 40.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
