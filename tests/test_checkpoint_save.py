"""r1forge.checkpoint.save and .atomic: shard sizes, what a save writes and keeps, file permissions, and saves that
fail or are killed halfway leaving the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file
from checkpoint_toys import ToyModel, assert_same_state, empty_like_model, snapshot

from r1forge.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from r1forge.checkpoint import atomic as atomic_mod
from r1forge.checkpoint import save as save_mod
from r1forge.checkpoint.save import parse_size


# ---------------------------------------------------------------------------------------------- save
def test_parse_size():
    assert parse_size(1234) == 1234
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("200kb") == 200_000
    assert parse_size("1.5MB") == 1_500_000
    assert parse_size("2GiB") == 2 * 2**30
    for bad in ("5 parsecs", "GB", 0, -3, True, 1.5):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)


def test_save_rejects_pickle_and_a_file_path(tmp_path):
    with pytest.raises(ValueError, match="safe_serialization=False"):
        save_checkpoint(ToyModel(), tmp_path, safe_serialization=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not a directory"):
        save_checkpoint(ToyModel(), tmp_path / "file")


def test_save_over_existing_checkpoint_replaces_weights_keeps_other_files(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ToyModel(seed=1), ckpt, max_shard_size=1000)
    assert (ckpt / "model.safetensors.index.json").exists()
    (ckpt / "tokenizer.json").write_text('{"tok": 1}')
    (ckpt / "assets").mkdir()
    (ckpt / "assets" / "figure.txt").write_text("kept")
    (ckpt / "adapter.safetensors").write_bytes(b"not ours")
    (ckpt / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "eos_token_id": [1, 7]}))
    ckpt.chmod(0o750)
    model = ToyModel(seed=2)
    save_checkpoint(model, ckpt)
    assert ckpt.stat().st_mode & 0o777 == 0o750
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["adapter.safetensors", "assets", "checksums.json", "config.json", "generation_config.json",
                     "model.safetensors", "tokenizer.json"]
    assert (ckpt / "tokenizer.json").read_text() == '{"tok": 1}'
    assert (ckpt / "assets" / "figure.txt").read_text() == "kept"
    assert json.loads((ckpt / "generation_config.json").read_text()) == {
        "temperature": 0.6, "eos_token_id": [1, 7], "bos_token_id": 0}
    loaded = empty_like_model()
    load_checkpoint(loaded, ckpt)
    assert_same_state(model, loaded)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_get_the_umask_permissions(tmp_path, umask):
    """Not tempfile's 0o600 (safetensors writes through one): a server under another account must read them."""
    ckpt = tmp_path / "ckpt"
    old = os.umask(umask)
    try:
        save_checkpoint(ToyModel(seed=1), ckpt)
        modes = {p.name: p.stat().st_mode & 0o777 for p in ckpt.iterdir()}
        save_checkpoint(ToyModel(seed=2), ckpt, max_shard_size=1000)  # sharded, over the existing checkpoint
        sharded = {p.name: p.stat().st_mode & 0o777 for p in ckpt.iterdir()}
    finally:
        os.umask(old)
    assert sorted(modes) == ["checksums.json", "config.json", "generation_config.json", "model.safetensors"]
    assert len(sharded) > 4 and "model.safetensors.index.json" in sharded
    for name, mode in {**modes, **sharded}.items():
        assert mode == 0o666 & ~umask, (name, oct(mode))
    if umask == 0o022:
        assert modes["model.safetensors"] & 0o044 == 0o044 and modes["config.json"] & 0o044 == 0o044
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_failed_save_leaves_old_checkpoint_intact(tmp_path, monkeypatch, exchange):
    ckpt = tmp_path / "ckpt"
    old_model = ToyModel(seed=1)
    save_checkpoint(old_model, ckpt, max_shard_size=1000)
    (ckpt / "tokenizer.json").write_text("{}")
    before = snapshot(ckpt)
    if not exchange:
        monkeypatch.setattr(atomic_mod, "exchange_directories", lambda a, b: False)
    calls = []

    def fail_on_third_shard(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(save_mod, "save_file", fail_on_third_shard)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(ToyModel(seed=2), ckpt, max_shard_size=1000)
    assert len(calls) == 3 and all(Path(c).parent != ckpt for c in calls)  # never written into the target itself
    assert snapshot(ckpt) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    monkeypatch.setattr(save_mod, "save_file", save_file)
    new_model = ToyModel(seed=2)
    save_checkpoint(new_model, ckpt)  # and the same path then takes a good save, by either swap
    loaded = empty_like_model()
    load_checkpoint(loaded, ckpt)
    assert_same_state(new_model, loaded)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failed_second_rename_restores_old_checkpoint(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ToyModel(seed=1), ckpt)
    before = snapshot(ckpt)
    monkeypatch.setattr(atomic_mod, "exchange_directories", lambda a, b: False)
    real_rename = os.rename

    def rename(src, dst):  # the staging -> target rename fails; moving the old checkpoint back works
        if Path(dst) == ckpt.resolve() and ".tmp-" in str(src):
            raise PermissionError(13, "denied")
        real_rename(src, dst)

    monkeypatch.setattr(atomic_mod.os, "rename", rename)
    with pytest.raises(PermissionError):
        save_checkpoint(ToyModel(seed=2), ckpt)
    monkeypatch.undo()
    assert snapshot(ckpt) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


KILL_SCRIPT = """
import os, sys
from safetensors.torch import save_file
sys.path.insert(0, {tests!r})
from checkpoint_toys import ToyModel
from r1forge.checkpoint import save as save_mod, save_checkpoint
calls = []
def dies(tensors, filename, metadata=None):
    calls.append(filename)
    save_file(tensors, filename, metadata=metadata)
    if len(calls) == 2:
        os._exit(17)  # a kill: no exception handler, no cleanup runs
save_mod.save_file = dies
save_checkpoint(ToyModel(seed=2), {path!r}, max_shard_size=1000)
"""


def test_killed_save_leaves_old_checkpoint_loadable(tmp_path):
    ckpt = tmp_path / "ckpt"
    old_model = ToyModel(seed=1)
    save_checkpoint(old_model, ckpt)
    before = snapshot(ckpt)
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), path=str(ckpt))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr
    assert snapshot(ckpt) == before
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "ckpt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".ckpt.tmp-")  # the partial save, beside the target
    loaded = empty_like_model()
    load_checkpoint(loaded, ckpt)
    assert_same_state(old_model, loaded)


def test_quantization_config_is_not_written_with_dequantised_weights(tmp_path):
    model = ToyModel(quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]}, other=1)
    save_checkpoint(model, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in written and written["other"] == 1
    assert "quantization_config" in model.config.extra  # the model's own config is not modified
