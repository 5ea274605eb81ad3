"""r1forge.checkpoint.fp8: DeepSeek's block-wise FP8 (e4m3 weights, one float32 `weight_scale_inv` per 128x128
block) against the per-block definition, its rounding bound, and FP8 checkpoints loaded through the loader.
"""

from __future__ import annotations

import json

import pytest
import torch
from checkpoint_toys import FP8_KEYS, FP8_TOY, ToyModel, empty_like_model, fp8_tensors, write

from r1forge.checkpoint import CheckpointError, dequantize_fp8_blockwise, load_checkpoint, quantize_fp8_blockwise


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
