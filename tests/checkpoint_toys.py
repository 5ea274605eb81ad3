"""Toy models and file helpers shared by the tests/test_checkpoint_*.py files.

`ToyModel` is a few-kilobyte nn.Module with DeepSeek's key names (attention, router with its float32
`e_score_correction_bias` buffer, experts, MTP at `model.mtp.{k}`) and a `.config` stub: tests built on it
depend on the checkpoint code alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from r1forge.checkpoint import quantize_fp8_blockwise


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


FP8_TOY = dict(hidden=300, kv=576, o=(200, 130), experts=1, inter=20, vocab=8)
FP8_KEYS = ["model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "model.layers.0.self_attn.o_proj.weight",
            "model.layers.1.self_attn.kv_a_proj_with_mqa.weight", "model.layers.1.mlp.experts.0.up_proj.weight"]


def fp8_tensors(model: nn.Module, keys: list[str] = FP8_KEYS) -> dict[str, torch.Tensor]:
    """The model's state dict with `keys` stored as DeepSeek does: FP8 weight + float32 `weight_scale_inv`."""
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    for key in keys:
        tensors[key], tensors[key + "_scale_inv"] = quantize_fp8_blockwise(tensors[key])
    return tensors
