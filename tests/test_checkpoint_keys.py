"""r1forge.checkpoint.keys: the MTP rule (`model.mtp.{k}` <-> `model.layers.{N + k}`, the layer's copies of
embedding and head), MTP layers skipped or unexpected by rule, and their shape checks.
"""

from __future__ import annotations

import pytest
import torch
from checkpoint_toys import ToyModel, assert_same_state, empty_like_model, fp8_tensors, read_all, write

from r1forge.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


# ---------------------------------------------------------------------------------------------- MTP
def test_mtp_written_as_extra_layer_with_embedding_and_head_copies(tmp_path):
    model = ToyModel(layers=3, mtp=2)
    save_checkpoint(model, tmp_path)
    stored = read_all(tmp_path)
    assert not any(k.startswith("model.mtp.") for k in stored)
    for k, layer in enumerate((3, 4)):
        assert torch.equal(stored[f"model.layers.{layer}.eh_proj.weight"], model.model.mtp[k].eh_proj.weight)
        assert torch.equal(stored[f"model.layers.{layer}.shared_head.norm.weight"],
                           model.model.mtp[k].shared_head.norm.weight)
        assert torch.equal(stored[f"model.layers.{layer}.embed_tokens.weight"], model.model.embed_tokens.weight)
        assert torch.equal(stored[f"model.layers.{layer}.shared_head.head.weight"], model.lm_head.weight)
    assert "model.layers.5.eh_proj.weight" not in stored
    loaded = empty_like_model(layers=3, mtp=2)
    report = load_checkpoint(loaded, tmp_path)
    assert_same_state(model, loaded)
    assert sorted(report.duplicates) == sorted(f"model.layers.{i}.{s}" for i in (3, 4)
                                               for s in ("embed_tokens.weight", "shared_head.head.weight"))
    assert not report.skipped


@pytest.mark.parametrize("layers", [2, 3])
def test_mtp_in_checkpoint_but_not_built_is_skipped_by_rule(tmp_path, layers):
    """Which layer is MTP follows config.num_hidden_layers: layer 2 of a 2-layer model, layer 3 of a 3-layer one."""
    source = ToyModel(layers=layers, mtp=1)
    tensors = fp8_tensors(source, ["model.mtp.0.eh_proj.weight"])
    tensors = {k.replace("model.mtp.0.", f"model.layers.{layers}."): v for k, v in tensors.items()}
    tensors[f"model.layers.{layers}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    write(tmp_path, tensors)
    loaded = empty_like_model(layers=layers, declared_mtp=1)
    report = load_checkpoint(loaded, tmp_path)
    expected = {k for k in tensors if k.startswith(f"model.layers.{layers}.")}
    assert set(report.skipped) == expected and f"model.layers.{layers}.eh_proj.weight_scale_inv" in expected
    assert report.dequantized == 0 and not report.unexpected
    assert "skipped" in str(report)
    src = source.state_dict()
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, src[name]), name


def test_fewer_mtp_built_than_checkpoint_has(tmp_path):
    source = ToyModel(layers=2, mtp=2)
    save_checkpoint(source, tmp_path)
    loaded = empty_like_model(layers=2, mtp=1, declared_mtp=2)
    report = load_checkpoint(loaded, tmp_path)
    assert {k.split(".")[2] for k in report.skipped} == {"3"}
    assert torch.equal(loaded.model.mtp[0].eh_proj.weight, source.model.mtp[0].eh_proj.weight)
    assert all(torch.equal(t, source.state_dict()[n]) for n, t in loaded.state_dict().items())


def test_layer_past_the_declared_mtp_layers_is_unexpected(tmp_path):
    """A checkpoint with more decoder layers than its config says is a wrong config, not an MTP module to drop."""
    save_checkpoint(ToyModel(layers=3), tmp_path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(empty_like_model(layers=2), tmp_path)
    msg = str(e.value)
    assert msg.startswith("11 unexpected tensor(s)")
    assert "'model.layers.2.input_layernorm.weight' in model.safetensors" in msg
    assert msg.count("Layers from 2 on are past num_hidden_layers=2 + num_nextn_predict_layers=0") == 1


def test_mtp_duplicate_of_embedding_with_wrong_shape(tmp_path):
    tensors = ToyModel(layers=2, mtp=1).state_dict()
    tensors = {k.replace("model.mtp.0.", "model.layers.2."): v for k, v in tensors.items()}
    tensors["model.layers.2.embed_tokens.weight"] = torch.zeros(5, 8)
    write(tmp_path, tensors)
    with pytest.raises(CheckpointError, match=r"'model.layers.2.embed_tokens.weight' in .*model.safetensors: "
                                              r"checkpoint \(5, 8\) vs model \(16, 8\)"):
        load_checkpoint(empty_like_model(layers=2, mtp=1), tmp_path)
