"""Shared test helpers: tiny, fully randomised transformers DeepSeek models saved as Hugging Face checkpoints.

Other test files reuse them with a plain import (pytest puts `tests/` on sys.path for this conftest):

    from conftest import make_hf_checkpoint, build_hf_model

`make_hf_checkpoint(tmp_path, **overrides)` is the one to use for "a real checkpoint on disk" (engine, server);
`build_hf_model(...)` returns the transformers model itself, for tests that compare logits against it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

# The smallest shapes that still exercise every DeepSeek-V3 feature: q low-rank, several shared experts,
# group-limited routing (n_group > 1, topk_group < n_group), a dense first layer. num_key_value_heads must be
# given because transformers' V3 config defaults it to 128 whatever the head count.
TINY_V3: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
    n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
    max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=0,
)

# DeepSeek-V2 shapes (softmax router). transformers' V2 router never renormalises the top-k weights (it ignores
# norm_topk_prob), so V2 configs keep norm_topk_prob False, which is also what V2 checkpoints ship with.
TINY_V2: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
    n_group=1, topk_group=1, topk_method="greedy", first_k_dense_replace=1, routed_scaling_factor=1.5,
    norm_topk_prob=False, max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=0,
)


def randomise_(model: torch.nn.Module, std: float = 0.2, seed: int | None = None) -> torch.nn.Module:
    """Overwrite every parameter, and the router correction bias, with random values (in place).

    Default initialisations hide bugs (norm weights of one, a zero correction bias, near-uniform routing), so
    norms get uniform(0.5, 1.5), matrices normal(0, std) and `e_score_correction_bias` normal(0, 0.1).
    """
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=generator) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(torch.randn(b.shape, generator=generator) * 0.1)
    return model


def build_hf_model(arch: str = "v3", seed: int = 0, std: float = 0.2, **overrides: Any):
    """A randomised transformers `DeepseekV3ForCausalLM` (arch "v3") or `DeepseekV2ForCausalLM` ("v2") in eval mode.

    `overrides` are transformers config kwargs on top of TINY_V3 / TINY_V2 (e.g. `rope_parameters={...}`).
    """
    import transformers
    if arch not in ("v3", "v2"):
        raise ValueError(f"arch must be 'v3' or 'v2', got {arch!r}")
    base = TINY_V3 if arch == "v3" else TINY_V2
    config_cls = transformers.DeepseekV3Config if arch == "v3" else transformers.DeepseekV2Config
    model_cls = transformers.DeepseekV3ForCausalLM if arch == "v3" else transformers.DeepseekV2ForCausalLM
    kwargs = {**base, **overrides}
    kwargs.setdefault("num_key_value_heads", kwargs["num_attention_heads"])
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    return randomise_(model, std=std, seed=seed)


def make_hf_checkpoint(path: str | Path, arch: str = "v3", seed: int = 0, std: float = 0.2,
                       **overrides: Any) -> Path:
    """Build a randomised tiny transformers DeepSeek model and `save_pretrained` it (fp32 safetensors) into `path`.

    Returns the directory (config.json + model.safetensors). Same arguments as `build_hf_model`; the same seed
    gives the same weights.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_hf_model(arch, seed=seed, std=std, **overrides).save_pretrained(path)
    return path


@pytest.fixture
def hf_checkpoint(tmp_path: Path) -> Path:
    """A default tiny V3 checkpoint directory (TINY_V3, seed 0)."""
    return make_hf_checkpoint(tmp_path / "hf-v3")


class RandomRows:
    """A map-style dataset of `n` random next-token rows over `vocab` ids, `T` tokens each (for r1forge Trainers)."""

    def __init__(self, vocab: int, n: int = 16, T: int = 12, seed: int = 0) -> None:
        self.ids = torch.randint(0, vocab, (n, T + 1), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i, :-1], "labels": self.ids[i, 1:]}


def save_tiny_policy(out: Path, seed: int = 0) -> Path:
    """A tokenizer trained on the built-in corpus and a random tiny r1forge model sized to it, saved in `out` (a
    model directory GRPO's `model.init_from` and `r1forge.load_model` read)."""
    from r1forge import ModelConfig, build_model
    from r1forge.data import load_tokenizer, make_pretrain_corpus, train_tokenizer

    train_tokenizer(None, out, vocab_size=300, texts=make_pretrain_corpus(100, 0))
    tok = load_tokenizer(out)
    torch.manual_seed(seed)
    config = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                     num_nextn_predict_layers=0)
    build_model(config).save_pretrained(out)
    return out


def assert_step_logits_equal_full_forward(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch,
                                          prompts: list[list[int]], **llm_options: Any) -> None:
    """Every logits row the engine samples from (chunked prefill, paged cache, batched decode) equals the full
    forward of that sequence's tokens so far (relative error < 1e-4), over 12 greedy steps of `prompts`."""
    from r1forge import LLM, SamplingParams
    from r1forge.engine import sampler as sampler_module

    recorded: list[tuple[list[list[int]], torch.Tensor]] = []
    real_sample = sampler_module.sample

    def spy(logits: torch.Tensor, seqs: list[Any]) -> Any:
        recorded.append(([list(s.token_ids) for s in seqs], logits.clone()))
        return real_sample(logits, seqs)

    monkeypatch.setattr("r1forge.engine.llm_engine.sample", spy)
    llm = LLM(model, max_num_seqs=8, max_num_batched_tokens=40, **llm_options)
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    assert len(recorded) >= 12
    with torch.no_grad():
        for token_lists, logits in recorded:
            for row, ids in enumerate(token_lists):
                ref = model(torch.tensor([ids]))[0, -1]
                rel = (logits[row] - ref).norm() / ref.norm()
                assert rel < 1e-4, f"step with context {len(ids)}: relative error {rel:.2e}"
