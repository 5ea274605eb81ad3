"""Checkpoint integrity: checksums.json is written with every checkpoint, a flipped byte in any file of it is refused
on resume and on a full-verifying load (naming the file), sizes are checked on every load, and falling back to
an older intact checkpoint happens only when asked for (`--resume latest-intact`)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

import r1forge
from conftest import RandomRows
from r1forge import ModelConfig, build_model
from r1forge.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from r1forge.checkpoint.manifest import MANIFEST_FILE, VERIFY_ENV, read_manifest, verify_checkpoint, write_manifest
from r1forge.data import StatefulLoader, load_tokenizer, make_pretrain_corpus, train_tokenizer
from r1forge.train import (
    LogConfig, PretrainRunConfig, TrainConfig, Trainer, list_checkpoints, load_training_checkpoint,
    save_training_checkpoint,
)
from r1forge.commands.run import add_run_arguments, resolve_run_config
from r1forge.train.prologue import prepare_run_dir

ROOT = Path(__file__).resolve().parents[1]
V = 64


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig.from_preset("tiny", vocab_size=V, num_nextn_predict_layers=0))


def flip_byte(file: Path, at: float = 0.5) -> None:
    """XOR one byte in the middle of `file` (its size is unchanged: only the checksum can tell)."""
    data = bytearray(file.read_bytes())
    i = min(int(len(data) * at), len(data) - 1)
    data[i] ^= 0x01
    file.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training checkpoint with every kind of file: weights, configs, tokenizer, optimizer state, manifest."""
    out = tmp_path_factory.mktemp("integrity")
    train_tokenizer(None, out / "tok", vocab_size=300, texts=make_pretrain_corpus(100, 0))
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, V, (2, 8))).float().mean().backward()
    optimizer.step()
    return save_training_checkpoint(out / "checkpoints", 1, model, tokenizer=load_tokenizer(out / "tok"),
                                    optimizer=optimizer, extra={"loader": {"pos": 3}}, info={"kind": "test"})


def test_every_file_is_in_the_manifest(training_checkpoint: Path) -> None:
    manifest = read_manifest(training_checkpoint)
    files = sorted(p.name for p in training_checkpoint.iterdir() if p.name != MANIFEST_FILE)
    assert sorted(manifest["files"]) == files
    assert {"model.safetensors", "config.json", "generation_config.json", "training_state.pt", "trainer_state.json",
            "tokenizer.json"} <= set(files)
    assert json.loads((training_checkpoint / "trainer_state.json").read_text())["checksums"] == MANIFEST_FILE
    verify_checkpoint(training_checkpoint, "full")  # intact as written


def _every_file(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_file())


def test_a_flipped_byte_in_any_file_is_refused_by_resume_and_load(training_checkpoint: Path, tmp_path: Path) -> None:
    names = _every_file(training_checkpoint)
    assert MANIFEST_FILE in names and len(names) >= 7
    for name in names:
        damaged = tmp_path / name / training_checkpoint.name
        shutil.copytree(training_checkpoint, damaged)
        flip_byte(damaged / name)
        model = _model(1)
        with pytest.raises(CheckpointError, match=rf"{damaged / name}[\s\S]*latest-intact") as resume_error:
            load_training_checkpoint(damaged, model, torch.optim.AdamW(model.parameters()), restore_rng=False)
        assert "refusing to resume" in str(resume_error.value)
        with pytest.raises(CheckpointError, match=str(damaged / name)):
            r1forge.load_model(damaged, verify="full")
        if name == "model.safetensors":
            with pytest.raises(CheckpointError, match=str(damaged / name)):
                load_checkpoint(_model(1), damaged, verify="full")
    load_training_checkpoint(training_checkpoint, _model(1), restore_rng=False)  # the original still resumes


def test_sharded_weights_and_index_are_each_verified(tmp_path: Path) -> None:
    model = _model()
    save_checkpoint(model, tmp_path / "ckpt", max_shard_size=200_000)
    names = [n for n in _every_file(tmp_path / "ckpt") if n.endswith((".safetensors", ".index.json"))]
    assert len(names) >= 3 and "model.safetensors.index.json" in names
    for name in names:
        damaged = tmp_path / name / "ckpt"
        shutil.copytree(tmp_path / "ckpt", damaged)
        flip_byte(damaged / name, at=0.9)
        with pytest.raises(CheckpointError, match=str(damaged / name)):
            load_checkpoint(_model(1), damaged, verify="full")


