"""Parity with Hugging Face transformers: checkpoints saved by transformers load in r1forge with the same logits,
and checkpoints saved by r1forge load in transformers with the same logits (the reference checkpoints are the
specification: where r1forge reads one differently, r1forge is wrong).

Every weight is randomised (norms too, and the router's `e_score_correction_bias` buffer) so that a skipped
norm, a wrong rope layout or a mis-read bias shows up as a logit difference, not as a coincidence of defaults.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_hf_model, randomise_

import r1forge
from r1forge.model.rope import rope_frequencies
from r1forge.presets import DEEPSEEK_V3

import transformers

RTOL = 1e-4


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((ref - out).norm() / ref.norm()).item()


def yarn(factor: float, original: int, mscale: float, mscale_all_dim: float, theta: float = 10000.0) -> dict:
    """transformers 5 `rope_parameters` for YaRN; a short `original` puts the ramp inside the rope dims."""
    return {"rope_type": "yarn", "rope_theta": theta, "factor": factor, "original_max_position_embeddings": original,
            "beta_fast": 32, "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale_all_dim}


# (arch, transformers config overrides, batch, sequence length). Together they cover: q_lora_rank null and set,
# n_group > 1 with topk_group < n_group, sigmoid (V3) and softmax (V2) scoring, noaux_tc / greedy /
# group_limited_greedy, YaRN with mscale != mscale_all_dim and sequences past original_max_position_embeddings,
# first_k_dense_replace 0 and > 0, several shared experts, rope_interleave False, batch > 1.
# transformers' V2 router ignores norm_topk_prob (it never renormalises), so V2 cases keep it False.
CASES = {
    "v3-qlora-groups-yarn": ("v3", dict(
        qk_rope_head_dim=16, n_group=4, topk_group=2, num_experts_per_tok=3, n_shared_experts=2,
        first_k_dense_replace=1, max_position_embeddings=128, rope_parameters=yarn(4.0, 32, 0.8, 0.9)), 2, 48),
    "v3-plain-q-all-moe-halfsplit": ("v3", dict(
        q_lora_rank=None, first_k_dense_replace=0, n_group=1, topk_group=1, num_experts_per_tok=2,
        n_shared_experts=1, rope_interleave=False, norm_topk_prob=False, routed_scaling_factor=1.0), 3, 17),
    "v3-halfsplit-yarn-dense2": ("v3", dict(
        num_hidden_layers=4, first_k_dense_replace=2, qk_rope_head_dim=16, rope_interleave=False, n_group=2,
        topk_group=1, num_experts_per_tok=2, n_shared_experts=3, max_position_embeddings=128,
        rope_parameters=yarn(8.0, 16, 1.0, 1.0)), 2, 40),
    "v2-greedy-yarn": ("v2", dict(
        q_lora_rank=None, topk_method="greedy", n_shared_experts=2, first_k_dense_replace=1,
        max_position_embeddings=160, qk_rope_head_dim=16, rope_parameters=yarn(5.0, 32, 0.707, 0.707)), 2, 40),
    "v2-group-limited-greedy": ("v2", dict(
        q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=3,
        n_shared_experts=1, first_k_dense_replace=0), 2, 20),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(transformers model, r1forge model loaded from its checkpoint, batch, length) for one configuration."""
    arch, overrides, batch, length = CASES[request.param]
    hf = build_hf_model(arch, seed=len(request.param), **overrides)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, r1forge.load_model(path), batch, length


