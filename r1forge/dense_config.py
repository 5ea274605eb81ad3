"""DenseConfig: the Qwen2 and Llama decoders DeepSeek-R1 was distilled into, with Hugging Face `config.json` keys.

R1-Distill-Qwen-1.5B/7B/14B/32B are Qwen2.5 models and R1-Distill-Llama-8B/70B are Llama 3.1/3.3 models: dense
pre-norm decoders with grouped-query attention (GQA), SwiGLU, RMSNorm and half-split RoPE. The two differ in
little: Qwen2 has q/k/v biases (no o bias); Llama has none by default (`attention_bias` turns on q/k/v/o) and
extends its context with the "llama3" frequency rescaling. Field names are the checkpoint's, so a published
config.json loads unchanged and the one we write loads in transformers (`Qwen2Config`, `LlamaConfig`).

Kept apart from `ModelConfig` (DeepSeek's MLA + MoE) on purpose: one dataclass per architecture, each with
only the keys it means; `r1forge.auto_config` picks the class from `model_type`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from r1forge.config_file import ConfigFile

if TYPE_CHECKING:
    from r1forge.model.cache_spec import CacheSpec

DENSE_MODEL_TYPES = ("qwen2", "llama")
DENSE_ROPE_TYPES = ("default", "linear", "llama3")
_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


@dataclass
class DenseConfig(ConfigFile):
    """A Qwen2 or Llama decoder. Defaults are R1-Distill-Qwen-1.5B's (Qwen2.5-Math-1.5B)."""

    model_type: str = "qwen2"  # "qwen2" (q/k/v bias) or "llama" (bias from attention_bias)
    vocab_size: int = 151936  # tokens in the embedding and head
    hidden_size: int = 1536  # model width D
    intermediate_size: int = 8960  # SwiGLU FFN width
    num_hidden_layers: int = 28  # decoder blocks
    num_attention_heads: int = 12  # query heads H
    num_key_value_heads: int | None = 2  # key/value heads (GQA groups); None means H (multi-head attention)
    head_dim: int | None = None  # per-head width; None means hidden_size // num_attention_heads
    hidden_act: str = "silu"  # SwiGLU activation
    max_position_embeddings: int = 131072  # longest context
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3", factor, low_freq_factor, ...} or None
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_word_embeddings: bool = False  # share embedding and head (the small Qwen2.5 bases do; the distills do not)
    attention_bias: bool = False  # Llama only: bias on q/k/v/o (Qwen2 always has q/k/v bias and no o bias)
    mlp_bias: bool = False  # Llama only: bias on the FFN projections; no published Llama uses it
    use_sliding_window: bool = False  # Qwen2 only: sliding-window attention; off in every Qwen2.5 release
    sliding_window: int | None = None  # Qwen2 only: window width, unused while use_sliding_window is false
    max_window_layers: int | None = None  # Qwen2 only: layers from here on would use the window
    initializer_range: float = 0.02  # std of the random initialisation
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151643
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # dtype the checkpoint was saved in, informational
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # unknown keys, written back unchanged

    # ------------------------------------------------------------------ derived
    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type == "llama" and self.attention_bias

    @property
    def num_kv_groups(self) -> int:
        """Query heads per key/value head (H / H_kv): 1 is multi-head, H is multi-query attention."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def softmax_scale(self) -> float:
        return self.head_dim**-0.5

    @property
    def is_moe(self) -> bool:
        return False

    def cache_spec(self) -> "CacheSpec":
        """GQA caches each kv head's key and value: (2, H_kv, head_dim) per token and layer."""
        from r1forge.model.cache_spec import CacheSpec

        return CacheSpec("gqa", self.num_hidden_layers, (2, self.num_key_value_heads, self.head_dim))

    num_nextn_predict_layers = 0  # no multi-token prediction modules (read by the checkpoint code)

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the key for unknown or inconsistent values."""

        def bad(key: str, msg: str) -> ValueError:
            return ValueError(f"DenseConfig ({self.model_type}): invalid `{key}`: {msg}")

        if self.model_type not in DENSE_MODEL_TYPES:
            raise bad("model_type", f"expected one of {DENSE_MODEL_TYPES}, got {self.model_type!r}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise bad(key, f"must be a positive integer, got {value!r}")
        H, H_kv = self.num_attention_heads, self.num_key_value_heads
        if H % H_kv:
            raise bad("num_key_value_heads", f"num_attention_heads={H} is not a multiple of num_key_value_heads={H_kv}")
        if self.head_dim is None:
            if self.hidden_size % H:
                raise bad("num_attention_heads", f"hidden_size={self.hidden_size} is not divisible by {H} heads "
                          f"(give head_dim explicitly)")
            self.head_dim = self.hidden_size // H
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise bad("head_dim", f"must be a positive even integer (rotary pairs), got {self.head_dim!r}")
        if self.hidden_act != "silu":
            raise bad("hidden_act", f"only 'silu' (SwiGLU) is supported, got {self.hidden_act!r}")
        if self.use_sliding_window:
            raise bad("use_sliding_window", "sliding-window attention is not supported (no Qwen2.5 release uses it)")
        if self.mlp_bias:
            raise bad("mlp_bias", "FFN biases are not supported (no published Llama uses them)")
        if self.rope_type not in DENSE_ROPE_TYPES:
            raise bad("rope_scaling", f"unsupported rope type {self.rope_type!r}; expected one of {DENSE_ROPE_TYPES}")
        required = {"linear": ("factor",),
                    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
        for key in required.get(self.rope_type, ()):
            if key not in self.rope_scaling:
                raise bad(f"rope_scaling.{key}", f"required for {self.rope_type} rope scaling")
        if self.rope_type == "llama3" and not (
                0 < float(self.rope_scaling["low_freq_factor"]) < float(self.rope_scaling["high_freq_factor"])):
            raise bad("rope_scaling.high_freq_factor", "must exceed low_freq_factor (> 0) for llama3 rope scaling")

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "DenseConfig":
        """Read an HF config.json dict: the published form (`rope_theta` + `rope_scaling`) or transformers 5's
        `rope_parameters`; list-valued token ids keep their first entry."""
        raw = dict(raw)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        rope_parameters = raw.pop("rope_parameters", None)
        if rope_parameters:
            rope_parameters = dict(rope_parameters)
            raw.setdefault("rope_theta", rope_parameters.pop("rope_theta", 10000.0))
            if not raw.get("rope_scaling"):
                raw["rope_scaling"] = rope_parameters
        scaling = raw.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
            raw["rope_scaling"] = None
        for key in ("eos_token_id", "bos_token_id"):
            if isinstance(raw.get(key), list):
                raw[key] = raw[key][0] if raw[key] else None
        if "model_type" not in raw:
            raise ValueError("DenseConfig: config has no `model_type` (expected one of "
                             f"{DENSE_MODEL_TYPES})")
        kwargs = {k: v for k, v in raw.items() if k in known}
        extra = {k: v for k, v in raw.items() if k not in known and k != "architectures"}
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The published config.json form (`rope_theta` + `rope_scaling`), which transformers 4 and 5, vLLM and
        SGLang all read."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        out.update({k: v for k, v in self.extra.items() if k not in out})
        out["architectures"] = [_ARCHITECTURES[self.model_type]]
        if self.model_type == "qwen2":
            for key in ("attention_bias", "mlp_bias"):
                out.pop(key)
            for key in ("sliding_window", "max_window_layers"):  # transformers wants an int or no key at all
                if out[key] is None:
                    out.pop(key)
        else:
            for key in ("use_sliding_window", "sliding_window", "max_window_layers"):
                out.pop(key)
        if out["torch_dtype"] is None:
            out.pop("torch_dtype")
        return out

    def replace(self, **changes: Any) -> "DenseConfig":
        return DenseConfig.from_dict({**self.to_dict(), **changes})
