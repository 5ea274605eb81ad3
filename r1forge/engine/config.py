"""`EngineConfig`: every knob of the inference engine in one object, resolved once against the model.

`LLM` builds it from its keyword arguments (vLLM's names) and hands it whole to `LLMEngine`, which resolves it
(context length clamped to the model's, pool size from a byte budget) and passes the resolved copy to the
scheduler, the model runner and the fixed-shape decoder. Nothing downstream re-derives a knob.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

import torch

_CPU_DEFAULT_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding with the model's multi-token-prediction module (DeepSeek-V3 section 5.4.3).

    Args:
        method: "mtp", the only drafter: the checkpoint's own MTP module, applied recursively for k > 1.
        num_speculative_tokens: k, tokens drafted per step and verified in one forward of k + 1 positions.
        disable_by_batch_size: speculate only in steps with at most this many running sequences (vLLM's
            `speculative_disable_by_batch_size`); above it the engine decodes plainly, where verifying k + 1
            positions per sequence costs more compute than accepted drafts save. None: always speculate.
    """

    method: str = "mtp"
    num_speculative_tokens: int = 1
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.method != "mtp":
            raise ValueError(f"speculative_config.method must be 'mtp' (the model's own MTP module), got "
                             f"{self.method!r}")
        _check_positive_int("speculative_config.num_speculative_tokens", self.num_speculative_tokens)
        if self.disable_by_batch_size is not None:
            _check_positive_int("speculative_config.disable_by_batch_size", self.disable_by_batch_size)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SpeculativeConfig:
        """From vLLM's dict; an unknown key is a ValueError naming it and the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown speculative_config key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**raw)


@dataclass(frozen=True)
class EngineConfig:
    """Args:
        max_num_seqs: sequences decoded together at most.
        max_num_batched_tokens: token budget of one step (prefill chunks + decodes).
        max_model_len: longest sequence (prompt + output); default and upper bound: the model's
            `max_position_embeddings`.
        block_size: tokens per cache block (64, FlashMLA's page size).
        kv_cache_memory: bytes for the KV pool (MLA latents or GQA keys/values); default: what max_num_seqs full-length sequences need,
            capped at 1 GiB on CPU or 90% of free memory on a GPU. Ignored when `num_blocks` is given.
        num_blocks: cache blocks sequences may own (instead of a byte budget).
        enable_prefix_caching: share the cached latents of identical prompt prefixes (hash per full block).
        absorbed: MLA's attention backend: weight-absorbed latent attention (True) or the naive expand-K/V path
            (False). A GQA model (Qwen2, Llama) has one backend and ignores it.
        static_decode: run pure-decode steps at fixed, bucketed shapes (`StaticDecoder`); implied by
            `cuda_graphs` and `compile`. Eager on its own: what the CPU tests of the graph path run.
        cuda_graphs: capture fixed-shape decode steps as CUDA graphs and replay them. CUDA only.
        compile: run fixed-shape decode steps through `torch.compile` (CPU and GPU).
        speculative_config: draft with the model's own MTP module and verify losslessly (vLLM's spelling:
            {"method": "mtp", "num_speculative_tokens": k}); a dict or a `SpeculativeConfig`. None: off.
        tensor_parallel_size: processes the model is sharded over (attention heads, MLP and expert widths);
            the engine starts the N - 1 workers itself (`r1forge.engine.executor`). 1: single device.
        enable_expert_parallel: with tensor_parallel_size > 1, split the routed experts over the ranks (the
            all-to-all dispatcher) instead of sharding every expert's width.
        worker_timeout_s: how long rank 0 waits for a worker (start-up, a collective of one step) before the
            engine reports it failed; also the process group's timeout.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    max_model_len: int | None = None
    block_size: int = 64
    kv_cache_memory: int | None = None
    num_blocks: int | None = None
    enable_prefix_caching: bool = True
    absorbed: bool = True
    static_decode: bool = False
    cuda_graphs: bool = False
    compile: bool = False
    speculative_config: SpeculativeConfig | None = None
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False
    worker_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if isinstance(self.speculative_config, dict):
            object.__setattr__(self, "speculative_config", SpeculativeConfig.from_dict(self.speculative_config))
        elif self.speculative_config is not None and not isinstance(self.speculative_config, SpeculativeConfig):
            raise ValueError(f"speculative_config must be a dict or SpeculativeConfig, got "
                             f"{type(self.speculative_config).__name__}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size"):
            _check_positive_int(name, getattr(self, name))
        for name in ("max_model_len", "kv_cache_memory", "num_blocks"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if not self.worker_timeout_s > 0:
            raise ValueError(f"worker_timeout_s must be positive, got {self.worker_timeout_s!r}")
        if self.tensor_parallel_size > 1 and self.speculative_config is not None:
            raise ValueError("tensor_parallel_size > 1 with speculative_config is not supported: the MTP drafter "
                             "runs single-device only")
        if self.tensor_parallel_size > 1 and self.uses_static_decode:
            raise ValueError("tensor_parallel_size > 1 runs eager steps: static_decode, cuda_graphs and compile "
                             "are single-device only")

    def check_model(self, model_config: Any) -> None:
        """The model's shapes must split over `tensor_parallel_size` ranks; a ValueError names the field."""
        tp = self.tensor_parallel_size
        if tp == 1:
            return
        if getattr(model_config, "model_type", None) not in ("deepseek_v3", "deepseek_v2"):
            raise ValueError(f"tensor_parallel_size={tp} shards DeepSeek (MLA) models only, got model_type "
                             f"{getattr(model_config, 'model_type', None)!r}")
        widths = {"num_attention_heads": model_config.num_attention_heads}
        if any(not model_config.is_moe_layer(i) for i in range(model_config.num_hidden_layers)):
            widths["intermediate_size"] = model_config.intermediate_size
        if model_config.n_routed_experts:
            widths["n_shared_experts * moe_intermediate_size"] = \
                (model_config.n_shared_experts or 0) * model_config.moe_intermediate_size
            if self.enable_expert_parallel:
                widths["n_routed_experts"] = model_config.n_routed_experts
            else:
                widths["moe_intermediate_size"] = model_config.moe_intermediate_size
        for name, value in widths.items():
            if value % tp:
                raise ValueError(f"tensor_parallel_size={tp} does not divide the model's {name} ({value})")

    def with_options(self, **options: Any) -> EngineConfig:
        """This config with some fields changed; an unknown name is a TypeError naming it and the known ones."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **options) if options else self

    @property
    def uses_static_decode(self) -> bool:
        return self.static_decode or self.cuda_graphs or self.compile

    @property
    def pool_blocks(self) -> int:
        """Blocks in the pool tensors: `num_blocks`, plus the null block a fixed-shape step pads into."""
        assert self.num_blocks is not None, "resolve the config against the model first"
        return self.num_blocks + self.uses_static_decode

    def resolve(self, model_max_len: int, cache_bytes_per_token: int, device: torch.device) -> EngineConfig:
        """Clamp `max_model_len` to the model's and size the pool: the copy every engine part reads."""
        max_len = min(self.max_model_len or model_max_len, model_max_len)
        num_blocks = self.num_blocks
        if num_blocks is None:
            per_block = cache_bytes_per_token * self.block_size
            budget = self.kv_cache_memory
            if budget is None:
                if device.type == "cuda":
                    free, _ = torch.cuda.mem_get_info(device)
                    cap = int(free * 0.9)
                else:
                    cap = _CPU_DEFAULT_CACHE_BYTES
                budget = min(cap, self.max_num_seqs * (max_len + self.block_size) * cache_bytes_per_token)
            # A fixed-shape decode step keeps one block of the budget for its padding rows.
            num_blocks = int(budget // per_block) - self.uses_static_decode
            if num_blocks < 1:
                raise ValueError(f"kv_cache_memory={budget} bytes is less than one cache block ({per_block} bytes)")
        return dataclasses.replace(self, max_model_len=max_len, num_blocks=num_blocks)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
