"""`save_checkpoint`: a model -> the Hugging Face / DeepSeek directory layout, written atomically.

Layout: `config.json`, `generation_config.json`, `checksums.json` (r1forge.checkpoint.manifest), and
`model.safetensors` when the weights fit in one shard, else `model-00001-of-0000M.safetensors` ... with `model.safetensors.index.json` (`metadata.total_size`,
`weight_map`). Each file carries `metadata={"format": "pt"}` (transformers refuses files without it).
MTP modules are written as DeepSeek stores them: `model.mtp.{k}.X` -> `model.layers.{N + k}.X`, plus that
layer's copies of the embedding and head. See `r1forge.checkpoint.atomic` for how the directory is put in place.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from r1forge.checkpoint.atomic import apply_umask, fsync_path, make_staging_dir, replace_directory
from r1forge.checkpoint.errors import CheckpointError
from r1forge.checkpoint.keys import (
    EMBED_KEY,
    HEAD_KEY,
    INDEX_FILE,
    SINGLE_FILE,
    mtp_depth_of,
    shard_name,
    to_checkpoint_key,
)
from r1forge.checkpoint.manifest import write_manifest

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB" (10^9, transformers' convention), "500MB", "2GiB" (2^30)."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"max_shard_size must be an int or a string like '5GB', got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        m = _SIZE_RE.fullmatch(size)
        if not m or m[2].upper() not in _UNITS:
            raise ValueError(f"max_shard_size {size!r} is not a size: use bytes or a number with B, KB, MB, GB, TB, "
                             "KiB, MiB, GiB or TiB")
        value = int(float(m[1]) * _UNITS[m[2].upper()])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint key -> tensor (the model's own, not copied), in the order they will be written.

    Tied head left out under tie_word_embeddings; each MTP layer gets its copies of embedding and head.
    """
    config = model.config
    num_layers = int(config.num_hidden_layers)
    state = model.state_dict()
    on_meta = [name for name, t in state.items() if t.is_meta]
    if on_meta:
        raise CheckpointError(f"cannot save tensors on the meta device (not materialised): {', '.join(on_meta[:10])}")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied and HEAD_KEY in state and EMBED_KEY in state:
        head, embed = state[HEAD_KEY], state[EMBED_KEY]
        if head.data_ptr() != embed.data_ptr() and not torch.equal(head, embed):
            raise CheckpointError(f"tie_word_embeddings is true but '{HEAD_KEY}' differs from '{EMBED_KEY}': "
                                  "the checkpoint would keep only the embedding; tie them or set it false")
    out: dict[str, torch.Tensor] = {}
    depths: list[int] = []
    for name, tensor in state.items():
        if tied and name == HEAD_KEY:
            continue
        key = to_checkpoint_key(name, num_layers)
        if key in out:
            raise CheckpointError(f"model tensor '{name}' and another both map to checkpoint key '{key}'")
        out[key] = tensor
        depth = mtp_depth_of(name)
        if depth is not None and depth not in depths:
            depths.append(depth)
    for depth in depths:
        layer = f"model.layers.{num_layers + depth}"
        for suffix, main in (("embed_tokens.weight", EMBED_KEY), ("shared_head.head.weight", HEAD_KEY)):
            if main not in state:
                raise CheckpointError(f"model has MTP module {depth} but no '{main}' to write as '{layer}.{suffix}'")
            out[f"{layer}.{suffix}"] = state[main]
    if not out:
        raise CheckpointError("the model has no parameters or persistent buffers to save")
    return out


def plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Greedy in order, as transformers does: a shard closes when the next tensor would overflow it.

    A single tensor larger than `max_bytes` gets a shard of its own.
    """
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in tensors.items():
        n = _nbytes(tensor)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    return shards


def _write_shard(tensors: dict[str, torch.Tensor], keys: list[str], file: Path) -> None:
    """One safetensors file: CPU, contiguous tensors; a repeated storage (tied or duplicated) gets its own copy."""
    seen: set[tuple[str, int]] = set()
    payload = {}
    for key in keys:
        t = tensors[key].detach().to("cpu").contiguous()
        storage = (str(t.device), t.untyped_storage().data_ptr())
        if storage in seen:
            t = t.clone()
        seen.add(storage)
        payload[key] = t
    save_file(payload, str(file), metadata={"format": "pt"})
    fsync_path(file)


def _write_json(obj: dict, file: Path) -> None:
    file.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    fsync_path(file)


def _saved_config(config: object, tensors: dict[str, torch.Tensor]) -> object:
    """The config as saved: `torch_dtype` set to the weights' main dtype, no `quantization_config`.

    The weights written are never FP8 (a model holds dequantised values), so a quantization_config inherited
    from an FP8 source checkpoint would make transformers treat them as quantised.
    """
    config = copy.copy(config)
    extra = getattr(config, "extra", None)
    if isinstance(extra, dict) and "quantization_config" in extra:
        config.extra = {k: v for k, v in extra.items() if k != "quantization_config"}
    if hasattr(config, "torch_dtype"):
        by_dtype = Counter()
        for t in tensors.values():
            by_dtype[t.dtype] += _nbytes(t)
        config.torch_dtype = str(by_dtype.most_common(1)[0][0]).removeprefix("torch.")
    return config


def _generation_config(config: object, existing: Path) -> dict:
    """generation_config.json: the existing one (sampling defaults such as R1's temperature 0.6 are kept) with
    bos/eos/pad from the model config; an existing list of eos ids that contains the config's id is kept."""
    gen: dict = {"_from_model_config": True}
    if existing.is_file():
        try:
            loaded = json.loads(existing.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            loaded = None  # unreadable: rewritten from the model config
        if isinstance(loaded, dict):
            gen = loaded
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, key, None)
        if value is None:
            continue
        if isinstance(gen.get(key), list) and value in gen[key]:
            continue
        gen[key] = value
    return gen


def save_checkpoint(model: nn.Module, path: str | Path, *, max_shard_size: int | str = "5GB",
                    safe_serialization: bool = True) -> None:
    """Write `model` as a Hugging Face checkpoint directory at `path`, atomically.

    Everything is written to a staging folder beside `path` and moved into place only when complete, so a kill
    at any point leaves either the previous checkpoint or the new one at `path`, never a mixture. When `path`
    already exists its weight files, config.json and generation_config.json are replaced and every other entry
    (tokenizer, chat template, README, subfolders) is kept; generation_config.json keeps its sampling defaults.
    `checksums.json` lists the size and SHA-256 of every file written (see r1forge.checkpoint.manifest).

    Args:
        model: exposes `.config` (`num_hidden_layers`, `tie_word_embeddings`, `bos/eos_token_id`, `save_json`).
        path: the checkpoint directory (created with its parents if absent).
        max_shard_size: bytes per safetensors file, an int or "5GB" / "500MB" / "2GiB".
        safe_serialization: only True is supported: pickle (.bin) checkpoints run code when loaded.
    """
    if not safe_serialization:
        raise ValueError("save_checkpoint writes safetensors only: safe_serialization=False (pickle .bin files, "
                         "which execute code when loaded) is not supported")
    limit = parse_size(max_shard_size)
    target = Path(path).resolve()
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"cannot save a checkpoint to {target}: it exists and is not a directory")
    tensors = checkpoint_tensors(model)
    shards = plan_shards(tensors, limit)
    staging = make_staging_dir(target)
    try:
        if len(shards) == 1:
            _write_shard(tensors, shards[0], staging / SINGLE_FILE)
        else:
            weight_map = {}
            for i, keys in enumerate(shards, start=1):
                name = shard_name(i, len(shards))
                _write_shard(tensors, keys, staging / name)
                weight_map.update({key: name for key in keys})
            total = sum(_nbytes(t) for t in tensors.values())
            _write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, staging / INDEX_FILE)
        config = _saved_config(model.config, tensors)
        config.save_json(staging / "config.json")
        fsync_path(staging / "config.json")
        _write_json(_generation_config(config, target / "generation_config.json"), staging / "generation_config.json")
        write_manifest(staging)  # last: the sizes and SHA-256 of everything above
        apply_umask(staging)
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