def test_logits_equal_transformers(case):
    hf, model, batch, length = case
    ids = torch.randint(0, hf.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
    assert out.shape == ref.shape
    assert rel_err(ref, out) < RTOL


def test_logits_equal_transformers_at_offset_positions(case):
    """Positions far past original_max_position_embeddings (YaRN's interpolated regime), per-row offsets."""
    hf, model, batch, length = case
    ids = torch.randint(0, hf.config.vocab_size, (batch, 8), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(8)[None] + torch.tensor([[70], [100]] + [[5]] * (batch - 2))
    with torch.no_grad():
        ref = hf(ids, position_ids=positions).logits
        out = model(ids, positions=positions)
    assert rel_err(ref, out) < RTOL


def test_absorbed_attention_matches_transformers(case):
    hf, model, batch, length = case
    ids = torch.randint(0, hf.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits
        model.set_attn_impl("absorbed")
        absorbed = model(ids)
        model.set_attn_impl("naive")
    assert rel_err(ref, absorbed) < RTOL


def test_latent_norms_use_reference_eps(tmp_path):
    """rms_norm_eps applies to the block norms only; the q/kv latent norms keep eps 1e-6 in the reference."""
    hf = build_hf_model("v3", seed=5, rms_norm_eps=1e-2)
    hf.save_pretrained(tmp_path)
    model = r1forge.load_model(tmp_path)
    ids = torch.randint(0, hf.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel_err(hf(ids).logits, model(ids)) < RTOL


# ---------------------------------------------------------------------------------------------- round trip
def _r1forge_model(seed: int, with_mtp: bool = False, **overrides) -> r1forge.DeepseekForCausalLM:
    torch.manual_seed(seed)
    config = r1forge.ModelConfig.from_preset("tiny", **overrides)
    return randomise_(r1forge.build_model(config, with_mtp=with_mtp), seed=seed).eval()


@pytest.mark.parametrize("overrides", [
    dict(num_hidden_layers=3, n_shared_experts=2, rope_scaling={"type": "yarn", "factor": 4.0,
         "original_max_position_embeddings": 32, "mscale": 0.8, "mscale_all_dim": 0.9}),
    dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="group_limited_greedy", n_group=2,
         topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0, q_lora_rank=None, n_shared_experts=2),
], ids=["v3-yarn", "v2-group-limited"])
def test_r1forge_checkpoint_loads_in_transformers(tmp_path, overrides):
    model = _r1forge_model(seed=11, **overrides)
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    expected = "DeepseekV2ForCausalLM" if overrides.get("model_type") == "deepseek_v2" else "DeepseekV3ForCausalLM"
    assert type(hf).__name__ == expected
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert rel_err(hf(ids).logits, model(ids)) < RTOL


def test_sharded_save_loads_back_bit_exact(tmp_path):
    model = _r1forge_model(seed=12, with_mtp=True, num_nextn_predict_layers=1)
    model.save_pretrained(tmp_path, max_shard_size=200_000)
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 1
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    loaded = r1forge.load_model(tmp_path, with_mtp=True)
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))


@pytest.mark.parametrize("rope_form", ["rope_scaling-type", "rope_scaling-rope_type", "rope_parameters"])
def test_written_config_loads_in_autoconfig_with_same_rope(tmp_path, rope_form):
    scaling = {"factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
               "mscale": 0.707, "mscale_all_dim": 1.0}
    raw = dict(DEEPSEEK_V3)
    raw.pop("rope_scaling")
    raw.pop("rope_theta")
    if rope_form == "rope_parameters":
        raw["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 50000.0, **scaling}
    else:
        raw["rope_theta"] = 50000.0
        raw["rope_scaling"] = {rope_form.split("-")[1]: "yarn", **scaling}
    config = r1forge.ModelConfig.from_dict(raw)
    config.save_json(tmp_path / "config.json")
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(hf_config).__name__ == "DeepseekV3Config"
    assert hf_config.rope_parameters == {"rope_type": "yarn", "rope_theta": 50000.0, **scaling}
    assert hf_config.num_key_value_heads == hf_config.num_attention_heads == 128
    assert (hf_config.q_lora_rank, hf_config.kv_lora_rank, hf_config.n_group, hf_config.topk_group) == (1536, 512, 8, 4)
    # The frequencies transformers derives from our file are the ones r1forge uses.
    hf_inv_freq, hf_attention_factor = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["yarn"](hf_config)
    inv_freq, attention_factor = rope_frequencies(config)
    torch.testing.assert_close(inv_freq, hf_inv_freq, rtol=1e-6, atol=0)
    assert attention_factor == pytest.approx(hf_attention_factor, rel=1e-12)
