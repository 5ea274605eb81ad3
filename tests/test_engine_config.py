"""EngineConfig: one object, resolved once by the engine, read whole by the runner and the static decoder."""

from __future__ import annotations

import pytest
import torch

import r1forge
from conftest import randomise_
from r1forge import LLM, EngineConfig
from r1forge.engine import LLMEngine


@pytest.fixture(scope="module")
def model() -> r1forge.DeepseekForCausalLM:
    torch.manual_seed(0)
    cfg = r1forge.ModelConfig.from_preset("tiny", vocab_size=64, num_hidden_layers=2, max_position_embeddings=256)
    return randomise_(r1forge.build_model(cfg), std=0.3).eval()


def test_llm_keyword_options_and_config_object_agree(model):
    config = EngineConfig(max_num_seqs=4, block_size=16, max_model_len=96, kv_cache_memory=1 << 20)
    by_object = LLM(model, config=config)
    by_keywords = LLM(model, max_num_seqs=4, block_size=16, max_model_len=96, kv_cache_memory=1 << 20)
    assert by_object.config == by_keywords.config
    resolved = by_object.config
    assert resolved.max_model_len == 96 and resolved.num_blocks == by_object.engine.block_manager.num_blocks
    # one object downstream: the runner and the scheduler read the engine's resolved copy
    assert by_object.engine.runner.config is resolved
    assert by_object.engine.scheduler.max_num_seqs == 4


def test_keywords_override_the_config(model):
    llm = LLM(model, config=EngineConfig(max_num_seqs=4, block_size=16), max_num_seqs=2)
    assert llm.config.max_num_seqs == 2 and llm.config.block_size == 16


def test_max_model_len_is_clamped_to_the_model_once(model):
    llm = LLM(model, max_model_len=10 ** 9, block_size=16, max_num_seqs=2)
    assert llm.config.max_model_len == model.config.max_position_embeddings == llm.engine.max_model_len


def test_unknown_option_names_itself(model):
    with pytest.raises(TypeError, match="unknown engine option.*max_num_seq\\b"):
        LLM(model, max_num_seq=4)


@pytest.mark.parametrize("key,value", [("block_size", 0), ("max_num_seqs", -1), ("num_blocks", 2.5),
                                       ("max_num_batched_tokens", True)])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        EngineConfig(**{key: value})


def test_static_decode_pool_has_the_null_block(model):
    engine = LLMEngine(model, None, EngineConfig(num_blocks=8, block_size=16, static_decode=True))
    assert engine.config.pool_blocks == 9 and engine.runner.static.null_block == 8
    assert all(c.shape[0] == 9 for c in engine.runner.kv_caches)
    plain = LLMEngine(model, None, EngineConfig(num_blocks=8, block_size=16))
    assert plain.runner.static is None and all(c.shape[0] == 8 for c in plain.runner.kv_caches)


def test_budget_smaller_than_a_block_is_an_error(model):
    with pytest.raises(ValueError, match="less than one cache block"):
        LLMEngine(model, None, EngineConfig(kv_cache_memory=16, block_size=16))
