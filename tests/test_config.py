"""ModelConfig: the three rope forms real config.json files use, the presets, and errors that name the key."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from r1forge import ModelConfig
from r1forge.model.rope import rope_frequencies
from r1forge.presets import DEEPSEEK_V3, PRESETS, TINY

YARN = {"factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 1.0}


def _without_rope(raw: dict) -> dict:
    return {k: v for k, v in raw.items() if k not in ("rope_theta", "rope_scaling", "rope_parameters")}


def _rope_forms(theta: float, scaling: dict | None) -> dict[str, dict]:
    """The same rope written as transformers 4 (`type`), DeepSeek's later files (`rope_type`) and transformers 5."""
    base = _without_rope(DEEPSEEK_V3)
    if scaling is None:
        return {
            "rope_theta only": {**base, "rope_theta": theta},
            "rope_scaling null": {**base, "rope_theta": theta, "rope_scaling": None},
            "rope_parameters": {**base, "rope_parameters": {"rope_type": "default", "rope_theta": theta}},
        }
    return {
        "rope_scaling.type": {**base, "rope_theta": theta, "rope_scaling": {"type": "yarn", **scaling}},
        "rope_scaling.rope_type": {**base, "rope_theta": theta, "rope_scaling": {"rope_type": "yarn", **scaling}},
        "rope_parameters": {**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": theta, **scaling}},
    }


@pytest.mark.parametrize("scaling", [YARN, None], ids=["yarn", "default"])
def test_rope_forms_give_same_frequencies(scaling):
    configs = {name: ModelConfig.from_dict(raw) for name, raw in _rope_forms(50000.0, scaling).items()}
    reference = rope_frequencies(ModelConfig(rope_theta=50000.0, rope_scaling=scaling and {"type": "yarn", **scaling}))
    for name, config in configs.items():
        assert config.rope_theta == 50000.0, name
        assert config.rope_type == ("yarn" if scaling else "default"), name
        inv_freq, attention_factor = rope_frequencies(config)
        assert torch.equal(inv_freq, reference[0]), name
        assert attention_factor == reference[1], name
    # Same numbers as a sanity check on the values themselves: the unscaled inverse frequencies, and YaRN's
    # interpolation (every frequency divided by at most `factor`, the fastest kept) with mscale's temperature.
    plain = 1.0 / 50000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    inv_freq, attention_factor = reference
    if scaling is None:
        assert torch.equal(inv_freq, plain) and attention_factor == 1.0
    else:
        ratio = plain / inv_freq
        assert ratio[0] == pytest.approx(1.0) and ratio[-1] == pytest.approx(40.0)
        assert ((ratio > 1.0 + 1e-6) & (ratio < 40.0 - 1e-4)).any(), "the YaRN ramp blends some dims"
        expected = (0.1 * 0.707 * math.log(40) + 1) / (0.1 * 1.0 * math.log(40) + 1)
        assert attention_factor == pytest.approx(expected)


def test_softmax_scale_uses_mscale_all_dim():
    config = ModelConfig.from_preset("deepseek-v3")
    mscale = 0.1 * 1.0 * math.log(40) + 1
    assert config.softmax_scale == pytest.approx(192**-0.5 * mscale**2)
    assert ModelConfig.from_preset("tiny").softmax_scale == pytest.approx(24**-0.5)


@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-r1", "deepseek-v2-lite", "tiny", "tiny-demo", "small"])
def test_presets_load(name):
    config = ModelConfig.from_preset(name)
    assert config.num_key_value_heads == config.num_attention_heads
    assert config.n_routed_experts % config.n_group == 0 and config.topk_group <= config.n_group
    assert config.is_moe and not config.is_moe_layer(0)


def test_preset_values():
    v3 = ModelConfig.from_preset("deepseek-v3")
    assert (v3.hidden_size, v3.num_hidden_layers, v3.n_routed_experts, v3.num_experts_per_tok) == (7168, 61, 256, 8)
    assert (v3.scoring_func, v3.topk_method, v3.rope_type, v3.num_nextn_predict_layers) == ("sigmoid", "noaux_tc",
                                                                                             "yarn", 1)
    assert ModelConfig.from_preset("deepseek-r1") == v3
    lite = ModelConfig.from_preset("deepseek-v2-lite")
    assert (lite.model_type, lite.q_lora_rank, lite.scoring_func, lite.topk_method) == ("deepseek_v2", None,
                                                                                        "softmax", "greedy")
    assert lite.norm_topk_prob is False and lite.routed_scaling_factor == 1.0
    assert ModelConfig.from_preset("tiny", num_hidden_layers=5).num_hidden_layers == 5
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        ModelConfig.from_preset("nope")


def test_v2_config_defaults_to_softmax_greedy():
    """transformers' V2 config.json has no scoring_func: V2 is softmax-scored."""
    raw = {**_without_rope(PRESETS["deepseek-v2-lite"]), "model_type": "deepseek_v2"}
    for key in ("scoring_func", "topk_method", "norm_topk_prob", "routed_scaling_factor"):
        raw.pop(key)
    config = ModelConfig.from_dict(raw)
    assert (config.scoring_func, config.topk_method, config.norm_topk_prob, config.routed_scaling_factor) == (
        "softmax", "greedy", False, 1.0)


def _check_error(key: str, **changes):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        ModelConfig.from_dict({**TINY, **changes})


@pytest.mark.parametrize("key, changes", [
    ("topk_group", dict(n_group=2, topk_group=3)),
    ("n_group", dict(n_routed_experts=8, n_group=3, topk_group=1)),
    ("scoring_func", dict(scoring_func="relu")),
    ("topk_method", dict(topk_method="random")),
    ("num_experts_per_tok", dict(num_experts_per_tok=9)),
    ("num_experts_per_tok", dict(num_experts_per_tok=0)),
    ("num_experts_per_tok", dict(n_group=4, topk_group=1, num_experts_per_tok=3)),  # only 2 experts in 1 group
    ("rope_scaling", dict(rope_scaling={"type": "ntk-by-parts", "factor": 2.0})),
    ("rope_scaling.factor", dict(rope_scaling={"type": "yarn", "original_max_position_embeddings": 64})),
    ("rope_scaling.original_max_position_embeddings", dict(rope_scaling={"type": "yarn", "factor": 4})),
    ("rope_scaling.factor", dict(rope_scaling={"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 8})),
    ("hidden_size", dict(hidden_size=0)),
    ("vocab_size", dict(vocab_size=-5)),
    ("num_hidden_layers", dict(num_hidden_layers=0)),
    ("num_attention_heads", dict(num_attention_heads=0)),
    ("kv_lora_rank", dict(kv_lora_rank=0)),
    ("qk_rope_head_dim", dict(qk_rope_head_dim=7)),
    ("v_head_dim", dict(v_head_dim=-1)),
    ("q_lora_rank", dict(q_lora_rank=0)),
    ("moe_intermediate_size", dict(moe_intermediate_size=0)),
    ("first_k_dense_replace", dict(first_k_dense_replace=3)),
    ("routed_scaling_factor", dict(routed_scaling_factor=0.0)),
    ("hidden_act", dict(hidden_act="gelu")),
])
def test_invalid_values_name_the_key(key, changes):
    _check_error(key, **changes)


def test_unknown_rope_type_in_rope_parameters():
    raw = {**_without_rope(TINY), "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0}}
    with pytest.raises(ValueError, match="rope.*'longrope'"):
        ModelConfig.from_dict(raw)


def test_non_positive_intermediate_size_names_the_key():
    _check_error("intermediate_size", intermediate_size=0)


def test_bad_json_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"hidden_size": 64,')
    with pytest.raises(ValueError, match=str(path)):
        ModelConfig.from_json(path)
    with pytest.raises(ValueError, match="config.json"):
        ModelConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        ModelConfig.from_json(tmp_path / "missing.json")


@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-v2-lite", "tiny"])
def test_to_dict_from_dict_round_trip(tmp_path, name):
    config = ModelConfig.from_preset(name, extra_key_we_do_not_know=[1, 2])
    written = config.to_dict()
    assert ModelConfig.from_dict(written).to_dict() == written
    config.save_json(tmp_path / "config.json")
    again = ModelConfig.from_pretrained(tmp_path)
    # Every field survives (`architectures` is not a field: it is rewritten from model_type on every save), and
    # the rope, whose `type` key is written back as transformers 5's `rope_type`, gives the same frequencies.
    assert dataclasses.replace(again, extra={}, rope_scaling=None) == dataclasses.replace(config, extra={},
                                                                                         rope_scaling=None)
    assert again.rope_type == config.rope_type
    assert torch.equal(rope_frequencies(again)[0], rope_frequencies(config)[0])
    assert rope_frequencies(again)[1] == rope_frequencies(config)[1]
    assert again.extra["extra_key_we_do_not_know"] == [1, 2]
    assert "rope_scaling" not in written and written["rope_parameters"]["rope_theta"] == config.rope_theta
    architecture = "DeepseekV2ForCausalLM" if name == "deepseek-v2-lite" else "DeepseekV3ForCausalLM"
    assert written["architectures"] == [architecture]


def test_replace_validates():
    config = ModelConfig.from_preset("tiny")
    assert config.replace(num_hidden_layers=4).num_hidden_layers == 4
    with pytest.raises(ValueError, match="topk_group"):
        config.replace(topk_group=5)


def test_dense_model_without_routed_experts():
    config = ModelConfig.from_dict({**TINY, "n_routed_experts": None})
    assert not config.is_moe and config.first_k_dense_replace == config.num_hidden_layers
