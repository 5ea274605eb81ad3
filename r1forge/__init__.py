"""r1forge: an open implementation of the DeepSeek-R1 system."""

from r1forge.accounting import CacheBytes, count_parameters, kv_cache_bytes_per_token
from r1forge.config import ModelConfig
from r1forge.engine import LLM, CompletionOutput, EngineConfig, RequestOutput, SamplingParams, StreamDelta
from r1forge.loading import load_model
from r1forge.model import DeepseekForCausalLM, build_model

__version__ = "0.1.0"

__all__ = [
    "ModelConfig", "count_parameters", "kv_cache_bytes_per_token", "CacheBytes", "load_model", "build_model",
    "DeepseekForCausalLM", "LLM", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput", "StreamDelta",
    "__version__",
]
