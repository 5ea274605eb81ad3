"""r1forge.checkpoint.load: round trips in the Hugging Face / DeepSeek layout (bit exact, sharded, dtype casts,
tied embeddings), the loader's errors (missing, unexpected, shape mismatches naming the key, the file and both
shapes), and the real tiny DeepSeek model saved and loaded with and without MTP and from FP8.

Most tests use `ToyModel` (tests/checkpoint_toys.py), a few-kilobyte nn.Module with DeepSeek's key names, so
they depend on the checkpoint code alone; the last ones round-trip the real tiny DeepSeek model.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from torch import nn
from checkpoint_toys import ToyModel, assert_same_state, empty_like_model, file_keys, read_all, write

from r1forge.checkpoint import (
    CheckpointError,
    LoadReport,
    dequantize_fp8_blockwise,
    load_checkpoint,
    quantize_fp8_blockwise,
    save_checkpoint,
)


# ---------------------------------------------------------------------------------------------- round trips
def test_single_file_round_trip_bit_exact(tmp_path):
    model = ToyModel(layers=2)
    model.to(torch.bfloat16)
    model.model.layers[0].mlp.gate.float()  # the router stays float32 in a bf16 model
    save_checkpoint(model, tmp_path / "ckpt")
    ckpt = tmp_path / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["checksums.json", "config.json", "generation_config.json",
                                                      "model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert ckpt.stat().st_mode & 0o777 == 0o777 & ~umask  # not the 0700 of a temporary directory
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_slice("model.layers.0.mlp.gate.e_score_correction_bias").get_dtype() == "F32"
        assert f.get_slice("model.layers.1.mlp.gate.weight").get_dtype() == "BF16"
        assert "model.layers.0.mlp.gate.scratch" not in f.keys()
    assert json.loads((ckpt / "config.json").read_text())["num_hidden_layers"] == 2
    assert json.loads((ckpt / "generation_config.json").read_text()) == {
        "_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1}

    loaded = empty_like_model(layers=2)
    loaded.to(torch.bfloat16)
    loaded.model.layers[0].mlp.gate.float()
    report = load_checkpoint(loaded, ckpt)
    assert isinstance(report, LoadReport)
    assert_same_state(model, loaded)
    assert len(report.loaded) == len(model.state_dict()) and report.dequantized == 0
    assert not (report.skipped or report.missing or report.unexpected)
    assert "loaded" in str(report)
    # a single .safetensors file is accepted as the path too
    single = empty_like_model(layers=2)
    load_checkpoint(single, ckpt / "model.safetensors")
    assert torch.equal(single.lm_head.weight, model.lm_head.weight.float())


def test_sharded_round_trip_bit_exact_with_index(tmp_path):
    model = ToyModel(layers=3, mtp=1)
    limit = 1200
    save_checkpoint(model, tmp_path, max_shard_size=limit)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 3 and not (tmp_path / "model.safetensors").exists()
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    stored = read_all(tmp_path)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    for shard in shards:
        keys = file_keys(shard)
        assert {k for k, v in index["weight_map"].items() if v == shard.name} == keys
        size = sum(stored[k].numel() * stored[k].element_size() for k in keys)
        assert size <= limit or len(keys) == 1
    loaded = empty_like_model(layers=3, mtp=1)
    report = load_checkpoint(loaded, tmp_path)
    assert_same_state(model, loaded)
    assert len(report.files) == len(shards)


def test_loader_casts_to_each_destination_dtype(tmp_path):
    """A float32 checkpoint into a bf16 model whose router stays float32: each tensor takes its destination's dtype."""
    model = ToyModel()
    save_checkpoint(model, tmp_path)
    loaded = empty_like_model()
    loaded.to(torch.bfloat16)
    for layer in loaded.model.layers:
        layer.mlp.gate.float()
    load_checkpoint(loaded, tmp_path)
    gate = loaded.model.layers[1].mlp.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(gate.e_score_correction_bias, model.model.layers[1].mlp.gate.e_score_correction_bias)
    assert torch.equal(gate.weight, model.model.layers[1].mlp.gate.weight)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))


