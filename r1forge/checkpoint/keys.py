"""Names: model state-dict keys <-> checkpoint keys, the MTP layer rule, FP8 scale keys, weight file names.

The model's `state_dict()` keys are the Hugging Face checkpoint's (docs/design.md section 6) except for the multi-token
prediction modules: the model holds depth k at `model.mtp.{k}.X`, DeepSeek's checkpoints store it as an extra
decoder layer `model.layers.{N + k}.X` with N = config.num_hidden_layers (61 for V3). That layer also carries
copies of the main embedding and head (`embed_tokens.weight`, `shared_head.head.weight`), which the model
shares with the main network instead of holding twice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

EMBED_KEY = "model.embed_tokens.weight"
HEAD_KEY = "lm_head.weight"
# MTP-layer entries that duplicate a main-model tensor: suffix inside the layer -> the main tensor's key.
MTP_SHARED_SUFFIXES = {"embed_tokens.weight": EMBED_KEY, "shared_head.head.weight": HEAD_KEY}
SCALE_SUFFIX = "_scale_inv"  # DeepSeek FP8: `...weight` has a float32 companion `...weight_scale_inv`

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"model-\d+-of-\d+\.safetensors")
_PICKLE_WEIGHT_RE = re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin(\.index\.json)?")

_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_MTP_RE = re.compile(r"model\.mtp\.(\d+)\.(.+)")


def shard_name(index: int, count: int) -> str:
    """transformers' shard file name, 1-based: model-00001-of-00003.safetensors."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def is_weight_file(name: str) -> bool:
    """Whether a file name in a checkpoint directory is one of the weight files a save replaces.

    The transformers names only (single file, shards, index, and the older pickle forms), so that other
    `.safetensors` files a user keeps beside the model (an adapter, say) are never touched.
    """
    return name in (SINGLE_FILE, INDEX_FILE) or bool(_SHARD_RE.fullmatch(name) or _PICKLE_WEIGHT_RE.fullmatch(name))


def is_scale_key(key: str) -> bool:
    return key.endswith(SCALE_SUFFIX)


def scale_key_of(weight_key: str) -> str:
    return weight_key + SCALE_SUFFIX


def weight_key_of(scale_key: str) -> str:
    return scale_key[: -len(SCALE_SUFFIX)]


def layer_of(key: str) -> tuple[int, str] | None:
    """(layer index, suffix inside the layer) for `model.layers.{i}.suffix`, else None."""
    m = _LAYER_RE.fullmatch(key)
    return (int(m[1]), m[2]) if m else None


def mtp_depth_of(name: str) -> int | None:
    """k for a model state-dict name `model.mtp.{k}.X`, else None."""
    m = _MTP_RE.fullmatch(name)
    return int(m[1]) if m else None


def to_checkpoint_key(name: str, num_hidden_layers: int) -> str:
    """Model state-dict name -> checkpoint key: `model.mtp.{k}.X` -> `model.layers.{N + k}.X`, others unchanged."""
    m = _MTP_RE.fullmatch(name)
    return f"model.layers.{num_hidden_layers + int(m[1])}.{m[2]}" if m else name


@dataclass(frozen=True)
class Route:
    """Where one checkpoint key goes.

    kind:
        "load": copy into the model tensor `name`.
        "duplicate": an MTP layer's copy of the main tensor `name`; shape-checked, not loaded.
        "skip": belongs to an MTP depth the model did not build; `name` is the checkpoint key.
    """

    kind: Literal["load", "duplicate", "skip"]
    name: str


def route_key(key: str, num_hidden_layers: int, built_mtp: int, declared_mtp: int) -> Route:
    """Route a (non-scale) checkpoint key into a model with `built_mtp` MTP modules.

    Layers N .. N + built_mtp - 1 are loaded into `model.mtp.{k}`. Layers from N + built_mtp up to
    N + max(built_mtp, declared_mtp) - 1 (declared = config.num_nextn_predict_layers, what the checkpoint says it
    holds) are MTP modules the model did not build: skipped. A layer beyond both is routed as "load" under its
    own name, which no model tensor has, so the caller reports it as unexpected: a checkpoint with more decoder
    layers than its config says is a wrong config, and silently dropping layers would hide that.
    """
    parsed = layer_of(key)
    if parsed is None or parsed[0] < num_hidden_layers:
        return Route("load", key)
    depth, suffix = parsed[0] - num_hidden_layers, parsed[1]
    if depth < built_mtp:
        if suffix in MTP_SHARED_SUFFIXES:
            return Route("duplicate", MTP_SHARED_SUFFIXES[suffix])
        return Route("load", f"model.mtp.{depth}.{suffix}")
    if depth < max(built_mtp, declared_mtp):
        return Route("skip", key)
    return Route("load", key)
