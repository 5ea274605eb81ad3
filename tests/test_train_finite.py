"""Non-finite training is never "completed": config values are finite and typed (one-line errors naming the
key), a run ending in a non-finite streak is "diverged" with the steps named and exits non-zero, and a config
that would allocate a model the device cannot hold is refused with the byte count."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import r1forge
from conftest import RandomRows, save_tiny_policy
from r1forge import ModelConfig, build_model
from r1forge.accounting import check_model_fits
from r1forge.cli import main
from r1forge.data import StatefulLoader, load_tokenizer, make_pretrain_corpus, train_tokenizer
from r1forge.distill.config import DistillRunConfig
from r1forge.rl.config import GRPORunConfig
from r1forge.train import (
    CausalLMLoss, LogConfig, PretrainRunConfig, SFTRunConfig, TrainConfig, Trainer, list_checkpoints,
    load_run_config, read_metrics,
)
from r1forge.train.config import ModelSection
from r1forge.train.loss import LossOutput
from r1forge.train.run import build_run_model

ROOT = Path(__file__).resolve().parents[1]
V = 64


# ---------------------------------------------------------------------------------------------- config values
@pytest.mark.parametrize("cls, key, value, message", [
    (PretrainRunConfig, "train.lr", "nan", "train.lr must be finite, got nan"),
    (PretrainRunConfig, "train.lr", "inf", "train.lr must be finite, got inf"),
    (PretrainRunConfig, "train.eps", "-inf", "train.eps must be finite"),
    (PretrainRunConfig, "train.grad_clip", ".nan", "train.grad_clip must be finite"),
    (PretrainRunConfig, "train.beta2", "nan", "train.beta2 must be finite"),
    (PretrainRunConfig, "train.min_lr_ratio", "inf", "train.min_lr_ratio must be finite"),
    (PretrainRunConfig, "train.mtp_lambda", "nan", "train.mtp_lambda must be finite"),
    (PretrainRunConfig, "train.lr", "fast", "train.lr: expected a number, got 'fast'"),
    (PretrainRunConfig, "train.lr", "null", "train.lr: expected a number, got None"),
    (PretrainRunConfig, "data.eval_fraction", "nan", "data.eval_fraction must be finite"),
    (SFTRunConfig, "train.weight_decay", "inf", "train.weight_decay must be finite"),
    (GRPORunConfig, "grpo.learning_rate", "inf", "grpo.learning_rate must be finite"),
    (GRPORunConfig, "grpo.max_grad_norm", "nan", "grpo.max_grad_norm must be finite"),
    (GRPORunConfig, "grpo.beta", "nan", "grpo.beta must be finite"),
    (GRPORunConfig, "grpo.reward_timeout_s", "0", "grpo.reward_timeout_s must be > 0"),
    (DistillRunConfig, "kl.temperature", "inf", "kl.temperature must be finite"),
    (DistillRunConfig, "train.lr", "nan", "train.lr must be finite"),
])
def test_non_finite_and_mistyped_run_config_values_are_named(cls: type, key: str, value: str, message: str,
                                                             tmp_path: Path) -> None:
    with pytest.raises(ValueError) as override:
        load_run_config(cls, None, [f"--{key}", value])
    assert message in str(override.value) and "\n" not in str(override.value)
    section, field = key.split(".")
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"{section}:\n  {field}: {value}\n")
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):  # the same value from YAML
        load_run_config(cls, yaml_file)


def test_validate_checks_types_before_comparing() -> None:
    for value in ("3e-4", None, [1e-3], True):
        with pytest.raises(ValueError, match=r"^train\.lr must be a number, got "):
            TrainConfig(lr=value).validate()


@pytest.mark.parametrize("key, value, message", [
    ("rms_norm_eps", -1.0, "must be a finite positive number, got -1.0"),
    ("rms_norm_eps", 0.0, "must be a finite positive number"),
    ("rms_norm_eps", math.nan, "must be a finite positive number, got nan"),
    ("rms_norm_eps", "1e-6", "must be a finite positive number, got '1e-6'"),
    ("rope_theta", math.inf, "must be a finite positive number, got inf"),
    ("max_position_embeddings", 0, "must be a positive integer, got 0"),
    ("max_position_embeddings", None, "must be a positive integer, got None"),
    ("hidden_size", "64", "must be a positive integer, got '64'"),
    ("intermediate_size", -5, "must be a positive integer"),
    ("moe_intermediate_size", 0, "must be a positive integer"),
    ("vocab_size", 64.5, "must be a positive integer"),
    ("num_hidden_layers", True, "must be a positive integer"),
    ("first_k_dense_replace", "1", "must be a non-negative integer, got '1'"),
    ("qk_nope_head_dim", None, "must be a non-negative integer"),
    ("num_nextn_predict_layers", -1, "must be a non-negative integer"),
    ("n_group", "2", "must be null or a positive integer"),
    ("num_experts_per_tok", 2.0, "must be null or a non-negative integer"),
    ("routed_scaling_factor", math.nan, "must be a finite positive number"),
    ("initializer_range", -0.02, "must be a finite non-negative number"),
    ("tie_word_embeddings", "false", "must be true or false"),
    ("scoring_func", None, "must be a string"),
    ("eos_token_id", "1", "must be null or an integer token id"),
    ("rope_scaling", "yarn", "must be null or a mapping"),
    ("rope_scaling", {"type": "yarn", "factor": math.nan, "original_max_position_embeddings": 4096},
     "rope_scaling.factor`: must be a finite number"),
])
def test_model_config_values_give_one_line_errors_naming_the_key(key: str, value: object, message: str) -> None:
    with pytest.raises(ValueError) as error:  # never a TypeError from a comparison
        ModelConfig.from_preset("tiny", **{key: value})
    text = str(error.value)
    assert f"`{key.split('.')[0]}" in text and message in text and "\n" not in text, text
    raw = ModelConfig.from_preset("tiny").to_dict()
    raw[key] = value
    with pytest.raises(ValueError, match=key):  # as read from a config.json
        ModelConfig.from_dict(raw)


def test_model_overrides_in_a_run_config_are_checked(tmp_path: Path) -> None:
    cfg = load_run_config(PretrainRunConfig, None, ["--model.overrides.rms_norm_eps", "-1"])
    with pytest.raises(ValueError, match="invalid `rms_norm_eps`: must be a finite positive number, got -1"):
        ModelConfig.from_preset(cfg.model.preset, **cfg.model.overrides)


# ---------------------------------------------------------------------------------------------- absurd models
def test_empty_config_json_is_refused_with_the_byte_count(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")  # every key at DeepSeek-V3's defaults: 671B parameters
    with pytest.raises(ValueError) as error:
        r1forge.load_model(tmp_path)
    text = str(error.value)
    need = 671_026_404_352 * 4  # count_parameters(ModelConfig())[0] float32 bytes
    assert f"needs {need:,} bytes" in text and "671.03B parameters in float32" in text, text
    assert "available; refusing" in text and "empty config.json" in text


def test_training_an_absurd_preset_counts_the_optimizer_state(tmp_path: Path) -> None:
    train_tokenizer(None, tmp_path / "tok", vocab_size=300, texts=make_pretrain_corpus(50, 0))
    with pytest.raises(ValueError, match=r"training model\.preset 'deepseek-v3' .* needs [\d,]+ bytes .*x 4 copies"):
        build_run_model(ModelSection(preset="deepseek-v3", mtp=False), load_tokenizer(tmp_path / "tok"),
                        torch.device("cpu"))
    small = ModelConfig.from_preset("tiny")
    assert check_model_fits(small, "cpu") == sum(p.numel() for p in build_model(small).parameters()) * 4
    assert check_model_fits(ModelConfig(), "meta") > 0  # a device whose free memory is unknown is not refused


# ---------------------------------------------------------------------------------------------- non-finite runs
class _NaNFrom:
    """CausalLMLoss whose loss is NaN from optimizer step `first` (1-based) on."""

    def __init__(self, first: int) -> None:
        self.inner, self.first, self.calls = CausalLMLoss(0.0), first, 0

    def normalizers(self, model: torch.nn.Module, batches: list) -> dict:
        self.calls += 1
        return self.inner.normalizers(model, batches)

    def __call__(self, model: torch.nn.Module, batch: dict, norms: dict, n: int = 1) -> LossOutput:
        out = self.inner(model, batch, norms, n)
        if self.calls >= self.first:
            out.loss = out.loss * math.nan
            out.metrics["loss"] = out.metrics["loss"] * math.nan
        return out


def test_a_run_ending_in_a_short_non_finite_streak_is_diverged(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("tiny", vocab_size=V, num_nextn_predict_layers=0))
    config = TrainConfig(steps=4, batch_size=2, warmup_steps=1, max_bad_steps=10)  # the guard never stops it
    log = LogConfig(log_every=1, eval_every=0, save_every=2, progress=False, tensorboard=False)
    result = Trainer(model, StatefulLoader(RandomRows(V, T=8), 2), config, log, tmp_path, loss=_NaNFrom(3)).fit()
    assert result.status == "diverged" and result.step == 4
    assert "steps 3-4 (2 in a row) were non-finite (last: loss=nan)" in result.reason
    assert "the newest checkpoint is step-00000002" in result.reason
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [2]  # none from the streak
    last = read_metrics(tmp_path)[-1]
    assert last["event"] == "diverged" and last["first_bad_step"] == 3 and "steps 3-4" in last["reason"]


def test_cli_run_that_ends_non_finite_exits_non_zero_naming_the_steps(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """lr = 1e30 is finite (so allowed) and blows the weights up after the first update: every later step's
    gradient is NaN, two steps short of max_bad_steps. That run used to print "completed" and exit 0."""
    train_tokenizer(None, tmp_path / "tok", vocab_size=300, texts=make_pretrain_corpus(100, 0))
    code = main(["pretrain", str(ROOT / "configs" / "pretrain_tiny.yaml"), "--run_dir", str(tmp_path / "run"),
                 "--data.tokenizer", str(tmp_path / "tok"), "--data.synthetic_docs", "40", "--data.seq_len", "16",
                 "--data.synthetic_eval_problems", "4", "--train.steps", "3", "--train.batch_size", "2",
                 "--train.warmup_steps", "1", "--train.lr", "1e30", "--train.max_bad_steps", "4",
                 "--log.progress", "false", "--log.tensorboard", "false", "--log.eval_batches", "1"])
    out = capsys.readouterr().out
    assert code == 3, out
    assert "pretrain diverged at step 3 (steps 2-3 (2 in a row) were non-finite" in out and "completed" not in out
    assert not list_checkpoints(tmp_path / "run" / "checkpoints")


def test_grpo_run_ending_in_non_finite_steps_is_diverged_and_saves_nothing_from_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import r1forge.rl.trainer as grpo_trainer
    from r1forge.rl.run import run_grpo

    real_loss, calls = grpo_trainer.grpo_loss, []

    def nan_after_first_step(*args: object, **kwargs: object) -> tuple:
        loss, info = real_loss(*args, **kwargs)
        calls.append(1)
        return (loss * math.nan if len(calls) > 1 else loss), info  # one micro-batch per step here

    monkeypatch.setattr(grpo_trainer, "grpo_loss", nan_after_first_step)
    init = save_tiny_policy(tmp_path / "init")
    cfg = load_run_config(GRPORunConfig, None, [
        "--run_dir", str(tmp_path / "run"), "--model.init_from", str(init), "--grpo.steps", "3",
        "--grpo.prompts_per_step", "2", "--grpo.num_generations", "2", "--grpo.max_completion_length", "4",
        "--log.save_every", "1", "--data.synthetic_problems", "10", "--log.eval_problems", "0",
        "--log.tensorboard", "false", "--log.progress", "false", "--log.plots", "false", "--device", "cpu",
        "--rewards", "{format: 1.0}"])
    result = run_grpo(cfg)
    assert result.status == "diverged" and result.step == 3
    assert "steps 2-3 (2 in a row) were non-finite (last: loss=nan, grad_norm=nan)" in result.reason
    assert [s for s, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [1]
    assert read_metrics(tmp_path / "run")[-1]["event"] == "diverged"