def test_tied_embeddings_written_once_and_loaded(tmp_path):
    model = ToyModel(tie=True)
    save_checkpoint(model, tmp_path)
    keys = file_keys(tmp_path / "model.safetensors")
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    loaded = empty_like_model(tie=True)
    report = load_checkpoint(loaded, tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert_same_state(model, loaded)
    assert "lm_head.weight" not in report.loaded and not report.missing


def test_tied_flag_with_untied_different_head_refuses_to_save(tmp_path):
    model = ToyModel()
    model.config.tie_word_embeddings = True
    with pytest.raises(CheckpointError, match="tie_word_embeddings.*lm_head.weight"):
        save_checkpoint(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- load errors
def test_missing_tensor_lists_names_and_count(tmp_path):
    tensors = ToyModel().state_dict()
    del tensors["model.norm.weight"]
    write(tmp_path / "one", tensors)
    with pytest.raises(CheckpointError, match=r"1 model tensor\(s\) missing from .*one: model.norm.weight\."):
        load_checkpoint(empty_like_model(), tmp_path / "one")
    many = {k: v for k, v in tensors.items() if "experts" not in k}
    write(tmp_path / "many", many)
    with pytest.raises(CheckpointError, match=r"13 model tensor\(s\) missing.*\.\.\. and 3 more"):
        load_checkpoint(empty_like_model(), tmp_path / "many")


def test_unexpected_tensor_names_key_and_file(tmp_path):
    tensors = ToyModel().state_dict()
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(2, 2)
    write(tmp_path, tensors, shards=[list(tensors)[:5], list(tensors)[5:]])
    with pytest.raises(CheckpointError, match=r"1 unexpected .*'model.layers.0.self_attn.q_proj.weight' in "
                                              r"model-00002-of-00002.safetensors"):
        load_checkpoint(empty_like_model(), tmp_path)


def test_non_strict_reports_missing_and_unexpected(tmp_path):
    source = ToyModel()
    tensors = source.state_dict()
    del tensors["lm_head.weight"]
    tensors["extra.weight"] = torch.zeros(1)
    write(tmp_path, tensors)
    loaded = empty_like_model()
    report = load_checkpoint(loaded, tmp_path, strict=False)
    assert report.missing == ["lm_head.weight"] and report.unexpected == ["'extra.weight' in model.safetensors"]
    assert torch.equal(loaded.model.norm.weight, source.model.norm.weight)
    assert torch.isnan(loaded.lm_head.weight).all()


def test_shape_mismatch_names_key_file_and_both_shapes(tmp_path):
    tensors = ToyModel().state_dict()
    tensors["model.layers.1.mlp.experts.0.down_proj.weight"] = torch.zeros(8, 5)
    write(tmp_path, tensors)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(empty_like_model(), tmp_path, strict=False)  # shapes are checked even when not strict
    msg = str(e.value)
    assert "'model.layers.1.mlp.experts.0.down_proj.weight'" in msg and str(tmp_path / "model.safetensors") in msg
    assert "checkpoint (8, 5) vs model (8, 4)" in msg


def test_shape_mismatch_of_mtp_names_checkpoint_and_model_keys(tmp_path):
    model = ToyModel(layers=2, mtp=1)
    save_checkpoint(model, tmp_path)
    target = empty_like_model(layers=2, mtp=1)
    target.model.mtp[0].eh_proj = nn.Linear(16, 10, bias=False)
    with pytest.raises(CheckpointError, match=r"'model.layers.2.eh_proj.weight' in .* \(model tensor 'model.mtp.0."
                                              r"eh_proj.weight'\): checkpoint \(8, 16\) vs model \(10, 16\)"):
        load_checkpoint(target, tmp_path)


def test_model_without_config_is_refused(tmp_path):
    save_checkpoint(ToyModel(), tmp_path)
    with pytest.raises(CheckpointError, match="Linear has no `config.num_hidden_layers`"):
        load_checkpoint(nn.Linear(2, 2), tmp_path)


def test_model_left_on_meta_is_refused(tmp_path):
    save_checkpoint(ToyModel(), tmp_path)
    with torch.device("meta"):
        model = ToyModel(seed=None)
    with pytest.raises(CheckpointError, match="meta device.*to_empty"):
        load_checkpoint(model, tmp_path)
    with pytest.raises(CheckpointError, match="meta device"):
        save_checkpoint(model, tmp_path / "out")


# ---------------------------------------------------------------------------------------------- real model
def _real_tiny(with_mtp: bool, seed: int = 0):
    from r1forge.config import ModelConfig
    from r1forge.model import build_model

    config = ModelConfig.from_preset("tiny", num_nextn_predict_layers=1)
    torch.manual_seed(seed)
    model = build_model(config, with_mtp=with_mtp).eval()
    with torch.no_grad():
        for t in model.state_dict(keep_vars=True).values():
            t.add_(torch.randn_like(t) * 0.05)  # norms and the correction bias away from their defaults
    return model


def test_real_model_round_trip_with_and_without_mtp(tmp_path):
    import r1forge

    model = _real_tiny(with_mtp=True)
    model.save_pretrained(tmp_path)
    stored = read_all(tmp_path)
    n = model.config.num_hidden_layers
    assert f"model.layers.{n}.eh_proj.weight" in stored and f"model.layers.{n}.shared_head.head.weight" in stored
    with_mtp = r1forge.load_model(tmp_path, with_mtp=True)
    assert_same_state(model, with_mtp)
    without = r1forge.load_model(tmp_path)  # built without MTP: layer n is skipped, the rest is bit-exact
    assert without.num_mtp == 0
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), without(ids))


def test_real_model_from_fp8_checkpoint(tmp_path):
    """DeepSeek's release layout: every projection FP8 + scale; embedding, norms, router and head not quantised."""
    import r1forge

    model = _real_tiny(with_mtp=False)
    model.save_pretrained(tmp_path)
    tensors = read_all(tmp_path)
    quantised = [k for k, v in tensors.items() if v.dim() == 2 and "proj" in k]
    for key in quantised:
        tensors[key], tensors[key + "_scale_inv"] = quantize_fp8_blockwise(tensors[key])
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "checksums.json").unlink()  # weights replaced by hand: the manifest no longer describes them
    write(tmp_path, tensors)
    loaded = r1forge.load_model(tmp_path, dtype=torch.bfloat16)
    reference = model.state_dict()
    for key in quantised:
        expected = dequantize_fp8_blockwise(tensors[key], tensors[key + "_scale_inv"], torch.bfloat16)
        assert torch.equal(loaded.state_dict()[key], expected), key
    gate = next(k for k in reference if k.endswith("mlp.gate.weight"))
    assert loaded.state_dict()[gate].dtype == torch.float32 and torch.equal(loaded.state_dict()[gate], reference[gate])