def test_default_load_checks_sizes_and_full_hash_is_on_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "ckpt"
    save_checkpoint(_model(), ckpt)
    flip_byte(ckpt / "model.safetensors", at=0.99)  # inside the last tensor's data: headers still parse
    r1forge.load_model(ckpt)  # the default ("size") does not read the data twice
    with pytest.raises(CheckpointError, match=r"model.safetensors: sha256 .*\(damaged bytes\)"):
        r1forge.load_model(ckpt, verify="full")
    monkeypatch.setenv(VERIFY_ENV, "full")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        r1forge.load_model(ckpt)
    monkeypatch.setenv(VERIFY_ENV, "everything")
    with pytest.raises(ValueError, match=rf"\${VERIFY_ENV} must be one of"):
        r1forge.load_model(ckpt)
    monkeypatch.delenv(VERIFY_ENV)
    with (ckpt / "generation_config.json").open("a") as f:
        f.write(" ")  # one byte more: caught by the default size check, before any weight is read
    with pytest.raises(CheckpointError, match=r"generation_config.json: \d+ bytes, checksums.json says \d+"):
        r1forge.load_model(ckpt)


def test_without_a_manifest_hf_checkpoints_load_unverified(tmp_path: Path) -> None:
    model = _model()
    save_checkpoint(model, tmp_path / "hf")
    (tmp_path / "hf" / MANIFEST_FILE).unlink()  # as a Hugging Face download or transformers' save_pretrained
    loaded = r1forge.load_model(tmp_path / "hf", verify="full")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    write_manifest(tmp_path / "hf")  # `python -m r1forge.checkpoint.manifest DIR` re-seals a directory
    verify_checkpoint(tmp_path / "hf", "full")


def test_a_training_checkpoint_that_lost_its_manifest_is_refused(training_checkpoint: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    lost = tmp_path / "lost"
    shutil.copytree(training_checkpoint, lost)
    (lost / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{MANIFEST_FILE} is missing"):
        load_training_checkpoint(lost, _model(1), restore_rng=False)
    state = json.loads((lost / "trainer_state.json").read_text())
    del state["checksums"]  # a checkpoint of r1forge before checksums: resumed, with a note
    (lost / "trainer_state.json").write_text(json.dumps(state))
    assert load_training_checkpoint(lost, _model(1), restore_rng=False)["step"] == 1
    assert "resuming unverified" in capsys.readouterr().out


def _trainer(run_dir: Path, steps: int) -> Trainer:
    config = TrainConfig(steps=steps, batch_size=4, warmup_steps=1, bias_update_gamma=0.0)
    log = LogConfig(log_every=1, eval_every=0, save_every=1, keep_last=0, progress=False, tensorboard=False)
    return Trainer(_model(), StatefulLoader(RandomRows(V), 4), config, log, run_dir)


def test_resume_refuses_a_damaged_newest_checkpoint_and_falls_back_only_when_asked(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    _trainer(run_dir, steps=3).fit()
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    assert [s for s, _ in checkpoints] == [1, 2, 3]
    flip_byte(checkpoints[-1][1] / "training_state.pt")
    newest = prepare_run_dir(run_dir, resume=True)  # the default: the newest, whatever its state
    assert newest == checkpoints[-1][1]
    with pytest.raises(CheckpointError, match="training_state.pt: sha256"):
        _trainer(run_dir, steps=4).resume(newest)
    intact = prepare_run_dir(run_dir, resume="latest-intact")
    assert intact == checkpoints[1][1]
    assert "skipping checkpoint step 3, it is damaged" in capsys.readouterr().out
    trainer = _trainer(run_dir, steps=4)
    assert trainer.resume(intact) == 2
    flip_byte(checkpoints[0][1] / "model.safetensors")
    flip_byte(checkpoints[1][1] / "config.json")
    with pytest.raises(ValueError, match="every checkpoint .* is damaged"):
        prepare_run_dir(run_dir, resume="latest-intact")
    with pytest.raises(ValueError, match="resume must be"):
        prepare_run_dir(run_dir, resume="oldest")


def test_cli_resume_modes() -> None:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser, "pretrain")
    path = str(ROOT / "configs" / "pretrain_tiny.yaml")
    for argv, mode in [([path], False), ([path, "--resume"], "latest"), (["--resume", path], "latest"),
                       ([path, "--resume", "latest-intact", "--seed", "3"], "latest-intact"),
                       ([path, "--resume=latest-intact"], "latest-intact"),
                       (["--resume", "latest-intact", path, "--seed", "3"], "latest-intact")]:
        cfg, resume = resolve_run_config(PretrainRunConfig, parser.parse_args(argv))
        assert resume == mode and cfg is not None, argv
    with pytest.raises(ValueError, match="--resume: expected one of"):
        resolve_run_config(PretrainRunConfig, parser.parse_args([path, "--resume=oldest"]))
