"""What a checkpoint holds, from its safetensors headers alone: files, bytes, tensors, values per dtype, layers.

`r1forge info CHECKPOINT_DIR` prints this. The headers are read by the loader's own `scan_headers` (a few KB per
shard, never the tensors), over the files the loader would read, so the summary describes what loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from r1forge.checkpoint.files import resolve_weight_files, scan_headers
from r1forge.checkpoint.keys import layer_of


@dataclass
class CheckpointSummary:
    """What the safetensors headers of a checkpoint say: files, bytes and values per dtype."""

    files: int = 0
    file_bytes: int = 0  # total size of the .safetensors files (headers included)
    tensors: int = 0
    numel_by_dtype: dict[str, int] = field(default_factory=dict)
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    layer_indices: set[int] = field(default_factory=set)  # i of every model.layers.{i}.* key


def summarize_checkpoint(path: str | Path) -> CheckpointSummary:
    """Sum the headers of a checkpoint's weight files (a directory or one file; no tensor data is read).

    Raises:
        CheckpointError: no weight files, an index naming absent shards, or a corrupt header (naming the file).
    """
    files, weight_map = resolve_weight_files(path)
    out = CheckpointSummary(files=len(files), file_bytes=sum(f.stat().st_size for f in files))
    for key, info in scan_headers(files, weight_map).items():
        out.tensors += 1
        out.numel_by_dtype[info.dtype] = out.numel_by_dtype.get(info.dtype, 0) + info.numel
        out.bytes_by_dtype[info.dtype] = out.bytes_by_dtype.get(info.dtype, 0) + info.nbytes
        layer = layer_of(key)
        if layer is not None:
            out.layer_indices.add(layer[0])
    return out
