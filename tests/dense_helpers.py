"""Tiny, fully randomised transformers Qwen2 / Llama models (the R1-Distill families) for the dense tests.

    from dense_helpers import build_hf_dense, make_dense_checkpoint
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from conftest import randomise_

# GQA 3:1, q/k/v bias (Qwen2), untied like the distills.
TINY_QWEN2_HF: dict[str, Any] = dict(
    vocab_size=256, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
    num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=0,
)
# GQA 2:1, llama3 rope scaling with an original context short enough that all three wavelength bands occur.
TINY_LLAMA_HF: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
    bos_token_id=0, eos_token_id=1, pad_token_id=0,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
)


def build_hf_dense(family: str = "qwen2", seed: int = 0, std: float = 0.2, **overrides: Any):
    """A randomised transformers `Qwen2ForCausalLM` ("qwen2") or `LlamaForCausalLM` ("llama") in eval mode,
    every parameter (biases and norms included) overwritten by `randomise_`."""
    import transformers

    if family == "qwen2":
        config_cls, model_cls, base = transformers.Qwen2Config, transformers.Qwen2ForCausalLM, TINY_QWEN2_HF
    elif family == "llama":
        config_cls, model_cls, base = transformers.LlamaConfig, transformers.LlamaForCausalLM, TINY_LLAMA_HF
    else:
        raise ValueError(f"family must be 'qwen2' or 'llama', got {family!r}")
    torch.manual_seed(seed)
    config = config_cls(**{**base, **overrides})
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    return randomise_(model, std=std, seed=seed)


def make_dense_checkpoint(path: str | Path, family: str = "qwen2", seed: int = 0, std: float = 0.2,
                          **overrides: Any) -> Path:
    """`build_hf_dense(...)` saved with transformers' `save_pretrained` (fp32 safetensors) into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_hf_dense(family, seed=seed, std=std, **overrides).save_pretrained(path)
    return path


# DeepSeek-R1-Distill's chat template as its tokenizer_config.json ships it (the revision whose generation prompt
# opens `<think>\n`): the R1 turn markers on top of the Qwen2.5 / Llama 3 vocabulary.
R1_DISTILL_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}"
    "{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    "{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)


def make_r1_distill_tokenizer(directory: str | Path, texts: list[str], vocab_size: int = 420) -> Path:
    """A byte-level BPE tokenizer.json plus an R1-Distill tokenizer_config.json (the fields the distills ship:
    bos/eos as the R1 markers, add_bos_token, LlamaTokenizerFast, the chat template above)."""
    import json

    from r1forge.data import train_tokenizer
    from r1forge.data.chat_template import BOS, EOS

    directory = Path(train_tokenizer(None, directory, vocab_size=vocab_size, texts=texts))
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
              "clean_up_tokenization_spaces": False, "legacy": True, "model_max_length": 16384,
              "tokenizer_class": "LlamaTokenizerFast", "chat_template": R1_DISTILL_CHAT_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
    for extra in directory.glob("chat_template.jinja"):
        extra.unlink()
    return directory
