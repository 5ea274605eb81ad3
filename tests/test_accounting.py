"""Parameter and KV-cache accounting against the published DeepSeek-V3 numbers, and the `r1forge info` command."""

from __future__ import annotations


import pytest
import torch
from conftest import build_hf_model, make_hf_checkpoint

import r1forge
from r1forge import ModelConfig, count_parameters, kv_cache_bytes_per_token
from r1forge.accounting import count_parameters_of
from r1forge.cli import main
from r1forge.checkpoint.summary import summarize_checkpoint
from r1forge.commands.info import mtp_parameters


@pytest.fixture(scope="module")
def v3_counts() -> dict[str, tuple[int, int]]:
    config = ModelConfig.from_preset("deepseek-v3")
    return {"main": count_parameters(config), "with_mtp": count_parameters(config, include_mtp=True)}


def test_v3_total_and_active_parameters(v3_counts):
    total, active = v3_counts["main"]
    assert total == pytest.approx(671e9, rel=0.005)
    assert active == pytest.approx(37e9, rel=0.03)


def test_mtp_excluded_by_default(v3_counts):
    total, active = v3_counts["main"]
    total_mtp, active_mtp = v3_counts["with_mtp"]
    # One MoE decoder block plus eh_proj and norms; the on-disk ~14B also holds a copy of embedding and head.
    assert 11e9 < total_mtp - total < 12.5e9
    assert total_mtp - total == mtp_parameters(ModelConfig.from_preset("deepseek-v3"))
    assert active_mtp > active


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None, "first_k_dense_replace": 0, "n_shared_experts": 3}])
def test_counts_match_a_built_model(overrides):
    """Total = the real module's numel; active = total minus the (E - K) unchosen experts of every MoE layer."""
    config = ModelConfig.from_preset("tiny", **overrides)
    model = r1forge.build_model(config)
    total, active = count_parameters(config)
    assert total == sum(p.numel() for p in model.parameters())
    per_expert = 3 * config.hidden_size * config.moe_intermediate_size
    n_moe = config.num_hidden_layers - config.first_k_dense_replace
    assert active == total - n_moe * (config.n_routed_experts - config.num_experts_per_tok) * per_expert
    with_mtp = r1forge.build_model(config, with_mtp=True)
    assert count_parameters(config, include_mtp=True)[0] == sum(p.numel() for p in with_mtp.parameters())


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": True, "num_nextn_predict_layers": 2, "q_lora_rank": None},
    {"first_k_dense_replace": 3, "num_hidden_layers": 5, "n_shared_experts": None, "num_nextn_predict_layers": 1},
    {"n_routed_experts": None},  # dense only, also the MTP module
])
@pytest.mark.parametrize("include_mtp", [False, True])
def test_fast_count_equals_the_whole_meta_model(overrides, include_mtp):
    """One block of each kind (dense, MoE, MTP) times its count == every parameter of the whole model."""
    config = ModelConfig.from_preset("tiny", **{"num_hidden_layers": 4, "first_k_dense_replace": 1, **overrides})
    with torch.device("meta"):
        model = r1forge.DeepseekForCausalLM(config, with_mtp=include_mtp)
    assert count_parameters(config, include_mtp=include_mtp) == count_parameters_of(model)


def test_v3_count_builds_one_block_of_each_kind(monkeypatch: pytest.MonkeyPatch):
    """The fast count builds a dense, a MoE and an MTP block, never the 61 layers (which took seconds for V3)."""
    from r1forge.model import DecoderLayer, MTPModule

    built: list[str] = []
    for cls in (DecoderLayer, MTPModule):
        original = cls.__init__

        def counting(self, *args, _original=original, _name=cls.__name__, **kwargs):
            built.append(_name)
            _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", counting)
    assert count_parameters(ModelConfig.from_preset("deepseek-v3"), include_mtp=True)[0] > 671e9
    # a dense and a MoE decoder layer, and one MTP module (which holds its own decoder layer)
    assert sorted(built) == ["DecoderLayer"] * 3 + ["MTPModule"]


def test_v3_kv_cache_bytes():
    cache = kv_cache_bytes_per_token(ModelConfig.from_preset("deepseek-v3"))
    assert cache.mla == (512 + 64) * 61 * 2 == 70272
    assert cache.mha == 128 * (192 + 128) * 61 * 2
    assert cache.gqa8 == 8 * (192 + 128) * 61 * 2
    assert cache.mla / cache.mha == pytest.approx(0.0141, abs=5e-4)  # docs/design.md section 3.3: 1.41%, a 98.6% cut
    assert kv_cache_bytes_per_token(ModelConfig.from_preset("deepseek-v3"), element_size=1).mla == 35136


