"""Hugging Face / DeepSeek checkpoints: streaming load (bf16, fp32 or block-wise FP8), sharded atomic save.

    from r1forge.checkpoint import load_checkpoint, save_checkpoint
    report = load_checkpoint(model, "DeepSeek-R1/")   # fills every parameter; FP8 dequantised on the fly
    save_checkpoint(model, "out/", max_shard_size="5GB")

Files: keys.py (names, the MTP layer rule), fp8.py (block-wise FP8), files.py (layout, index, headers),
summary.py (what the headers say, for `r1forge info`), load.py, save.py, atomic.py (putting a finished directory
in place), manifest.py (checksums.json: every file's size and SHA-256, verified on load and resume). The layout
and the FP8 format: docs/design.md section 6.
"""

from r1forge.checkpoint.errors import CheckpointError
from r1forge.checkpoint.fp8 import dequantize_fp8_blockwise, quantize_fp8_blockwise
from r1forge.checkpoint.load import LoadReport, load_checkpoint
from r1forge.checkpoint.save import save_checkpoint

__all__ = [
    "CheckpointError", "LoadReport", "load_checkpoint", "save_checkpoint", "quantize_fp8_blockwise",
    "dequantize_fp8_blockwise",
]
