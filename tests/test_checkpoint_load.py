"""r1forge.checkpoint: safetensors load/save in the Hugging Face / DeepSeek layout, FP8 dequantisation, MTP keys,
errors that name the key, the file and the shapes, atomic saves.

Most tests use `ToyModel`, a few-kilobyte nn.Module with DeepSeek's key names (attention, router with its float32
`e_score_correction_bias` buffer, experts, MTP at `model.mtp.{k}`) and a `.config` stub, so they depend on the
checkpoint code alone; the last ones round-trip the real tiny DeepSeek model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from r1forge.checkpoint import (
    CheckpointError,
    LoadReport,
    dequantize_fp8_blockwise,
    load_checkpoint,
    quantize_fp8_blockwise,
    save_checkpoint,
)
from r1forge.checkpoint import atomic as atomic_mod
from r1forge.checkpoint import save as save_mod
from r1forge.checkpoint.save import parse_size


# ---------------------------------------------------------------------------------------------- toy model
class ToyConfig:
    """The fields of r1forge.config.ModelConfig that the checkpoint code reads."""

    def __init__(self, num_hidden_layers: int = 2, num_nextn_predict_layers: int = 0,
                 tie_word_embeddings: bool = False, **extra) -> None:
        self.num_hidden_layers = num_hidden_layers
        self.num_nextn_predict_layers = num_nextn_predict_layers
        self.tie_word_embeddings = tie_word_embeddings
        self.bos_token_id, self.eos_token_id, self.pad_token_id = 0, 1, None
        self.extra = extra

    def to_dict(self) -> dict:
        return {"num_hidden_layers": self.num_hidden_layers, "num_nextn_predict_layers": self.num_nextn_predict_layers,
                "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id, **self.extra}

    def save_json(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))


class Router(nn.Module):
    def __init__(self, experts: int, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden))
        self.register_buffer("e_score_correction_bias", torch.zeros(experts, dtype=torch.float32))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)  # never in a checkpoint


class Expert(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)


class Norm(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))


class Layer(nn.Module):
    def __init__(self, d: dict) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.kv_a_proj_with_mqa = nn.Linear(d["hidden"], d["kv"], bias=False)
        self.self_attn.o_proj = nn.Linear(d["o"][1], d["o"][0], bias=False)
        self.mlp = nn.Module()
        self.mlp.gate = Router(d["experts"], d["hidden"])
        self.mlp.experts = nn.ModuleList(Expert(d["hidden"], d["inter"]) for _ in range(d["experts"]))
        self.input_layernorm = Norm(d["hidden"])


class MTP(Layer):
    def __init__(self, d: dict) -> None:
        super().__init__(d)
        self.eh_proj = nn.Linear(2 * d["hidden"], d["hidden"], bias=False)
        self.enorm, self.hnorm = Norm(d["hidden"]), Norm(d["hidden"])
        self.shared_head = nn.Module()
        self.shared_head.norm = Norm(d["hidden"])


class ToyModel(nn.Module):
    """DeepSeek key names at toy sizes; `o` is o_proj's (rows, cols)."""

    def __init__(self, layers: int = 2, mtp: int = 0, declared_mtp: int | None = None, tie: bool = False,
                 vocab: int = 16, hidden: int = 8, kv: int = 12, o: tuple[int, int] = (8, 8), experts: int = 2,
                 inter: int = 4, seed: int | None = 0, **config_extra) -> None:
        super().__init__()
        d = dict(hidden=hidden, kv=kv, o=o, experts=experts, inter=inter)
        self.config = ToyConfig(layers, mtp if declared_mtp is None else declared_mtp, tie, **config_extra)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, hidden)
        self.model.layers = nn.ModuleList(Layer(d) for _ in range(layers))
        self.model.norm = Norm(hidden)
        self.model.mtp = nn.ModuleList(MTP(d) for _ in range(mtp))
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.model.embed_tokens.weight
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for t in self.state_dict(keep_vars=True).values():
                    t.copy_(torch.randn(t.shape, generator=g))


def empty_like_model(**kwargs) -> ToyModel:
    """Built on meta, materialised with to_empty and poisoned with NaN: a test sees any tensor the loader missed."""
    with torch.device("meta"):
        model = ToyModel(seed=None, **kwargs)
    model.to_empty(device="cpu")
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():
        for t in model.state_dict(keep_vars=True).values():
            t.fill_(float("nan"))
    return model


def assert_same_state(expected: nn.Module, got: nn.Module) -> None:
    a, b = expected.state_dict(), got.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def write(directory: Path, tensors: dict[str, torch.Tensor], shards: list[list[str]] | None = None) -> Path:
    """Write a checkpoint by hand: one model.safetensors, or the given key groups as shards with an index."""
    directory.mkdir(parents=True, exist_ok=True)
    if shards is None:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    weight_map = {}
    for i, keys in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k] for k in keys}, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def file_keys(file: Path) -> set[str]:
    with safe_open(str(file), "pt") as f:
        return set(f.keys())


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- round trips
def test_single_file_round_trip_bit_exact(tmp_path):
    model = ToyModel(layers=2)
    model.to(torch.bfloat16)
    model.model.layers[0].mlp.gate.float()  # the router stays float32 in a bf16 model
    save_checkpoint(model, tmp_path / "ckpt")
    ckpt = tmp_path / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
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


