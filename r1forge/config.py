"""ModelConfig: the DeepSeek-V2/V3/R1 architecture, with Hugging Face `config.json` key names.

The field names are the checkpoint's so that a real `config.json` loads with no mapping table, and the
config we write loads in transformers (`DeepseekV3Config`). Both rope forms are read: the older
`rope_theta` + `rope_scaling` (with `type` or `rope_type`) and transformers 5's `rope_parameters`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from r1forge.config_file import ConfigFile

if TYPE_CHECKING:
    from r1forge.model.cache_spec import CacheSpec

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
ROPE_TYPES = ("default", "yarn")
DEEPSEEK_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
# Key types, checked before any comparison (ModelConfig._validate_types).
_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings")
_NON_NEGATIVE_INTS = ("qk_nope_head_dim", "first_k_dense_replace", "num_nextn_predict_layers")
_OPTIONAL_INTS = ("q_lora_rank", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group",
                  "topk_group")  # null allowed
_OPTIONAL_POSITIVE = ("q_lora_rank", "n_group", "topk_group")  # when not null
_POSITIVE_FLOATS = ("rms_norm_eps", "rope_theta", "routed_scaling_factor")
_NON_NEGATIVE_FLOATS = ("initializer_range",)
_BOOLS = ("norm_topk_prob", "rope_interleave", "tie_word_embeddings", "attention_bias")
_STRINGS = ("model_type", "scoring_func", "topk_method", "hidden_act")


def _finite(value: Any) -> bool:
    """A real finite number (int or float, not a bool or a numeric string)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class ModelConfig(ConfigFile):
    """DeepSeek-V3 style configuration (docs/design.md section 2). Defaults are DeepSeek-V3's."""

    model_type: str = "deepseek_v3"  # "deepseek_v3" or "deepseek_v2"; decides the transformers class we write for
    vocab_size: int = 129280  # tokens in the embedding and head
    hidden_size: int = 7168  # model width d
    intermediate_size: int = 18432  # FFN width of the dense layers
    moe_intermediate_size: int = 2048  # FFN width of one routed or shared expert
    num_hidden_layers: int = 61  # transformer blocks (not counting MTP modules)
    first_k_dense_replace: int = 3  # the first k layers use a dense FFN, the rest MoE
    num_attention_heads: int = 128  # n_h
    num_key_value_heads: int | None = None  # kept for transformers; MLA has no GQA, always equals n_h
    q_lora_rank: int | None = 1536  # d_c'; None means a plain q_proj
    kv_lora_rank: int = 512  # d_c, the latent that is cached
    qk_nope_head_dim: int = 128  # per-head non-positional query/key width
    qk_rope_head_dim: int = 64  # decoupled RoPE width, one key shared by all heads
    v_head_dim: int = 128  # per-head value width
    n_routed_experts: int | None = 256  # None means no MoE layers at all (a dense model)
    n_shared_experts: int | None = 1  # always-on experts, fused into one MLP of n_shared * moe_intermediate_size
    num_experts_per_tok: int | None = 8  # top-k routed experts per token
    n_group: int | None = 8  # expert groups for group-limited routing
    topk_group: int | None = 4  # groups kept per token
    scoring_func: str = "sigmoid"  # router score: sigmoid (V3) or softmax (V2)
    topk_method: str = "noaux_tc"  # noaux_tc (V3, uses e_score_correction_bias), greedy, group_limited_greedy (V2)
    norm_topk_prob: bool = True  # renormalise the k gate values to sum to 1
    routed_scaling_factor: float = 2.5  # multiplies the routed experts' output
    hidden_act: str = "silu"  # SwiGLU activation
    max_position_embeddings: int = 163840  # longest context
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: dict[str, Any] | None = None  # {"type"/"rope_type": "yarn", factor, original_max_position_embeddings, ...}
    rope_interleave: bool = True  # checkpoint's rope dims are interleaved pairs (DeepSeek's layout)
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    num_nextn_predict_layers: int = 0  # MTP modules in the checkpoint
    tie_word_embeddings: bool = False  # share embedding and head
    initializer_range: float = 0.02  # std of the random initialisation
    attention_bias: bool = False  # DeepSeek never uses it; kept for checkpoints that set it false explicitly
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # dtype the checkpoint was saved in, informational
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # unknown keys, written back unchanged

    # ------------------------------------------------------------------ derived
    @property
    def latent_dim(self) -> int:
        """d_c + d_h^R: what MLA caches per token and layer (the compressed KV latent and the shared rope key)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def cache_spec(self) -> "CacheSpec":
        """MLA caches one latent row per token and layer: c_kv and the shared rope key (C + R numbers)."""
        from r1forge.model.cache_spec import CacheSpec

        return CacheSpec("mla", self.num_hidden_layers, (self.latent_dim,))

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_moe(self) -> bool:
        return bool(self.n_routed_experts) and self.first_k_dense_replace < self.num_hidden_layers

    def is_moe_layer(self, layer_idx: int) -> bool:
        return bool(self.n_routed_experts) and layer_idx >= self.first_k_dense_replace

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def softmax_scale(self) -> float:
        """(d_h + d_h^R)^-0.5, times mscale^2 under YaRN with mscale_all_dim (docs/design.md section 3.5)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_type == "yarn":
            factor = float(self.rope_scaling.get("factor", 1.0))
            mscale_all_dim = float(self.rope_scaling.get("mscale_all_dim", 0) or 0)
            if mscale_all_dim and factor > 1:
                m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
                scale = scale * m * m
        return scale

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        # MLA has no key/value head groups: every head reads the one latent. The key only exists for transformers,
        # whose V3 config defaults it to 128 whatever the head count, so it is normalised, not validated.
        self.num_key_value_heads = self.num_attention_heads
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise ValueError(f"ModelConfig: invalid `rope_scaling`: must be null or a mapping, got "
                                 f"{self.rope_scaling!r}")
            self.rope_scaling = dict(self.rope_scaling)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the key for unknown or inconsistent values.

        Types first (a string, a null or a NaN where a size belongs is a one-line error naming the key, never a
        TypeError from a comparison further on), then ranges, then the relations between keys.
        """

        def bad(key: str, msg: str) -> ValueError:
            return ValueError(f"ModelConfig: invalid `{key}`: {msg}")

        self._validate_types(bad)
        if self.model_type not in DEEPSEEK_MODEL_TYPES:
            hint = " (a dense model: read it with r1forge.auto_config.config_from_dict or DenseConfig)" \
                if self.model_type in ("qwen2", "llama") else ""
            raise bad("model_type", f"expected one of {DEEPSEEK_MODEL_TYPES}, got {self.model_type!r}{hint}")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", f"must be even for rotary pairs, got {self.qk_rope_head_dim}")
        if self.hidden_act != "silu":
            raise bad("hidden_act", f"only 'silu' (SwiGLU) is supported, got {self.hidden_act!r}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise bad("first_k_dense_replace", f"must be in [0, num_hidden_layers={self.num_hidden_layers}], "
                      f"got {self.first_k_dense_replace}")
        if self.first_k_dense_replace < self.num_hidden_layers and not self.n_routed_experts:
            # A config without routed experts is a dense model; every layer uses the dense FFN.
            self.first_k_dense_replace = self.num_hidden_layers
        if self.n_routed_experts:
            self._validate_moe(bad)
        if self.rope_type not in ROPE_TYPES:
            raise bad("rope_scaling", f"unsupported rope type {self.rope_type!r}; expected one of {ROPE_TYPES}")
        if self.rope_type == "yarn":
            for key in ("factor", "original_max_position_embeddings"):
                if key not in self.rope_scaling:
                    raise bad(f"rope_scaling.{key}", "required for yarn rope scaling")
            for key, value in self.rope_scaling.items():
                if key not in ("type", "rope_type") and not _finite(value):
                    raise bad(f"rope_scaling.{key}", f"must be a finite number, got {value!r}")
            if float(self.rope_scaling["factor"]) < 1:
                raise bad("rope_scaling.factor", f"must be >= 1, got {self.rope_scaling['factor']}")

    def _validate_types(self, bad) -> None:
        """Each key's type and sign; NaN and inf are refused wherever a number belongs."""
        for key in _POSITIVE_INTS + _NON_NEGATIVE_INTS + _OPTIONAL_INTS:
            value = getattr(self, key)
            if value is None and key in _OPTIONAL_INTS:
                continue
            low = 1 if key in _POSITIVE_INTS or key in _OPTIONAL_POSITIVE else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                kind = "a positive integer" if low else "a non-negative integer"
                raise bad(key, f"must be {'null or ' if key in _OPTIONAL_INTS else ''}{kind}, got {value!r}")
        for key in _POSITIVE_FLOATS + _NON_NEGATIVE_FLOATS:
            value = getattr(self, key)
            if not _finite(value) or value < 0 or (key in _POSITIVE_FLOATS and value == 0):
                kind = "positive" if key in _POSITIVE_FLOATS else "non-negative"
                raise bad(key, f"must be a finite {kind} number, got {value!r}")
        for key in _BOOLS:
            if not isinstance(getattr(self, key), bool):
                raise bad(key, f"must be true or false, got {getattr(self, key)!r}")
        for key in _STRINGS:
            if not isinstance(getattr(self, key), str):
                raise bad(key, f"must be a string, got {getattr(self, key)!r}")
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise bad(key, f"must be null or an integer token id, got {value!r}")

    def _validate_moe(self, bad) -> None:
        if self.scoring_func not in SCORING_FUNCS:
            raise bad("scoring_func", f"unknown scoring function {self.scoring_func!r}; expected one of {SCORING_FUNCS}")
        if self.topk_method not in TOPK_METHODS:
            raise bad("topk_method", f"unknown top-k method {self.topk_method!r}; expected one of {TOPK_METHODS}")
        if not self.num_experts_per_tok or self.num_experts_per_tok > self.n_routed_experts:
            raise bad("num_experts_per_tok", f"must be in [1, n_routed_experts={self.n_routed_experts}], "
                      f"got {self.num_experts_per_tok}")
        n_group = self.n_group or 1
        topk_group = self.topk_group or 1
        if n_group <= 0 or self.n_routed_experts % n_group:
            raise bad("n_group", f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={n_group}")
        if topk_group <= 0 or topk_group > n_group:
            raise bad("topk_group", f"must be in [1, n_group={n_group}], got {topk_group}")
        if self.topk_method in ("noaux_tc", "group_limited_greedy"):
            per_group = self.n_routed_experts // n_group
            if self.topk_method == "noaux_tc" and per_group < 2 and n_group > 1:
                raise bad("n_group", f"noaux_tc scores a group by its top-2 experts, but each group has {per_group}")
            if self.num_experts_per_tok > topk_group * per_group:
                raise bad("num_experts_per_tok", f"{self.num_experts_per_tok} experts cannot be chosen from "
                          f"topk_group={topk_group} groups of {per_group}")

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Read an HF config.json dict (transformers 4 or 5 form, V2 or V3)."""
        if not isinstance(raw, dict):
            raise ValueError(f"ModelConfig: config.json must hold a mapping of keys, got {type(raw).__name__}")
        raw = dict(raw)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        rope_parameters = raw.pop("rope_parameters", None)
        for key, value in (("rope_parameters", rope_parameters), ("rope_scaling", raw.get("rope_scaling"))):
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"ModelConfig: invalid `{key}`: must be null or a mapping, got {value!r}")
        if rope_parameters:
            rope_parameters = dict(rope_parameters)
            raw.setdefault("rope_theta", rope_parameters.pop("rope_theta", 10000.0))
            rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
            if rope_type != "default" and not raw.get("rope_scaling"):
                raw["rope_scaling"] = rope_parameters
        if raw.get("rope_scaling") and raw["rope_scaling"].get("rope_type", raw["rope_scaling"].get("type")) == "default":
            raw["rope_scaling"] = None
        if "num_mtp_layers" in raw and "num_nextn_predict_layers" not in raw:
            raw["num_nextn_predict_layers"] = raw.pop("num_mtp_layers")
        model_type = raw.get("model_type", "deepseek_v3")
        if model_type == "deepseek_v2":
            # transformers' V2 config has no scoring_func / rope_interleave: V2 is softmax-scored, interleaved rope.
            raw.setdefault("scoring_func", "softmax")
            raw.setdefault("topk_method", "greedy")
            raw.setdefault("norm_topk_prob", False)
            raw.setdefault("routed_scaling_factor", 1.0)
        for key in ("eos_token_id", "bos_token_id"):
            if isinstance(raw.get(key), list):
                raw[key] = raw[key][0] if raw[key] else None
        kwargs = {k: v for k, v in raw.items() if k in known}
        extra = {k: v for k, v in raw.items() if k not in known}
        for key in ("n_group", "topk_group"):
            if kwargs.get(key) is None and kwargs.get("n_routed_experts"):
                kwargs[key] = 1
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """config.json dict that both DeepSeek's code and transformers 5 read."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        out.update({k: v for k, v in self.extra.items() if k not in out})
        out["architectures"] = ["DeepseekV2ForCausalLM" if self.model_type == "deepseek_v2" else "DeepseekV3ForCausalLM"]
        rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope.update({k: v for k, v in self.rope_scaling.items() if k not in ("type", "rope_type")})
        out["rope_parameters"] = rope
        if out["torch_dtype"] is None:
            out.pop("torch_dtype")
        out.pop("rope_scaling")
        out.pop("rope_theta")
        return out

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        from r1forge.presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
        if PRESETS[name].get("model_type", "deepseek_v3") not in DEEPSEEK_MODEL_TYPES:
            raise ValueError(f"preset {name!r} is a {PRESETS[name]['model_type']} model, not DeepSeek: use "
                             f"r1forge.auto_config.config_from_preset")
        return cls.from_dict({**PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> "ModelConfig":
        return ModelConfig.from_dict({**self.to_dict(), **changes})
