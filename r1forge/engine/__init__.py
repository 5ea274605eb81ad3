"""Inference engine: paged cache (MLA latents or GQA keys/values), weight absorption, continuous batching, prefix sharing, streaming."""

from r1forge.engine.async_llm import AsyncLLM, EngineDeadError, QueueFullError
from r1forge.engine.block_manager import BlockManager
from r1forge.engine.config import EngineConfig
from r1forge.engine.llm import LLM
from r1forge.engine.llm_engine import LLMEngine
from r1forge.engine.outputs import CompletionOutput, RequestOutput, StreamDelta
from r1forge.engine.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput", "StreamDelta", "BlockManager", "AsyncLLM",
           "QueueFullError", "EngineDeadError"]
