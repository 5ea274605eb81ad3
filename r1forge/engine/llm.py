"""`r1forge.LLM`: offline batched generation and streaming over the paged-cache engine (vLLM's API)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence as SequenceABC
from pathlib import Path
from typing import Any

import torch

from r1forge.engine.config import EngineConfig
from r1forge.engine.llm_engine import LLMEngine
from r1forge.engine.outputs import RequestOutput, StreamDelta
from r1forge.engine.sampling_params import SamplingParams
from r1forge.model import CausalLM

def _load_tokenizer(directory: Path) -> Any | None:
    if not (directory / "tokenizer.json").exists():
        return None
    from r1forge.data import load_tokenizer

    return load_tokenizer(directory)


class LLM:
    """Generate with a DeepSeek-V2/V3/R1 model or a dense R1-Distill student (Qwen2, Llama).

    Args:
        model: a checkpoint directory or a model (`DeepseekForCausalLM`, `DenseForCausalLM`).
        tokenizer: r1forge `Tokenizer` (or anything with encode/decode/eos_token_id); loaded from the
            directory when it holds a tokenizer.json.
        config: the engine's options as one `EngineConfig`; or give them as keyword arguments
            (`max_num_seqs=`, `block_size=`, `kv_cache_memory=`, `cuda_graphs=`, ...: the field names), which
            override the config's. `speculative_config={"method": "mtp", "num_speculative_tokens": k}` drafts
            with the checkpoint's MTP module (loaded with it) and verifies losslessly.
        dtype, device: where and how a checkpoint directory is loaded (default: bf16 on CUDA, fp32 on CPU).
    """

    def __init__(self, model: str | os.PathLike | CausalLM, tokenizer: Any | None = None,
                 config: EngineConfig | None = None, *, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None, **engine_options: Any) -> None:
        config = (config or EngineConfig()).with_options(**engine_options)
        if isinstance(model, (str, os.PathLike)):
            from r1forge.loading import load_model

            directory = Path(model)
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
            with_mtp = config.speculative_config is not None
            if with_mtp:
                from r1forge.config import ModelConfig

                if ModelConfig.from_pretrained(directory).num_nextn_predict_layers == 0:
                    raise ValueError(f"speculative_config method 'mtp' needs an MTP module, but the checkpoint "
                                     f"{directory} has none (num_nextn_predict_layers is 0 in its config.json)")
            model = load_model(directory, dtype=dtype, device=device, with_mtp=with_mtp)
            if tokenizer is None:
                tokenizer = _load_tokenizer(directory)
        if not isinstance(model, CausalLM):
            raise TypeError(f"model must be a checkpoint directory or an r1forge CausalLM (DeepseekForCausalLM, "
                            f"DenseForCausalLM), got {type(model).__name__}")
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.engine = LLMEngine(model, tokenizer, config)
        self.config = self.engine.config
        self.cache_bytes_per_token = self.engine.runner.cache_bytes_per_token

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
