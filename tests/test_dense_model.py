"""The dense R1-Distill students (Qwen2, Llama): configs, logits against transformers, checkpoint round trips."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dense_helpers import build_hf_dense, make_dense_checkpoint
from r1forge import load_model
from r1forge.auto_config import config_from_dict, config_from_preset, load_config
from r1forge.config import ModelConfig
from r1forge.dense_config import DenseConfig
from r1forge.model import DenseForCausalLM, build_model
from r1forge.model.rope import inverse_frequencies


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def ours_from_hf(hf) -> DenseForCausalLM:
    """Our model built from the transformers model's own config dict, loaded from its state dict."""
    config = config_from_dict(hf.config.to_dict())
    assert isinstance(config, DenseConfig)
    model = DenseForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(hf.state_dict(), strict=False)
    assert not missing and not [k for k in unexpected if "rotary" not in k]
    return model


CASES = {
    "qwen2-gqa3": ("qwen2", {}),
    "qwen2-mha": ("qwen2", dict(num_key_value_heads=6)),
    "qwen2-gqa2-tied": ("qwen2", dict(num_key_value_heads=3, tie_word_embeddings=True)),
    "qwen2-gqa7": ("qwen2", dict(hidden_size=112, num_attention_heads=7, num_key_value_heads=1)),
    "llama-gqa2-llama3": ("llama", {}),
    "llama-gqa7-bias": ("llama", dict(hidden_size=112, num_attention_heads=7, num_key_value_heads=1,
                                      attention_bias=True)),
    "llama-default-rope-tied": ("llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                              tie_word_embeddings=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case: str) -> None:
    family, overrides = CASES[case]
    hf = build_hf_dense(family, **overrides)
    ours = ours_from_hf(hf)
    # Positions up to 200 pass the llama3 original context (64): every wavelength band is exercised.
    ids = torch.randint(0, hf.config.vocab_size, (3, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert rel_err(got, expected) < 1e-4, case
    if overrides.get("tie_word_embeddings"):
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_llama3_frequencies_match_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    hf_config = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters={**scaling, "rope_theta": 5e5})
    expected, factor = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    got, ours_factor = inverse_frequencies(128, 5e5, scaling)
    assert torch.allclose(got, expected.float(), rtol=1e-6) and ours_factor == factor == 1.0
    # all three bands present: unchanged high frequencies, divided low ones, a blended middle
    base, _ = inverse_frequencies(128, 5e5)
    ratio = got / base
    assert ratio.max() == 1.0 and math.isclose(ratio.min().item(), 1 / 8, rel_tol=1e-6)
    assert ((ratio > 1 / 8 + 1e-6) & (ratio < 1 - 1e-6)).any()


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_load_and_save_round_trip_through_transformers(tmp_path, family: str) -> None:
    import transformers

    source = make_dense_checkpoint(tmp_path / "hf", family)
    model = load_model(source)
    assert isinstance(model, DenseForCausalLM) and model.config.model_type == family
    hf = (transformers.Qwen2ForCausalLM if family == "qwen2" else transformers.LlamaForCausalLM) \
        .from_pretrained(source).eval()
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(ids).logits
        assert rel_err(model(ids), expected) < 1e-4
        # saved sharded by our checkpoint code, read back by transformers and by us
        model.save_pretrained(tmp_path / "ours", max_shard_size=20_000)
        assert len(list((tmp_path / "ours").glob("*.safetensors"))) > 1
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
        assert type(again) is type(hf)
        assert rel_err(again(ids).logits, expected) < 1e-4
        assert rel_err(load_model(tmp_path / "ours")(ids), expected) < 1e-4
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["model_type"] == family and written["architectures"] == [type(hf).__name__]


@pytest.mark.parametrize("raw", [
    {"model_type": "qwen2", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
     "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512},  # only required keys
    "tiny-llama",
])
def test_build_model_saves_a_checkpoint_transformers_reads(tmp_path, raw) -> None:
    import transformers

    torch.manual_seed(0)
    config = config_from_preset(raw) if isinstance(raw, str) else config_from_dict(raw)
    model = build_model(config).eval()
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 512, (2, 300), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_err(model(ids), hf(ids).logits) < 1e-4


# ---------------------------------------------------------------------------------------------- configs
def test_presets_have_the_published_shapes() -> None:
    q = config_from_preset("deepseek-r1-distill-qwen-1.5b")
    assert (q.hidden_size, q.num_hidden_layers, q.num_attention_heads, q.num_key_value_heads, q.head_dim,
            q.intermediate_size, q.vocab_size, q.tie_word_embeddings) == (1536, 28, 12, 2, 128, 8960, 151936, False)
    assert q.qkv_bias and not q.o_bias
    l8 = config_from_preset("deepseek-r1-distill-llama-8b")
    assert (l8.hidden_size, l8.num_key_value_heads, l8.rope_theta, l8.rope_type) == (4096, 8, 500000.0, "llama3")
    assert not l8.qkv_bias
    l70 = config_from_preset("deepseek-r1-distill-llama-70b")
    assert (l70.hidden_size, l70.num_hidden_layers, l70.num_attention_heads, l70.intermediate_size) == \
        (8192, 80, 64, 28672)
    q32 = config_from_preset("deepseek-r1-distill-qwen-32b")
    assert (q32.hidden_size, q32.num_hidden_layers, q32.num_attention_heads, q32.num_key_value_heads) == (5120, 64, 40, 8)


def test_config_json_round_trip_and_published_form(tmp_path) -> None:
    config = config_from_preset("deepseek-r1-distill-llama-8b")
    config.save_json(tmp_path / "config.json")
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["rope_scaling"]["rope_type"] == "llama3" and raw["rope_theta"] == 500000.0
    assert "use_sliding_window" not in raw
    assert load_config(tmp_path) == config


@pytest.mark.parametrize("raw, key", [
    ({"model_type": "mistral"}, "model_type"),
    ({"model_type": "qwen2", "num_attention_heads": 12, "num_key_value_heads": 5}, "num_key_value_heads"),
    ({"model_type": "qwen2", "hidden_size": 100, "num_attention_heads": 12}, "num_attention_heads"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.low_freq_factor"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling"),
])
def test_bad_configs_name_the_key(tmp_path, raw: dict, key: str) -> None:
    with pytest.raises(ValueError, match=f"`?{key}`?"):
        config_from_dict(raw)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="config.json"):
        load_config(tmp_path)


def test_deepseek_config_refuses_dense_model_types() -> None:
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_dict({"model_type": "qwen2"})
    with pytest.raises(ValueError, match="config_from_preset"):
        ModelConfig.from_preset("deepseek-r1-distill-qwen-7b")
    assert isinstance(config_from_dict({}), ModelConfig)  # DeepSeek's configs before model_type existed


def test_info_reports_parameters_and_gqa_cache(tmp_path, capsys) -> None:
    from r1forge.cli import main

    assert main(["info", "--preset", "deepseek-r1-distill-qwen-1.5b"]) == 0
    out = capsys.readouterr().out
    assert "1.78B (1,777,088,000)" in out and "GQA, 12 query heads sharing 2 kv heads" in out
    # 2 kv heads x (k + v) x 128 x 28 layers x 2 bytes
    assert f"{2 * 2 * 128 * 28 * 2:,} B" in out
    assert main(["info", "--preset", "deepseek-r1-distill-llama-8b"]) == 0
    assert "8.03B" in capsys.readouterr().out
    source = make_dense_checkpoint(tmp_path / "hf", "llama")
    assert main(["info", str(source)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("llama model") and "llama3 x8 over 64 positions" in out and "safetensors file" in out
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert main(["info", str(tmp_path / "bad")]) == 2
    assert "model_type" in capsys.readouterr().err
