"""`r1forge.LLM`: offline batched generation and streaming over the paged-cache engine (vLLM's API)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence as SequenceABC
from pathlib import Path
from typing import Any

import torch

from r1forge.engine.config import EngineConfig
from r1forge.engine.llm_engine import LLMEngine
from r1forge.engine.model_runner import ModelRunner
from r1forge.engine.outputs import RequestOutput, StreamDelta
from r1forge.engine.sampling_params import SamplingParams
from r1forge.model import CausalLM, DeepseekForCausalLM

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
            (`max_num_seqs=`, `block_size=`, `kv_cache_memory=`, `cuda_graphs=`, `tensor_parallel_size=`,
            `enable_expert_parallel=`, ...: the field names), which override the config's.
            `speculative_config={"method": "mtp", "num_speculative_tokens": k}` drafts with the checkpoint's MTP
            module (loaded with it) and verifies losslessly. With tensor_parallel_size=N the engine starts N - 1
            worker processes (`r1forge.engine.executor`); each rank reads its shard from the checkpoint (an
            in-memory model is first saved to a temporary directory). Call `shutdown()` (or let the LLM be
            collected) to end them. Under torchrun (WORLD_SIZE = N) no process is started: rank 0's `LLM` returns
            as usual and the other ranks' `LLM(...)` call serves rank 0's steps until it shuts down, then exits
            the process.
        dtype, device: where and how a checkpoint directory is loaded (default: bf16 on CUDA, fp32 on CPU).
    """

    _directory: Path | None = None

    def __init__(self, model: str | os.PathLike | CausalLM, tokenizer: Any | None = None,
                 config: EngineConfig | None = None, *, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None, **engine_options: Any) -> None:
        config = (config or EngineConfig()).with_options(**engine_options)
        runner_factory: Any = ModelRunner
        self._tmp_checkpoint = None
        if config.tensor_parallel_size > 1:
            model, runner_factory = self._tensor_parallel(model, config, dtype, device)
        elif isinstance(model, (str, os.PathLike)):
            from r1forge.loading import load_model

            directory = self._directory = Path(model)
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
            with_mtp = config.speculative_config is not None
            if with_mtp:
                from r1forge.config import ModelConfig

                if ModelConfig.from_pretrained(directory).num_nextn_predict_layers == 0:
                    raise ValueError(f"speculative_config method 'mtp' needs an MTP module, but the checkpoint "
                                     f"{directory} has none (num_nextn_predict_layers is 0 in its config.json)")
            model = load_model(directory, dtype=dtype, device=device, with_mtp=with_mtp)
        if not isinstance(model, CausalLM):
            raise TypeError(f"model must be a checkpoint directory or an r1forge CausalLM (DeepseekForCausalLM, "
                            f"DenseForCausalLM), got {type(model).__name__}")
        if tokenizer is None and self._directory is not None:
            tokenizer = _load_tokenizer(self._directory)
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.engine = LLMEngine(model, tokenizer, config, runner_factory)
        self.config = self.engine.config
        self.cache_bytes_per_token = self.engine.runner.cache_bytes_per_token

    def _tensor_parallel(self, model: str | os.PathLike | DeepseekForCausalLM, config: EngineConfig,
                         dtype: torch.dtype | None, device: str | torch.device | None) -> tuple[Any, Any]:
        """Rank 0's shard and the runner factory that starts the workers."""
        from functools import partial

        from r1forge.auto_config import load_config
        from r1forge.engine.executor import TensorParallelRunner, checkpoint_dir_of
        from r1forge.engine.rank_shard import load_shard
        from r1forge.engine.torchrun import launched_by_torchrun, serve_torchrun_rank

        if isinstance(model, DeepseekForCausalLM):
            dtype = dtype or model.model.embed_tokens.weight.dtype
            device = device or next(model.parameters()).device
            self._tmp_checkpoint = checkpoint_dir_of(model)
            directory = Path(self._tmp_checkpoint.name)
        elif isinstance(model, (str, os.PathLike)):
            directory = self._directory = Path(model)
            if not directory.is_dir():
                raise FileNotFoundError(f"model directory not found: {directory}")
        else:
            raise TypeError(f"model must be a checkpoint directory or DeepseekForCausalLM, got {type(model).__name__}")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda":
            device = torch.device("cuda", 0)  # rank r uses cuda:r
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        config.check_model(load_config(directory))
        rank = 0
        if launched_by_torchrun():  # every rank runs this script; ranks > 0 serve rank 0 and end here
            rank = int(os.environ["RANK"])
            if device.type == "cuda":
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
            if rank != 0:
                serve_torchrun_rank(directory, config, dtype)
                raise SystemExit(0)
        shard, layout = load_shard(directory, rank, config, dtype, device)
        return shard, partial(TensorParallelRunner, directory=directory, dtype=dtype, layout=layout)

    def update_weights(self, model: CausalLM) -> float:
        """Take `model`'s current weights (a single-device model of the same config, e.g. the policy an RL
        trainer just updated) and drop the stale prefix cache; returns the seconds the hand-over took. On one
        device an engine built over `model` itself shares its weights and only the cache is reset."""
        if self.engine.has_unfinished():
            raise RuntimeError("update_weights with requests in flight would mix old and new weights")
        start = time.perf_counter()
        if hasattr(self.engine.runner, "update_weights"):
            self.engine.runner.update_weights(model)
        elif model is not self.model:
            self.model.load_state_dict(model.state_dict())
        self.engine.block_manager.reset_prefix_cache()
        return time.perf_counter() - start

    def shutdown(self) -> None:
        """End the worker processes of a tensor-parallel engine (a no-op on one device)."""
        self.engine.runner.shutdown()
        if self._tmp_checkpoint is not None:
            self._tmp_checkpoint.cleanup()
            self._tmp_checkpoint = None

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
