"""Finding and reading safetensors weight files: the directory layout, index.json, headers, tensors.

Every safetensors failure is re-raised as a CheckpointError naming the file, so that "which of 163 shards is
truncated?" has an answer in the message.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from r1forge.checkpoint.errors import CheckpointError
from r1forge.checkpoint.keys import INDEX_FILE, SINGLE_FILE

# Bits per element of every safetensors dtype name (the sub-byte float formats pack several per byte).
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6,
              "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
              "I64": 64, "U64": 64, "F64": 64, "C64": 64}


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says about one tensor."""

    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name: "BF16", "F32", "F8_E4M3", ...

    @property
    def is_fp8(self) -> bool:
        return self.dtype.startswith("F8_")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data in the file."""
        if self.dtype not in DTYPE_BITS:
            raise CheckpointError(f"{self.file}: unknown safetensors dtype {self.dtype!r}")
        return -(-self.numel * DTYPE_BITS[self.dtype] // 8)


def resolve_weight_files(path: str | Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint and, when sharded, the index's weight_map.

    `path` is a directory or a single `.safetensors` / `.index.json` file. In a directory the order of
    preference is transformers': `model.safetensors`, then `model.safetensors.index.json`, then any other
    `*.safetensors` files (a directory of shards without an index).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path does not exist: {path}")
    if path.is_file():
        if path.name.endswith(".index.json"):
            return read_index(path)
        if path.suffix == ".safetensors":
            return [path], None
        raise CheckpointError(f"{path} is neither a .safetensors file nor an index.json; pass the checkpoint directory")
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE], None
    if (path / INDEX_FILE).is_file():
        return read_index(path / INDEX_FILE)
    files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if files:
        return files, None
    pickles = sorted(p.name for p in path.glob("*.bin"))
    hint = f"; found {', '.join(pickles)}: pickle weights are not read, convert them to safetensors" if pickles else ""
    raise CheckpointError(f"no weights in {path}: expected {SINGLE_FILE}, or {INDEX_FILE} with its shards{hint}")


def read_index(index_path: Path) -> tuple[list[Path], dict[str, str]]:
    """Parse a `model.safetensors.index.json`; every file its weight_map names must exist beside it."""
    try:
        raw: Any = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read checkpoint index {index_path}: {e}") from e
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in weight_map.items()):
        raise CheckpointError(f"checkpoint index {index_path} has no 'weight_map' object of key -> file name")
    files: dict[str, Path] = {}
    for key, name in weight_map.items():
        if name not in files:
            file = index_path.parent / name
            if not file.is_file():
                count = sum(1 for v in weight_map.values() if v == name)
                raise CheckpointError(f"checkpoint index {index_path} maps '{key}' (and {count - 1} other tensors) "
                                      f"to {name}, but {file} does not exist")
            files[name] = file
    if not files:
        raise CheckpointError(f"checkpoint index {index_path} has an empty weight_map")
    return list(files.values()), weight_map


@contextmanager
def open_safetensors(file: Path) -> Iterator[Any]:
    """`safe_open` on CPU, with header errors (truncated, corrupt, not safetensors) re-raised naming the file."""
    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {file}: {e} (truncated or corrupt safetensors file?)") from e
    with handle as f:
        yield f


def read_tensor(handle: Any, key: str, file: Path) -> torch.Tensor:
    """One tensor from an open file, with read errors re-raised naming the key and the file."""
    try:
        return handle.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot read tensor '{key}' from {file}: {e}") from e


def read_tensor_slice(handle: Any, key: str, file: Path, dim: int, start: int, stop: int) -> torch.Tensor:
    """Rows (dim 0) or columns (dim 1) start:stop of one tensor, reading only those bytes (`get_slice`)."""
    try:
        sliced = handle.get_slice(key)
        index = (slice(start, stop),) if dim == 0 else (slice(None),) * dim + (slice(start, stop),)
        return sliced[index]
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot read tensor '{key}' [{start}:{stop} along dim {dim}] from {file}: {e}") from e


def scan_headers(files: list[Path], weight_map: dict[str, str] | None) -> dict[str, TensorInfo]:
    """Key -> (file, shape, dtype) for every tensor of every file, from the headers alone (no tensor data read).

    A key stored in two files, or an index entry that disagrees with the headers, is an error: either would make
    the loaded weights depend on the order files are read in.
    """
    infos: dict[str, TensorInfo] = {}
    for file in files:
        with open_safetensors(file) as f:
            for key in f.keys():
                if key in infos:
                    raise CheckpointError(f"tensor '{key}' is stored twice: in {infos[key].file} and in {file}")
                sliced = f.get_slice(key)
                infos[key] = TensorInfo(file, tuple(sliced.get_shape()), sliced.get_dtype())
    for key, name in (weight_map or {}).items():
        info = infos.get(key)
        if info is None:
            raise CheckpointError(f"checkpoint index maps '{key}' to {name}, but no file holds that tensor")
        if info.file.name != name:
            raise CheckpointError(f"checkpoint index maps '{key}' to {name}, but it is stored in {info.file}")
    return infos