# ---------------------------------------------------------------------------------------------- r1forge info
def test_info_preset_prints_the_numbers(capsys):
    assert main(["info", "--preset", "deepseek-v3"]) == 0
    out = capsys.readouterr().out
    for expected in [
        "61 (3 dense + 58 MoE)",
        "256 routed + 1 shared per MoE layer, top-8 of 256, 8 groups, top-4 groups",
        "128 heads, q_lora_rank 1536, kv_lora_rank 512, qk head 128 nope + 64 rope, v head 128",
        "671.0B total, 37.6B active per token",
        "11.6B in 1 module(s)",
        "70,272 B", "4,997,120 B", "312,320 B",
        "1.41% of MHA", "6.25% of MHA",
        "32,768-token context: MLA 2.14 GiB, GQA-8 9.53 GiB, MHA 152.5 GiB",
    ]:
        assert expected in out, expected


def test_info_context_and_cache_dtype(capsys):
    assert main(["info", "--preset", "tiny", "--context", "1000", "--cache-dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    config = ModelConfig.from_preset("tiny")
    mla = config.latent_dim * config.num_hidden_layers * 4
    assert f"{mla:,} B" in out and "(fp32, all 2 layers)" in out and "1,000-token context" in out


def test_info_checkpoint_reads_headers(tmp_path, capsys):
    path = make_hf_checkpoint(tmp_path / "fp32")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    config = ModelConfig.from_pretrained(path)
    total, active = count_parameters(config)
    assert f"({total:,} / {active:,})" in out
    files = list(path.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    summary = summarize_checkpoint(path)
    # On disk: every parameter plus each MoE layer's e_score_correction_bias buffer.
    stored = total + (config.num_hidden_layers - config.first_k_dense_replace) * config.n_routed_experts
    assert summary.file_bytes == size and summary.numel_by_dtype == {"F32": stored}
    assert summary.bytes_by_dtype == {"F32": 4 * stored} and summary.layer_indices == {0, 1, 2}
    assert "in 1 safetensors file(s)" in out and "F32 " in out and "no MTP weights on disk" in out

    bf16 = tmp_path / "bf16"
    build_hf_model("v3").to(torch.bfloat16).save_pretrained(bf16)
    assert main(["info", str(bf16)]) == 0
    out = capsys.readouterr().out
    assert "BF16 " in out and "(100.0%)" in out
    assert summarize_checkpoint(bf16).bytes_by_dtype == {"BF16": 2 * stored}


def test_checkpoint_summary_counts_fp8_bytes(tmp_path):
    """Bytes per dtype come from the header's dtype and shape: one byte per e4m3 value, four per float32 scale."""
    from safetensors.torch import save_file

    w = torch.zeros(130, 4).to(torch.float8_e4m3fn)
    save_file({"model.layers.7.mlp.down_proj.weight": w,
               "model.layers.7.mlp.down_proj.weight_scale_inv": torch.ones(2, 1)}, str(tmp_path / "model.safetensors"))
    summary = summarize_checkpoint(tmp_path)
    assert summary.bytes_by_dtype == {"F8_E4M3": 520, "F32": 8} and summary.numel_by_dtype == {"F8_E4M3": 520, "F32": 2}
    assert summary.files == 1 and summary.tensors == 2 and summary.layer_indices == {7}


def test_info_reports_mtp_weights(tmp_path, capsys):
    torch.manual_seed(0)
    model = r1forge.build_model(ModelConfig.from_preset("tiny", num_hidden_layers=2), with_mtp=True)
    model.save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    assert "MTP weights present (layers 2)" in capsys.readouterr().out


def test_info_errors_name_the_file(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    path = make_hf_checkpoint(tmp_path / "ckpt")
    bad = path / "model.safetensors"  # the file the loader reads, truncated to garbage
    bad.write_bytes(b"\xff" * 64)
    assert main(["info", str(path)]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    with pytest.raises(ValueError, match="model.safetensors"):
        summarize_checkpoint(path)
    with pytest.raises(SystemExit):
        main(["info"])  # neither a path nor --preset