# ---------------------------------------------------------------------------------------------- FP8
def dequant_loop(w: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """The definition, one block at a time: the reference the vectorised version must equal bit for bit."""
    out = torch.empty(w.shape, dtype=torch.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            out[rows, cols] = w[rows, cols].float() * scale[i, j]
    return out


def block_magnitudes(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Random weights whose scale changes by orders of magnitude along both sides, so every block's scale differs."""
    g = torch.Generator().manual_seed(seed)
    row_mag = torch.logspace(-3, 1, rows)[:, None]
    col_mag = torch.logspace(0, 1.5, cols)[None, :]
    return torch.randn(rows, cols, generator=g) * row_mag * col_mag


def per_element_bound(w: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Half an e4m3 step: 2^-4 relative (3 mantissa bits), 2^-10 * scale absolute in the subnormal range."""
    s = scale.repeat_interleave(block, 0)[: w.shape[0]].repeat_interleave(block, 1)[:, : w.shape[1]]
    return w.abs() * 2.0**-4 + s * 2.0**-10


@pytest.mark.parametrize("shape", [(576, 300), (200, 130), (256, 128), (1, 1), (129, 383)])
def test_dequantize_equals_blockwise_definition(shape):
    w = block_magnitudes(*shape, seed=sum(shape))
    q, scale = quantize_fp8_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert tuple(scale.shape) == (-(-shape[0] // 128), -(-shape[1] // 128))
    reference = dequant_loop(q, scale)
    assert torch.equal(dequantize_fp8_blockwise(q, scale, torch.float32), reference)
    assert torch.equal(dequantize_fp8_blockwise(q, scale, torch.bfloat16), reference.to(torch.bfloat16))


@pytest.mark.parametrize("shape", [(576, 300), (200, 130)])
def test_fp8_round_trip_within_rounding_and_wrong_scale_fails(shape):
    w = block_magnitudes(*shape, seed=1)
    q, scale = quantize_fp8_blockwise(w)
    assert scale.shape == ((5, 3) if shape == (576, 300) else (2, 2))
    err = (dequantize_fp8_blockwise(q, scale, torch.float32) - w).abs()
    assert (err <= per_element_bound(w, scale)).all()
    # per block: never more than 2^-4 of the block's largest magnitude (= 448 * scale)
    block_max = (scale * 448).repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    assert (err <= block_max * 2.0**-4).all()
    assert err.max() > 0  # FP8 is lossy: the bound is exercised, not trivially met
    # the scale of a neighbouring block breaks the bound: the test can tell a right grid from a wrong one
    for wrong in (scale.roll(1, dims=0), scale.roll(1, dims=1)):
        wrong_err = (dequantize_fp8_blockwise(q, wrong, torch.float32) - w).abs()
        assert not (wrong_err <= per_element_bound(w, scale)).all()


def test_dequantize_rejects_a_scale_grid_that_does_not_fit():
    q, scale = quantize_fp8_blockwise(torch.randn(576, 300))
    with pytest.raises(ValueError, match=r"\(3, 5\).*\(576, 300\).*expected \(5, 3\)"):
        dequantize_fp8_blockwise(q, scale.T.contiguous(), torch.float32)


def test_quantize_zero_block_and_rejects_non_finite():
    w = torch.zeros(130, 10)
    w[:128] = torch.randn(128, 10)
    q, scale = quantize_fp8_blockwise(w)
    assert scale[1, 0] == 1.0 and torch.equal(dequantize_fp8_blockwise(q, scale, torch.float32)[128:], w[128:])
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_fp8_blockwise(torch.tensor([[1.0, float("inf")]]))


FP8_TOY = dict(hidden=300, kv=576, o=(200, 130), experts=1, inter=20, vocab=8)
FP8_KEYS = ["model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "model.layers.0.self_attn.o_proj.weight",
            "model.layers.1.self_attn.kv_a_proj_with_mqa.weight", "model.layers.1.mlp.experts.0.up_proj.weight"]


def fp8_tensors(model: nn.Module, keys: list[str] = FP8_KEYS) -> dict[str, torch.Tensor]:
    """The model's state dict with `keys` stored as DeepSeek does: FP8 weight + float32 `weight_scale_inv`."""
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    for key in keys:
        tensors[key], tensors[key + "_scale_inv"] = quantize_fp8_blockwise(tensors[key])
    return tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_checkpoint_loads_within_rounding(tmp_path, dtype):
    source = ToyModel(**FP8_TOY)
    tensors = fp8_tensors(source)
    write(tmp_path, tensors)
    loaded = empty_like_model(**FP8_TOY).to(dtype)
    report = load_checkpoint(loaded, tmp_path)
    assert report.dequantized == len(FP8_KEYS)
    assert not report.unexpected  # the _scale_inv companions are consumed
    got, src = loaded.state_dict(), source.state_dict()
    for key in FP8_KEYS:
        expected = dequant_loop(tensors[key], tensors[key + "_scale_inv"]).to(dtype)
        assert got[key].dtype == dtype and torch.equal(got[key], expected), key
        bound = per_element_bound(src[key], tensors[key + "_scale_inv"])
        if dtype == torch.bfloat16:
            bound = bound + src[key].abs() * 2.0**-8  # plus bf16's own rounding
        assert ((got[key].float() - src[key]).abs() <= bound).all(), key
    assert torch.equal(got["model.norm.weight"], src["model.norm.weight"].to(dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp8_checkpoint_loads_into_cuda_model(tmp_path):
    """Dequantisation runs on the destination's device and gives the CPU definition's values."""
    tensors = fp8_tensors(ToyModel(**FP8_TOY))
    write(tmp_path, tensors)
    loaded = empty_like_model(**FP8_TOY).to("cuda", torch.bfloat16)
    assert load_checkpoint(loaded, tmp_path).dequantized == len(FP8_KEYS)
    for key in FP8_KEYS:
        got = loaded.state_dict()[key]
        expected = dequant_loop(tensors[key], tensors[key + "_scale_inv"]).to(torch.bfloat16)
        assert got.device.type == "cuda" and torch.equal(got.cpu(), expected), key


def test_fp8_scale_stored_in_another_shard(tmp_path):
    source = ToyModel(**FP8_TOY)
    tensors = fp8_tensors(source)
    scale = FP8_KEYS[0] + "_scale_inv"
    others = [k for k in tensors if k != scale]
    write(tmp_path, tensors, shards=[others[: len(others) // 2], others[len(others) // 2:] + [scale]])
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert index[FP8_KEYS[0]] != index[scale]
    loaded = empty_like_model(**FP8_TOY)
    report = load_checkpoint(loaded, tmp_path)
    assert report.dequantized == len(FP8_KEYS)
    expected = dequant_loop(tensors[FP8_KEYS[0]], tensors[scale])
    assert torch.equal(loaded.state_dict()[FP8_KEYS[0]], expected)


def test_fp8_wrong_scale_grid_names_key_file_and_shapes(tmp_path):
    tensors = fp8_tensors(ToyModel(**FP8_TOY))
    key = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    tensors[key + "_scale_inv"] = torch.ones(4, 3)  # 576 rows need 5 row blocks
    write(tmp_path, tensors)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(empty_like_model(**FP8_TOY), tmp_path)
    msg = str(e.value)
    assert key + "_scale_inv" in msg and "model.safetensors" in msg
    assert "(4, 3)" in msg and "(576, 300)" in msg and "(5, 3)" in msg


def test_fp8_block_size_from_quantization_config(tmp_path):
    source = ToyModel(**FP8_TOY)
    tensors = {k: v.clone() for k, v in source.state_dict().items()}
    key = FP8_KEYS[0]
    tensors[key], tensors[key + "_scale_inv"] = quantize_fp8_blockwise(tensors[key], block=64)
    write(tmp_path, tensors)
    quant = {"quant_method": "fp8", "weight_block_size": [64, 64]}
    loaded = empty_like_model(**FP8_TOY, quantization_config=quant)
    assert load_checkpoint(loaded, tmp_path).dequantized == 1
    assert torch.equal(loaded.state_dict()[key], dequant_loop(tensors[key], tensors[key + "_scale_inv"], block=64))


def test_fp8_without_scale_and_scale_without_weight(tmp_path):
    tensors = fp8_tensors(ToyModel(**FP8_TOY))
    key = FP8_KEYS[1]
    del tensors[key + "_scale_inv"]
    write(tmp_path / "a", tensors)
    with pytest.raises(CheckpointError, match=rf"'{key}' in .*model.safetensors.*F8_E4M3 without a '{key}_scale_inv'"):
        load_checkpoint(empty_like_model(**FP8_TOY), tmp_path / "a")
    tensors = fp8_tensors(ToyModel(**FP8_TOY))
    tensors["model.layers.0.orphan.weight_scale_inv"] = torch.ones(1, 1)
    write(tmp_path / "b", tensors)
    with pytest.raises(CheckpointError, match="orphan.weight_scale_inv' in model.safetensors .an FP8 scale without"):
        load_checkpoint(empty_like_model(**FP8_TOY), tmp_path / "b")


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
    assert names == ["adapter.safetensors", "assets", "config.json", "generation_config.json", "model.safetensors",
                     "tokenizer.json"]
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
    assert sorted(modes) == ["config.json", "generation_config.json", "model.safetensors"]
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
from test_checkpoint import ToyModel
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
    write(tmp_path, tensors)
    loaded = r1forge.load_model(tmp_path, dtype=torch.bfloat16)
    reference = model.state_dict()
    for key in quantised:
        expected = dequantize_fp8_blockwise(tensors[key], tensors[key + "_scale_inv"], torch.bfloat16)
        assert torch.equal(loaded.state_dict()[key], expected), key
    gate = next(k for k in reference if k.endswith("mlp.gate.weight"))
    assert loaded.state_dict()[gate].dtype == torch.float32 and torch.equal(loaded.state_dict()[gate], reference[gate])
