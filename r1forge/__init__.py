"""r1forge: an open implementation of the DeepSeek-R1 system (DeepSeek-V3 and its dense R1-Distill students)."""

from r1forge.accounting import CacheBytes, count_parameters, kv_cache_bytes_per_token
from r1forge.auto_config import config_from_preset, load_config
from r1forge.config import ModelConfig
from r1forge.dense_config import DenseConfig
from r1forge.engine import LLM, CompletionOutput, EngineConfig, RequestOutput, SamplingParams, StreamDelta
from r1forge.loading import load_model
from r1forge.model import CausalLM, DeepseekForCausalLM, DenseForCausalLM, build_model

__version__ = "0.1.0"

__all__ = [
    "ModelConfig", "DenseConfig", "load_config", "config_from_preset", "CausalLM", "DenseForCausalLM",
    "count_parameters", "kv_cache_bytes_per_token", "CacheBytes", "load_model", "build_model",
    "DeepseekForCausalLM", "LLM", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput", "StreamDelta",
    "__version__",
]
