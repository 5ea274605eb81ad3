"""Named model shapes: the real DeepSeek releases, the R1-Distill students, and small "debug" flavours for CPU work
(torchtitan style). `r1forge.auto_config.config_from_preset` builds the right config class for any of them."""

from __future__ import annotations

from typing import Any

_V3_YARN = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}

DEEPSEEK_V3: dict[str, Any] = {
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "first_k_dense_replace": 3,
    "num_attention_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "rope_theta": 10000,
    "rope_scaling": _V3_YARN,
    "max_position_embeddings": 163840,
    "num_nextn_predict_layers": 1,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 0,
    "eos_token_id": 1,
}

DEEPSEEK_V2_LITE: dict[str, Any] = {
    "model_type": "deepseek_v2",
    "vocab_size": 102400,
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "first_k_dense_replace": 1,
    "num_attention_heads": 16,
    "q_lora_rank": None,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
    "n_group": 1,
    "topk_group": 1,
    "scoring_func": "softmax",
    "topk_method": "greedy",
    "norm_topk_prob": False,
    "routed_scaling_factor": 1.0,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
    },
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
}

# Small flavours keep V3's structure (MLA with q low-rank, sigmoid group-limited routing, shared experts,
# a dense first layer, MTP) at sizes a 2-core CPU trains in minutes.
TINY: dict[str, Any] = {
    **DEEPSEEK_V3,
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    "first_k_dense_replace": 1,
    "num_attention_heads": 4,
    "q_lora_rank": 32,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "max_position_embeddings": 1024,
    "rope_scaling": None,
}

# What `make demo` and configs/*_tiny.yaml train: `tiny` widened to 128 and deepened to 1 dense + 3 MoE layers of
# 8 routed experts (top-2 of 2 groups, 1 group kept) + 1 shared expert, one MTP module; ~1.5M parameters with the
# demo's 512-token vocabulary, small enough to learn the built-in arithmetic in minutes on a laptop CPU.
TINY_DEMO: dict[str, Any] = {
    **TINY,
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 4,
    "q_lora_rank": 64,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
}

SMALL: dict[str, Any] = {
    **DEEPSEEK_V3,
    "vocab_size": 2048,
    "hidden_size": 256,
    "intermediate_size": 768,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 4,
    "first_k_dense_replace": 1,
    "num_attention_heads": 8,
    "q_lora_rank": 128,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "n_routed_experts": 16,
    "n_shared_experts": 1,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "max_position_embeddings": 2048,
    "rope_scaling": None,
}

# The R1-Distill students (R1 paper section 2.4), as their config.json files publish them: Qwen2.5 bases
# (q/k/v bias, rope_theta 10000) and Llama 3.1-8B / 3.3-70B (llama3 rope scaling). None ties its embeddings.
_QWEN2_DISTILL: dict[str, Any] = {
    "model_type": "qwen2",
    "vocab_size": 152064,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}
R1_DISTILL_QWEN_1_5B = {**_QWEN2_DISTILL, "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
                        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                        "max_window_layers": 21, "rms_norm_eps": 1e-6}
R1_DISTILL_QWEN_7B = {**_QWEN2_DISTILL, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                      "num_attention_heads": 28, "num_key_value_heads": 4, "max_window_layers": 28,
                      "rms_norm_eps": 1e-6}
R1_DISTILL_QWEN_14B = {**_QWEN2_DISTILL, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 48,
                       "num_attention_heads": 40, "num_key_value_heads": 8, "max_window_layers": 48,
                       "rms_norm_eps": 1e-5}
R1_DISTILL_QWEN_32B = {**_QWEN2_DISTILL, "hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64,
                       "num_attention_heads": 40, "num_key_value_heads": 8, "max_window_layers": 64,
                       "rms_norm_eps": 1e-5}

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
R1_DISTILL_LLAMA_8B: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": _LLAMA3_ROPE,
    "rms_norm_eps": 1e-5,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}
R1_DISTILL_LLAMA_70B = {**R1_DISTILL_LLAMA_8B, "hidden_size": 8192, "intermediate_size": 28672,
                        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8}

# Debug flavours of the students: GQA (3 query heads per kv head), the real families' biases and rope.
TINY_QWEN2 = {**R1_DISTILL_QWEN_1_5B, "vocab_size": 512, "hidden_size": 96, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2, "max_window_layers": 2,
              "max_position_embeddings": 1024, "bos_token_id": 0, "eos_token_id": 1}
TINY_LLAMA = {**R1_DISTILL_LLAMA_8B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 1024, "bos_token_id": 0, "eos_token_id": 1,
              "rope_scaling": {**_LLAMA3_ROPE, "original_max_position_embeddings": 256}}

PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v3": DEEPSEEK_V3,
    "deepseek-r1": DEEPSEEK_V3,
    "deepseek-v2-lite": DEEPSEEK_V2_LITE,
    "tiny": TINY,
    "tiny-demo": TINY_DEMO,
    "small": SMALL,
    "deepseek-r1-distill-qwen-1.5b": R1_DISTILL_QWEN_1_5B,
    "deepseek-r1-distill-qwen-7b": R1_DISTILL_QWEN_7B,
    "deepseek-r1-distill-qwen-14b": R1_DISTILL_QWEN_14B,
    "deepseek-r1-distill-qwen-32b": R1_DISTILL_QWEN_32B,
    "deepseek-r1-distill-llama-8b": R1_DISTILL_LLAMA_8B,
    "deepseek-r1-distill-llama-70b": R1_DISTILL_LLAMA_70B,
    "tiny-qwen2": TINY_QWEN2,
    "tiny-llama": TINY_LLAMA,
}
