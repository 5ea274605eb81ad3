"""DeepSeek's block-wise FP8 weights: quantise and dequantise, vectorised (no loop over blocks).

A weight W [M, N] is stored as W_fp8 [M, N] (`float8_e4m3fn`) plus `<name>_scale_inv` [ceil(M/b), ceil(N/b)]
(float32, b = 128 in V3/R1), one number per b x b block:

    W ~= W_fp8.float() * scale_inv[i // b, j // b]

The name is DeepSeek's: quantising divides a block by s = amax / 448 and stores s, the inverse of the
multiplier applied to the weight. A side that is not a multiple of b ends in a partial block: V3's
`kv_a_proj_with_mqa` has 576 = 4.5 x 128 rows, so 5 row blocks, the last one 64 rows tall.

Both functions pad to whole blocks, view the padded matrix as [R, b, C, b] (R, C = the scale grid) and
broadcast the [R, 1, C, 1] scale over it, then crop: one float32 temporary, on whatever device the input is.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
DEFAULT_BLOCK = 128  # DeepSeek-V3/R1: quantization_config.weight_block_size = [128, 128]

Block = int | tuple[int, int]


def block_dims(block: Block) -> tuple[int, int]:
    """(rows, cols) of one block from an int or a (rows, cols) pair such as `weight_block_size`."""
    rows, cols = (block, block) if isinstance(block, int) else tuple(block)
    if not (isinstance(rows, int) and isinstance(cols, int)) or rows <= 0 or cols <= 0:
        raise ValueError(f"FP8 block size must be a positive int or a pair of them, got {block!r}")
    return rows, cols


def scale_grid_shape(shape: tuple[int, ...] | torch.Size, block: Block = DEFAULT_BLOCK) -> tuple[int, int]:
    """Shape of the scale grid of a 2-D weight: (ceil(M / b_rows), ceil(N / b_cols))."""
    if len(shape) != 2:
        raise ValueError(f"block-wise FP8 applies to 2-D weights, got shape {tuple(shape)}")
    b_rows, b_cols = block_dims(block)
    return -(-shape[0] // b_rows), -(-shape[1] // b_cols)


def _padded_float32(w: torch.Tensor, grid: tuple[int, int], b_rows: int, b_cols: int) -> torch.Tensor:
    """w as float32 on a zero-padded [R * b_rows, C * b_cols] canvas (a fresh tensor, safe to modify in place)."""
    rows, cols = grid[0] * b_rows, grid[1] * b_cols
    if tuple(w.shape) == (rows, cols):
        return w.to(torch.float32, copy=True)
    out = torch.zeros((rows, cols), dtype=torch.float32, device=w.device)
    out[: w.shape[0], : w.shape[1]] = w
    return out


def dequantize_fp8_blockwise(w_fp8: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                             block: Block = DEFAULT_BLOCK) -> torch.Tensor:
    """FP8 weight [M, N] and its scale grid [ceil(M/b), ceil(N/b)] -> weight [M, N] in `dtype`.

    Computed in float32 (as DeepSeek's `weight_dequant` kernel does) and rounded to `dtype` once, on the
    device of `w_fp8`.

    Args:
        w_fp8: the stored weight, any float8 dtype (DeepSeek uses e4m3).
        scale_inv: float32 (or any float) grid, one multiplier per block.
        dtype: dtype of the result.
        block: block size, an int or (rows, cols).
    Returns:
        A contiguous tensor of shape w_fp8.shape.
    """
    b_rows, b_cols = block_dims(block)
    grid = scale_grid_shape(w_fp8.shape, (b_rows, b_cols))
    if tuple(scale_inv.shape) != grid:
        raise ValueError(f"scale grid of shape {tuple(scale_inv.shape)} does not fit a weight of shape "
                         f"{tuple(w_fp8.shape)} in {b_rows}x{b_cols} blocks: expected {grid}")
    w = _padded_float32(w_fp8, grid, b_rows, b_cols)
    scale = scale_inv.to(device=w.device, dtype=torch.float32)
    w.view(grid[0], b_rows, grid[1], b_cols).mul_(scale[:, None, :, None])  # [R, b, C, b] * [R, 1, C, 1]
    return w[: w_fp8.shape[0], : w_fp8.shape[1]].to(dtype).contiguous()


def quantize_fp8_blockwise(w: torch.Tensor, block: Block = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight [M, N] -> (float8_e4m3fn weight [M, N], float32 scale_inv [ceil(M/b), ceil(N/b)]).

    Each block is divided by amax(|block|) / 448 so that its largest entry lands on e4m3's largest finite value;
    an all-zero block gets scale 1. Rounding is to nearest, so every entry is within half an e4m3 step:
    |error| <= 2^-4 |w| + 2^-10 * scale (the second term covers e4m3's subnormals).
    """
    if not w.is_floating_point():
        raise ValueError(f"quantize_fp8_blockwise needs a floating-point weight, got {w.dtype}")
    b_rows, b_cols = block_dims(block)
    grid = scale_grid_shape(w.shape, (b_rows, b_cols))
    padded = _padded_float32(w, grid, b_rows, b_cols)
    if not torch.isfinite(padded).all():
        raise ValueError("quantize_fp8_blockwise: the weight has inf or NaN entries, which FP8 cannot scale")
    blocks = padded.view(grid[0], b_rows, grid[1], b_cols)  # [R, b, C, b]
    amax = blocks.abs().amax(dim=(1, 3))  # [R, C]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    blocks.div_(scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
    q = padded[: w.shape[0], : w.shape[1]].to(FP8_DTYPE).contiguous()
    return q, scale
