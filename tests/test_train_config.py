"""Run configs: YAML + dotted overrides, type checks, errors that name the key, the shipped configs."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from pathlib import Path

import pytest

from r1forge.train import PretrainRunConfig, SFTRunConfig, load_run_config, save_run_config
from r1forge.train import config as config_module
from r1forge.commands.run import add_run_arguments, resolve_run_config

ROOT = Path(__file__).resolve().parents[1]


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "seed: 3\ntrain:\n  lr: 3e-4\n  steps: 10\nmodel:\n  overrides: {hidden_size: 32}\n")
    cfg = load_run_config(PretrainRunConfig, path, ["--train.lr", "1e-3", "--train.warmup_steps=5", "--log.tensorboard",
                                                    "false", "--data.files", "a.txt,b.txt",
                                                    "--model.overrides.num_hidden_layers", "3"])
    assert cfg.seed == 3 and cfg.train.steps == 10
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.warmup_steps == 5 and cfg.log.tensorboard is False
    assert cfg.data.files == ["a.txt", "b.txt"]
    assert cfg.model.overrides == {"hidden_size": 32, "num_hidden_layers": 3}
    assert cfg.train.batch_size == 16  # untouched default
    assert load_run_config(PretrainRunConfig, path, ["--model.init_from", "null"]).model.init_from is None


def test_yaml_float_without_dot_and_int_widening(tmp_path: Path) -> None:
    cfg = load_run_config(PretrainRunConfig, _yaml(tmp_path, "train: {lr: 1e-3, grad_clip: 2}\n"))
    assert cfg.train.lr == 1e-3 and cfg.train.grad_clip == 2.0 and isinstance(cfg.train.grad_clip, float)


@pytest.mark.parametrize("text, key", [
    ("train: {lrr: 0.1}\n", "train.lrr"),
    ("trian: {lr: 0.1}\n", "trian"),
    ("model: {overrides: {}, foo: 1}\n", "model.foo"),
])
def test_unknown_yaml_key_is_named(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ValueError, match=f"unknown config key '{key}'"):
        load_run_config(PretrainRunConfig, _yaml(tmp_path, text))


@pytest.mark.parametrize("override, message", [
    (["--train.lrr", "1"], "unknown config key 'train.lrr'; did you mean 'lr'"),
    (["--nope", "1"], "unknown config key 'nope'"),
    (["--train.steps", "ten"], "train.steps: expected an integer"),
    (["--train.bf16", "maybe"], "train.bf16: expected true or false"),
    (["--train.steps", "0"], "train.steps must be positive"),
    (["--train.min_lr_ratio", "2"], "train.min_lr_ratio must be in"),
    (["--train", "1"], "'train' is a section"),
    (["--train.lr.x", "1"], "has no field 'x'"),
    (["--train.lr"], "has no value"),
    (["train.lr", "1"], "expected --KEY VALUE"),
    (["--model.preset", "huge"], "model.preset: unknown preset 'huge'"),
])
def test_bad_overrides_are_named(override: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        load_run_config(PretrainRunConfig, None, override)


def test_bad_yaml_type_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data.files: expected a list"):
        load_run_config(PretrainRunConfig, _yaml(tmp_path, "data: {files: a.txt}\n"))
    with pytest.raises(ValueError, match="not found"):
        load_run_config(PretrainRunConfig, tmp_path / "missing.yaml")


def test_partial_section_keeps_the_run_kinds_defaults(tmp_path: Path) -> None:
    cfg = load_run_config(SFTRunConfig, _yaml(tmp_path, "train: {lr: 1.0e-4}\n"))
    assert cfg.train.lr == 1e-4
    assert cfg.train.steps == SFTRunConfig().train.steps != PretrainRunConfig().train.steps
    assert cfg.model.mtp is True and cfg.train.mtp_lambda == 0.1  # SFT keeps the MTP module trained


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_run_config(PretrainRunConfig, None, ["--train.lr", "5e-4", "--data.seq_len", "64"])
    save_run_config(cfg, tmp_path / "c.yaml")
    assert load_run_config(PretrainRunConfig, tmp_path / "c.yaml") == cfg


def test_every_field_has_a_default_and_a_comment() -> None:
    for cls in (config_module.ModelSection, config_module.TrainConfig, config_module.LogConfig,
                config_module.PretrainDataConfig, config_module.SFTDataConfig, PretrainRunConfig, SFTRunConfig):
        cls()  # every default works
        # a field is declared (with its comment) in the class or in a section it extends (ProblemSource)
        source = "\n".join(inspect.getsource(c) for c in cls.__mro__ if dataclasses.is_dataclass(c))
        for f in dataclasses.fields(cls):
            line = next(ln for ln in source.splitlines() if ln.strip().startswith(f"{f.name}:"))
            assert "  # " in line, f"{cls.__name__}.{f.name} has no comment"


@pytest.mark.parametrize("name, cls", [("pretrain_tiny.yaml", PretrainRunConfig), ("sft_tiny.yaml", SFTRunConfig)])
def test_shipped_configs_load(name: str, cls: type) -> None:
    cfg = load_run_config(cls, ROOT / "configs" / name)
    assert cfg.model.preset == "tiny-demo" if cfg.model.init_from is None else cfg.model.init_from.startswith("runs/")


def test_cli_flags_anywhere_after_the_config(capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser, "pretrain")
    path = str(ROOT / "configs" / "pretrain_tiny.yaml")
    cfg, resume = resolve_run_config(PretrainRunConfig, parser.parse_args([path, "--train.lr", "1e-4", "--resume"]))
    assert resume and cfg.train.lr == 1e-4
    cfg, resume = resolve_run_config(PretrainRunConfig, parser.parse_args(["--resume", path]))
    assert resume and cfg is not None
    cfg, _ = resolve_run_config(PretrainRunConfig, parser.parse_args([path, "--print-config", "--seed", "7"]))
    assert cfg is None and "seed: 7" in capsys.readouterr().out


def test_malformed_lines_stop_the_run_or_are_skipped_by_flag(tmp_path) -> None:
    import json

    from r1forge.data import load_tokenizer, make_pretrain_corpus, train_tokenizer
    from r1forge.data.jsonl import DataError
    from r1forge.train.config import PretrainDataConfig, SFTDataConfig
    from r1forge.train.data import pretrain_datasets, sft_datasets

    train_tokenizer(None, tmp_path / "tok", vocab_size=300, texts=make_pretrain_corpus(100, 0))
    tok = load_tokenizer(tmp_path / "tok")
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "one two three " * 20}) + "\n{not json\n" + json.dumps({"text": "four"}) + "\n")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n"
                    + json.dumps({"messages": "not a list"}) + "\n")
    with pytest.raises(DataError, match=r"text\.jsonl:2"):
        pretrain_datasets(PretrainDataConfig(files=[str(text)], eval_files=[str(text)], seq_len=16), tok, 0)
    train, _ = pretrain_datasets(PretrainDataConfig(files=[str(text)], eval_files=[str(text)], seq_len=16,
                                                    skip_malformed=True), tok, 0)
    assert train.num_skipped == 1 and len(train) > 0
    with pytest.raises(DataError, match=r"chat\.jsonl:2"):
        sft_datasets(SFTDataConfig(files=[str(chat)], eval_files=[str(chat)]), tok, 0)
    train, _ = sft_datasets(SFTDataConfig(files=[str(chat)], eval_files=[str(chat)], skip_malformed=True), tok, 0)
    assert train.num_skipped == 1 and len(train) == 1
