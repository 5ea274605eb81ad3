"""`r1forge.LLM`: offline batched generation and streaming over the latent-cache engine (vLLM's API)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence as SequenceABC
from pathlib import Path
from typing import Any

import torch

from r1forge.engine.llm_engine import LLMEngine
from r1forge.engine.model_runner import cache_bytes_per_token
from r1forge.engine.outputs import RequestOutput, StreamDelta
from r1forge.engine.sampling_params import SamplingParams
from r1forge.model import DeepseekForCausalLM

_CPU_DEFAULT_CACHE_BYTES = 1 << 30


def _load_tokenizer(directory: Path) -> Any | None:
    if not (directory / "tokenizer.json").exists():
        return None
    from r1forge.data import load_tokenizer

    return load_tokenizer(directory)


class LLM:
    """Generate with a DeepSeek-V2/V3/R1 model.

    Args:
        model: a checkpoint directory or a `DeepseekForCausalLM`.
        tokenizer: r1forge `Tokenizer` (or anything with encode/decode/eos_token_id); loaded from the
            directory when it holds a tokenizer.json.
        max_num_seqs: sequences decoded together at most.
        kv_cache_memory: bytes for the latent pool; default: what max_num_seqs full-length sequences need,
            capped at 1 GiB on CPU or 90% of free memory on a GPU.
        block_size: tokens per cache block (64, FlashMLA's page size).
        max_num_batched_tokens: token budget of one step (prefill chunks + decodes).
        absorbed: weight-absorbed latent attention (True) or the naive expand-K/V path (False).
        cuda_graphs: capture decode steps as CUDA graphs (padded to batch and context buckets) and replay
            them: one launch per step instead of hundreds. CUDA only; off by default.
        compile: run decode steps through `torch.compile` (dynamic shapes). Works on CPU and GPU; off by
            default (on this project's CPU it does not pay for its compile time on short runs).
    """

    def __init__(self, model: str | os.PathLike | DeepseekForCausalLM, tokenizer: Any | None = None,
                 max_num_seqs: int = 256, kv_cache_memory: int | None = None, block_size: int = 64,
                 max_num_batched_tokens: int = 4096, max_model_len: int | None = None,
                 dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                 enable_prefix_caching: bool = True, absorbed: bool = True, cuda_graphs: bool = False,
                 compile: bool = False) -> None:
        if isinstance(model, (str, os.PathLike)):
            from r1forge.loading import load_model

            directory = Path(model)
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
            model = load_model(directory, dtype=dtype, device=device)
            if tokenizer is None:
                tokenizer = _load_tokenizer(directory)
        if not isinstance(model, DeepseekForCausalLM):
            raise TypeError(f"model must be a checkpoint directory or DeepseekForCausalLM, got {type(model).__name__}")
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        cache_dtype = model.model.embed_tokens.weight.dtype
        self.cache_bytes_per_token = cache_bytes_per_token(model, cache_dtype)
        max_len = min(max_model_len or model.config.max_position_embeddings, model.config.max_position_embeddings)
        per_block = self.cache_bytes_per_token * block_size
        if kv_cache_memory is None:
            device_ = next(model.parameters()).device
            if device_.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device_)
                cap = int(free * 0.9)
            else:
                cap = _CPU_DEFAULT_CACHE_BYTES
            kv_cache_memory = min(cap, max_num_seqs * (max_len + block_size) * self.cache_bytes_per_token)
        # A fixed-shape decode step keeps one block of the budget for its padding rows.
        num_blocks = int(kv_cache_memory // per_block) - (cuda_graphs or compile)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={kv_cache_memory} bytes is less than one cache block ({per_block} bytes)")
        self.engine = LLMEngine(model, tokenizer, num_blocks, block_size, max_num_seqs,
                                max(max_num_batched_tokens, 1), max_len, enable_prefix_caching, absorbed,
                                cuda_graphs=cuda_graphs, compile=compile)

    # ------------------------------------------------------------------ offline generation
    def generate(self, prompts: str | list[int] | SequenceABC[str | list[int]],
                 params: SamplingParams | SequenceABC[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for every prompt (strings need a tokenizer; or lists of token ids). Order is kept."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        param_list = list(params) if isinstance(params, SequenceABC) else [params] * len(prompts)
        if len(param_list) != len(prompts):
            raise ValueError(f"got {len(param_list)} SamplingParams for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p in zip(prompts, param_list):
                ids.append(self.engine.add_request(prompt, p))
        except ValueError:
            for rid in ids:
                self.engine.abort(rid)
            raise
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generate", unit="req")
        pending = set(ids)
        while pending:
            for delta in self.engine.step():
                if delta.request_id in pending and self.engine.requests[delta.request_id].finished:
                    pending.discard(delta.request_id)
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [self.engine.pop_finished(rid) for rid in ids]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Yield deltas (new token ids and text) of one request as they are generated."""
        rid = self.engine.add_request(prompt, params or SamplingParams())
        try:
            while True:
                for delta in self.engine.step():
                    if delta.request_id == rid:
                        yield delta
                if self.engine.requests[rid].finished:
                    break
        finally:
            if rid in self.engine.requests:
                if not self.engine.requests[rid].finished:
                    self.engine.abort(rid)
                else:
                    self.engine.pop_finished(rid)

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None,
             **template_kwargs: Any) -> RequestOutput:
        """Apply the tokenizer's chat template and generate the assistant's reply."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer with a chat template")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs)
        return self.generate([list(ids)], params)[0]

    def stats(self) -> dict[str, float]:
        return self.engine.stats()

    def reset_prefix_cache(self) -> None:
        """Call after changing the model's weights (RL training does): cached latents are stale."""
        if self.engine.has_unfinished():
            raise RuntimeError("reset_prefix_cache with requests in flight would mix old and new weights")
        self.engine.block_manager.reset_prefix_cache()
