"""`load_checkpoint`: stream a Hugging Face / DeepSeek safetensors checkpoint into a built model.

Two phases. Planning reads only the safetensors headers and routes every key (MTP rule, FP8 scales, tied
weights), so a wrong config or a missing tensor is reported before a single byte of weight data is read.
Loading then opens one file at a time and copies each tensor into its destination (cast to that tensor's
dtype and device, dequantising FP8 on the destination's device) and drops it, so peak memory is the model
plus one tensor, not two models.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from r1forge.checkpoint.errors import CheckpointError
from r1forge.checkpoint.files import (
    TensorInfo,
    open_safetensors,
    read_tensor,
    read_tensor_slice,
    resolve_weight_files,
    scan_headers,
)
from r1forge.checkpoint.fp8 import (
    DEFAULT_BLOCK,
    FP8_DTYPES,
    Block,
    block_dims,
    dequantize_fp8_blockwise,
    scale_grid_shape,
)
from r1forge.checkpoint.keys import (
    INDEX_FILE, is_scale_key, is_weight_file, layer_of, mtp_depth_of, route_key, scale_key_of, weight_key_of,
)
from r1forge.checkpoint.manifest import verify_checkpoint

logger = logging.getLogger(__name__)

MAX_LISTED = 10  # names quoted in an error message before "... and N more"


@dataclass
class LoadReport:
    """What `load_checkpoint` did.

    loaded: model state-dict names that received a value.
    skipped: checkpoint keys of MTP layers the model did not build (scales included).
    duplicates: MTP-layer copies of the embedding / head, shape-checked and not loaded (the model shares them).
    dequantized: FP8 tensors dequantised.
    missing, unexpected: only non-empty with strict=False (strict raises instead).
    """

    path: str
    files: list[str] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    dequantized: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    not_owned: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors from {len(self.files)} file(s) in {self.path}"]
        if self.dequantized:
            parts.append(f"{self.dequantized} dequantised from FP8")
        if self.skipped:
            parts.append(f"skipped {len(self.skipped)} tensors of MTP layers not built")
        if self.duplicates:
            parts.append(f"{len(self.duplicates)} MTP copies of embedding/head checked")
        if self.not_owned:
            parts.append(f"{len(self.not_owned)} tensors held by other ranks not read")
        if self.missing:
            parts.append(f"{len(self.missing)} missing")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected")
        return "; ".join(parts)


@dataclass(frozen=True)
class _Item:
    """One tensor to load: checkpoint key and header, destination name, FP8 scale key and header if any."""

    key: str
    info: TensorInfo
    target: str
    scale_key: str | None = None
    scale_info: TensorInfo | None = None
    shard: Any = None  # a TensorShard (dim, index, count) when only a slice is read


class Layout(Protocol):
    """What one rank of a sharded model holds (r1forge.parallel.tensor_parallel.ShardLayout)."""

    def shard_of(self, name: str) -> Any: ...

    def owns(self, name: str) -> bool: ...


def _listing(names: list[str], sep: str = ", ") -> str:
    shown = sep.join(names[:MAX_LISTED])
    return shown + (f"{sep}... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def _block_size(config: object) -> Block:
    """FP8 block from `quantization_config.weight_block_size` when the config carries it, else 128."""
    quant = getattr(config, "quantization_config", None) or (getattr(config, "extra", None) or {}).get(
        "quantization_config")
    size = quant.get("weight_block_size") if isinstance(quant, dict) else None
    return tuple(size) if size else DEFAULT_BLOCK


class _Planner:
    """Routes every checkpoint key; collects what to load and every problem, from the headers alone."""

    def __init__(self, model: nn.Module, infos: dict[str, TensorInfo], block: Block,
                 layout: Layout | None = None) -> None:
        config = model.config
        self.num_layers = int(config.num_hidden_layers)
        self.declared_mtp = int(getattr(config, "num_nextn_predict_layers", 0) or 0)
        # state_dict(keep_vars=True) gives the live Parameters / persistent buffers; tied weights appear under
        # each of their names as the same object.
        self.targets: dict[str, torch.Tensor] = model.state_dict(keep_vars=True)
        self.built_mtp = len({d for name in self.targets if (d := mtp_depth_of(name)) is not None})
        self.infos, self.block, self.layout = infos, block, layout
        self.not_owned: list[str] = []
        self.items: list[_Item] = []
        self.skipped: list[str] = []
        self.duplicates: list[str] = []
        self.unexpected: list[str] = []
        self.errors: list[str] = []
        self.hint = ""

    def plan(self) -> None:
        for key, info in self.infos.items():
            if is_scale_key(key):
                if weight_key_of(key) not in self.infos:
                    self.unexpected.append(f"'{key}' in {info.file.name} (an FP8 scale without its weight)")
                continue  # consumed together with its weight
            scale_key = scale_key_of(key) if scale_key_of(key) in self.infos else None
            route = route_key(key, self.num_layers, self.built_mtp, self.declared_mtp)
            if route.kind == "skip":
                self.skipped += [key] + ([scale_key] if scale_key else [])
            elif route.kind == "duplicate":
                self._check_duplicate(key, info, route.name)
            elif route.name not in self.targets and self.layout is not None and not self.layout.owns(route.name):
                self.not_owned += [key] + ([scale_key] if scale_key else [])
            elif route.name not in self.targets:
                self.unexpected.append(f"'{key}' in {info.file.name}")
                layer = layer_of(key)
                if layer is not None and layer[0] >= self.num_layers:  # said once, after the list
                    self.hint = (f" Layers from {self.num_layers + max(self.built_mtp, self.declared_mtp)} on are "
                                 f"past num_hidden_layers={self.num_layers} + num_nextn_predict_layers="
                                 f"{self.declared_mtp}: does the config match these weights?")
            else:
                self._add(key, info, route.name, scale_key)

    def _check_duplicate(self, key: str, info: TensorInfo, main: str) -> None:
        dest = self.targets.get(main)
        if dest is None:
            self.unexpected.append(f"'{key}' in {info.file.name} (copy of '{main}', which the model does not have)")
        elif info.shape != tuple(dest.shape):
            self.errors.append(f"shape mismatch for '{key}' in {info.file}: checkpoint {info.shape} vs model "
                               f"{tuple(dest.shape)} (it is the MTP layer's copy of '{main}')")
        else:
            self.duplicates.append(key)

    def _add(self, key: str, info: TensorInfo, target: str, scale_key: str | None) -> None:
        dest = self.targets[target]
        where = f"'{key}' in {info.file}" + (f" (model tensor '{target}')" if target != key else "")
        shard = self.layout.shard_of(target) if self.layout is not None else None
        try:
            expected = shard.shape_of(info.shape) if shard is not None else info.shape
        except ValueError as e:
            self.errors.append(f"{where} of shape {info.shape} cannot be sharded along dim {shard.dim}: {e}")
            return
        if expected != tuple(dest.shape):
            part = f" (its part {shard.index + 1} of {shard.count} along dim {shard.dim})" if shard else ""
            self.errors.append(f"shape mismatch for {where}: checkpoint {info.shape}{part} vs model "
                               f"{tuple(dest.shape)}")
            return
        scale_info = self.infos[scale_key] if scale_key else None
        if scale_info is not None:
            if not info.is_fp8:
                self.errors.append(f"{where} has a scale '{scale_key}' but is stored as {info.dtype}, not FP8")
                return
            if dest.dtype in FP8_DTYPES:
                self.errors.append(f"{where} is block-quantised FP8; it can only be loaded into a floating-point "
                                   f"parameter of another dtype, the model holds {dest.dtype}")
                return
            grid = scale_grid_shape(info.shape, self.block) if len(info.shape) == 2 else None
            if grid != scale_info.shape:
                rows, cols = block_dims(self.block)
                self.errors.append(f"FP8 scale '{scale_key}' in {scale_info.file} has shape {scale_info.shape}, but "
                                   f"weight {where} of shape {info.shape} needs a {rows}x{cols}-block grid {grid}")
                return
        elif info.is_fp8 and dest.dtype not in FP8_DTYPES:
            self.errors.append(f"{where} is stored as {info.dtype} without a '{scale_key_of(key)}' scale; "
                               f"cannot dequantise it into {dest.dtype}")
            return
        self.items.append(_Item(key, info, target, scale_key, scale_info, shard))

    def missing(self) -> list[str]:
        """Model names none of whose aliases (tied weights share one tensor) receive a value."""
        loaded_ids = {id(self.targets[item.target]) for item in self.items}
        return [name for name, t in self.targets.items() if id(t) not in loaded_ids]


def _verify_weights(path: Path, verify: str | None) -> None:
    """Check the weight files (and index) of `path` against the manifest beside them, if there is one."""
    if path.is_dir():
        verify_checkpoint(path, verify, names=[p.name for p in path.iterdir()
                                               if is_weight_file(p.name) or p.name == INDEX_FILE])
    elif path.is_file():
        verify_checkpoint(path.parent, verify, names=[path.name])


def load_checkpoint(model: nn.Module, path: str | Path, *, strict: bool = True,
                    verify: str | None = None, layout: Layout | None = None) -> LoadReport:
    """Fill every parameter and persistent buffer of `model` from a safetensors checkpoint.

    Args:
        model: built (possibly on `meta` and then `to_empty(device=...)`), with a `.config` exposing
            `num_hidden_layers` (and `num_nextn_predict_layers`); its state-dict names are the checkpoint's
            except MTP modules at `model.mtp.{k}` (stored at `model.layers.{num_hidden_layers + k}`).
        path: a directory (`model.safetensors`, or shards with `model.safetensors.index.json`) or one
            `.safetensors` file.
        strict: raise on missing or unexpected tensors; with False they are only reported. Shape mismatches,
            unreadable files and FP8 tensors without a usable scale always raise.
        verify: check the weight files against the directory's `checksums.json` first: "size" (the default,
            free), "full" (SHA-256 of every file) or "none"; None reads $R1FORGE_VERIFY_CHECKPOINT. A
            directory without a manifest (a Hugging Face download) is not verified.
        layout: for one rank of a sharded model: the slice of each tensor it holds (only those bytes are read;
            FP8 ones dequantised by whole blocks, then cut) and the tensors it does not hold (not read).
    Returns:
        A LoadReport (also logged at INFO).
    Raises:
        CheckpointError: naming the key, the file and both shapes where relevant.
    """
    if not isinstance(getattr(getattr(model, "config", None), "num_hidden_layers", None), int):
        raise CheckpointError(f"{type(model).__name__} has no `config.num_hidden_layers`: it is needed to tell MTP "
                              "layers (stored at model.layers.{num_hidden_layers + k}) from decoder layers")
    try:
        files, weight_map = resolve_weight_files(path)
        infos = scan_headers(files, weight_map)
    except CheckpointError as e:  # unreadable index or header: say too which files the checksums find damaged
        try:
            _verify_weights(Path(path), verify)
        except CheckpointError as damaged:
            raise CheckpointError(f"{e}\n{damaged}") from None
        raise
    _verify_weights(Path(path), verify)
    planner = _Planner(model, infos, _block_size(model.config), layout)
    on_meta = [name for name, t in planner.targets.items() if t.is_meta]
    if on_meta:
        raise CheckpointError(f"model tensors are on the meta device ({_listing(on_meta)}): "
                              "call model.to_empty(device=...) before load_checkpoint")
    planner.plan()
    if planner.errors:
        raise CheckpointError(f"{len(planner.errors)} tensor(s) of {path} cannot be loaded:\n  "
                              + _listing(planner.errors, sep="\n  "))
    missing = planner.missing()
    if strict and planner.unexpected:
        raise CheckpointError(f"{len(planner.unexpected)} unexpected tensor(s) in {path} that no model tensor takes: "
                              f"{_listing(planner.unexpected)}.{planner.hint} Pass strict=False to ignore them.")
    if strict and missing:
        raise CheckpointError(f"{len(missing)} model tensor(s) missing from {path}: {_listing(missing)}. "
                              "Pass strict=False to load the rest.")
    report = LoadReport(str(path), [str(f) for f in files], skipped=planner.skipped, duplicates=planner.duplicates,
                        missing=missing, unexpected=planner.unexpected, not_owned=planner.not_owned)
    _copy_tensors(planner, files, report)
    logger.info("%s", report)
    return report


@torch.no_grad()
def _copy_tensors(planner: _Planner, files: list[Path], report: LoadReport) -> None:
    """Stream file by file; each tensor goes straight into its destination and is dropped."""
    by_file: dict[Path, list[_Item]] = defaultdict(list)
    for item in planner.items:
        by_file[item.info.file].append(item)
    # Scales stored in another file than their weight (allowed by index.json) are read up front: they are
    # tiny (1/16384 of their weight) and this keeps to one open file at a time.
    foreign: dict[Path, list[str]] = defaultdict(list)
    for item in planner.items:
        if item.scale_info is not None and item.scale_info.file != item.info.file:
            foreign[item.scale_info.file].append(item.scale_key)
    foreign_scales: dict[str, torch.Tensor] = {}
    for file, keys in foreign.items():
        with open_safetensors(file) as f:
            foreign_scales.update({key: read_tensor(f, key, file) for key in keys})
    for file in files:
        if file not in by_file:
            continue
        with open_safetensors(file) as f:
            for item in by_file[file]:
                dest = planner.targets[item.target]
                if item.scale_key is not None:
                    scale = foreign_scales.pop(item.scale_key, None)
                    if scale is None:
                        scale = read_tensor(f, item.scale_key, file)
                    tensor = _read_fp8(f, item, file, scale, dest, planner.block)
                    report.dequantized += 1
                elif item.shard is not None:
                    start, stop = item.shard.bounds(item.info.shape[item.shard.dim])
                    tensor = read_tensor_slice(f, item.key, file, item.shard.dim, start, stop)
                else:
                    tensor = read_tensor(f, item.key, file)
                dest.copy_(tensor)
                report.loaded.append(item.target)
                del tensor


def _read_fp8(f: Any, item: _Item, file: Path, scale: torch.Tensor, dest: torch.Tensor, block: Block) -> torch.Tensor:
    """Dequantise an FP8 weight (or, sharded, the whole blocks covering its slice, then cut the slice)."""
    if item.shard is None:
        weight = read_tensor(f, item.key, file)
        return dequantize_fp8_blockwise(weight.to(dest.device), scale.to(dest.device), dest.dtype, block)
    dim = item.shard.dim
    start, stop = item.shard.bounds(item.info.shape[dim])
    b = block_dims(block)[dim]
    first_block, end_block = start // b, -(-stop // b)
    lo, hi = first_block * b, min(end_block * b, item.info.shape[dim])
    weight = read_tensor_slice(f, item.key, file, dim, lo, hi)
    scale = scale.narrow(dim, first_block, end_block - first_block)
    full = dequantize_fp8_blockwise(weight.to(dest.device), scale.to(dest.device), dest.dtype, block)
    return full.narrow(dim, start - lo, stop - start)
