"""What the four run configs share: one problem-source section, one run prologue, the demo's stages = configs/."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from r1forge.config import ModelConfig
from r1forge.demo import stage_configs
from r1forge.demo.recipes import STAGE_FILES
from r1forge.distill.config import DistillRunConfig
from r1forge.rl.config import GRPORunConfig
from r1forge.rl.examples import train_and_held_out
from r1forge.train.config import PretrainRunConfig, ProblemSource, SFTRunConfig, load_run_config
from r1forge.train.prologue import resolve_device, start_run

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIGS = [PretrainRunConfig, SFTRunConfig, GRPORunConfig, DistillRunConfig]


@pytest.mark.parametrize("cls", RUN_CONFIGS)
def test_every_data_section_is_the_one_problem_source(cls: type) -> None:
    data = cls().data
    assert isinstance(data, ProblemSource)
    for f in dataclasses.fields(ProblemSource):  # declared once: the same field, with the same meaning
        assert next(g for g in dataclasses.fields(data) if g.name == f.name).type == f.type


@pytest.mark.parametrize("cls", RUN_CONFIGS)
@pytest.mark.parametrize("override, message", [
    (["--data.max_stepz", "2"], r"unknown config key 'data.max_stepz'; did you mean 'max_steps'"),
    (["--data.min_steps", "3", "--data.max_steps", "2"], r"data.min_steps/data.max_steps: need 1 <= min_steps"),
    (["--data.max_operand", "1"], r"data.max_operand must be in \[2, 999\], got 1"),
    (["--data.kinds", "word,riddle"], r"data.kinds must be a non-empty subset"),
    (["--data.synthetic_eval_problems", "0"], r"data.synthetic_eval_problems must be positive"),
])
def test_a_bad_problem_source_key_is_named_with_its_section(cls: type, override: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_run_config(cls, None, override)


def test_the_source_means_the_same_everywhere() -> None:
    """GRPO's prompts and SFT's conversations of one source are the same problems."""
    args = ["--data.max_steps", "2", "--data.max_operand", "12", "--data.kinds", "word,expression"]
    sft = load_run_config(SFTRunConfig, None, args).data
    grpo = load_run_config(GRPORunConfig, None, args + ["--data.synthetic_problems", "30"]).data
    train, _ = train_and_held_out(grpo, seed=1)
    assert [p.question for p in sft.problems(30, 1, "train")] == [ex["question"] for ex in train]
    assert {p.kind for p in sft.problems(200, 1, "test")} <= {"word", "expression"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("cls, key, override", [
    (PretrainRunConfig, "train.device", ["--train.device", "cuda:7"]),
    (GRPORunConfig, "device", ["--device", "cuda:7"]),
    (DistillRunConfig, "train.device", ["--train.device", "cuda:7"]),
])
def test_the_prologue_names_the_device_key_the_user_wrote(tmp_path: Path, cls: type, key: str,
                                                          override: list[str]) -> None:
    cfg = load_run_config(cls, None, ["--run_dir", str(tmp_path / "run")] + override)
    device = cfg.device if cls is GRPORunConfig else cfg.train.device
    with pytest.raises(ValueError, match=rf"^{key} is 'cuda:7' but CUDA is not available"):
        start_run(cfg, False, device=device, device_key=key)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(ValueError, match=r"^--device: "):
        resolve_device("tpu-ish", "--device")


def test_the_prologue_saves_the_config_and_refuses_to_overwrite(tmp_path: Path) -> None:
    cfg = load_run_config(PretrainRunConfig, None, ["--run_dir", str(tmp_path / "run"), "--train.device", "cpu"])
    start = start_run(cfg, False, device="cpu", device_key="train.device")
    assert start.checkpoint is None and start.device.type == "cpu"
    assert load_run_config(PretrainRunConfig, start.run_dir / "config.yaml") == cfg
    from r1forge.train.checkpointing import TRAINER_STATE_FILE, TRAINING_STATE_FILE

    step = start.run_dir / "checkpoints" / "step-1"
    step.mkdir(parents=True)
    (step / TRAINER_STATE_FILE).write_text("{}")
    (step / TRAINING_STATE_FILE).write_bytes(b"")
    with pytest.raises(ValueError, match="already has checkpoints .*--resume"):
        start_run(cfg, False, device="cpu", device_key="train.device")
    assert start_run(cfg, True, device="cpu", device_key="train.device").checkpoint == step
    assert (start.run_dir / "config.resumed.yaml").is_file()


def test_the_demos_stages_are_the_shipped_configs(tmp_path: Path) -> None:
    configs = stage_configs(tmp_path)
    assert set(configs) == set(STAGE_FILES)
    for stage, (name, cls) in STAGE_FILES.items():
        cfg = configs[stage]
        shipped = load_run_config(cls, ROOT / "configs" / name)
        ours, theirs = dataclasses.asdict(cfg), dataclasses.asdict(shipped)
        for d in (ours, theirs):  # what the demo adds: where the stages go, their chain, the CPU
            d.pop("run_dir"), d.pop("teacher", None)
            for section in ("model", "student"):
                if section in d:
                    d[section].pop("init_from")
            d.pop("device", None), d.get("train", {}).pop("device", None)
            d.get("data", {}).pop("tokenizer", None)
            if stage == "student_grpo":  # the RL-alone arm: evaluated only at the end, its CPU time set by the demo
                for key in ("eval_every", "eval_before", "plots"):
                    d["log"].pop(key)
        assert ours == theirs, stage
    pretrain, sft, grpo = configs["pretrain"], configs["sft"], configs["grpo"]
    assert pretrain.train.device == sft.train.device == grpo.device == "cpu"
    assert sft.model.init_from == str(tmp_path / "pretrain") and grpo.model.init_from == str(tmp_path / "sft")
    # the values behind `make demo`'s table (a change here changes the table)
    assert (pretrain.train.steps, pretrain.train.lr, pretrain.log.log_every, pretrain.log.eval_every,
            pretrain.log.eval_batches, pretrain.data.tagged_fraction) == (1200, 3e-3, 25, 500, 10, 0.1)
    assert (sft.train.steps, sft.train.warmup_steps, sft.log.eval_every, sft.log.eval_batches,
            sft.data.shown_steps_fraction) == (100, 10, 0, 5, 0.4)
    assert (grpo.grpo.steps, grpo.grpo.learning_rate, grpo.grpo.loss_type, grpo.grpo.temperature, grpo.rewards) == (
        50, 5e-5, "dapo", 0.7, {"accuracy": 1.0, "format": 0.25})
    assert (grpo.data.min_steps, grpo.data.max_steps, grpo.data.max_result) == (1, 4, 99)


def test_the_demo_model_is_the_named_preset() -> None:
    pretrain = stage_configs("out")["pretrain"]
    assert (pretrain.model.preset, pretrain.model.overrides) == ("tiny-demo", {})
    shape = ModelConfig.from_preset("tiny-demo")
    assert shape == ModelConfig.from_preset("tiny", hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                                            num_hidden_layers=4, num_attention_heads=4, q_lora_rank=64,
                                            kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
