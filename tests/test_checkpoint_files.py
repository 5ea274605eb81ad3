"""r1forge.checkpoint.files: finding the weight files (single file, index.json, shards without an index) and
reading their headers; truncated, corrupt or inconsistent files are errors that name the file.
"""

from __future__ import annotations

import json

import pytest
from safetensors.torch import save_file
from checkpoint_toys import ToyModel, assert_same_state, empty_like_model, write

from r1forge.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def test_index_naming_a_missing_file(tmp_path):
    tensors = ToyModel().state_dict()
    write(tmp_path, tensors, shards=[list(tensors)[:4], list(tensors)[4:]])
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"maps '.*' \(and \d+ other tensors\) to model-00002-of-00002."
                                              r"safetensors, but .*model-00002-of-00002.safetensors does not exist"):
        load_checkpoint(empty_like_model(), tmp_path)


def test_index_disagreeing_with_the_files(tmp_path):
    tensors = ToyModel().state_dict()
    write(tmp_path, tensors, shards=[list(tensors)[:4], list(tensors)[4:]])
    index_file = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="maps 'model.norm.weight' to model-00001-of-00002.safetensors, but it "
                                              "is stored in .*model-00002-of-00002.safetensors"):
        load_checkpoint(empty_like_model(), tmp_path)
    index_file.write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read checkpoint index .*model.safetensors.index.json"):
        load_checkpoint(empty_like_model(), tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.99, 20])
def test_truncated_file_names_the_file(tmp_path, keep):
    """Cut inside the data, at the very end, and inside the header."""
    save_checkpoint(ToyModel(), tmp_path)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=rf"cannot read {file}: .*truncated or corrupt"):
        load_checkpoint(empty_like_model(), tmp_path)


def test_corrupt_file_names_the_file(tmp_path):
    tensors = ToyModel().state_dict()
    write(tmp_path, tensors, shards=[list(tensors)[:4], list(tensors)[4:]])
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"\x00" * 8 + b"garbage" * 20)
    with pytest.raises(CheckpointError, match=r"cannot read .*model-00001-of-00002.safetensors"):
        load_checkpoint(empty_like_model(), tmp_path)


def test_no_weights(tmp_path):
    with pytest.raises(CheckpointError, match=r"no weights in .*expected model.safetensors"):
        load_checkpoint(empty_like_model(), tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="found pytorch_model.bin: pickle weights are not read"):
        load_checkpoint(empty_like_model(), tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(empty_like_model(), tmp_path / "nowhere")


def test_shards_without_index_and_duplicate_keys(tmp_path):
    source = ToyModel()
    tensors = source.state_dict()
    keys = list(tensors)
    save_file({k: tensors[k] for k in keys[:6]}, str(tmp_path / "part-a.safetensors"))
    save_file({k: tensors[k] for k in keys[5:]}, str(tmp_path / "part-b.safetensors"))
    with pytest.raises(CheckpointError, match=rf"'{keys[5]}' is stored twice: in .*part-a.safetensors and in "
                                              ".*part-b.safetensors"):
        load_checkpoint(empty_like_model(), tmp_path)
    save_file({k: tensors[k] for k in keys[6:]}, str(tmp_path / "part-b.safetensors"))
    loaded = empty_like_model()
    load_checkpoint(loaded, tmp_path)
    assert_same_state(source, loaded)
