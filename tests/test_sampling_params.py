"""SamplingParams bounds every field once, for the library and the server: extreme and mistyped values for
every parameter are a SamplingParamError (a ValueError) naming it, and every value it accepts runs through the
engine, sampled and greedy rows sharing one batch, without an error."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import r1forge
from r1forge import LLM, SamplingParams
from r1forge.engine.sampling_params import SamplingParamError

VOCAB = 64
EXTREMES = [math.nan, math.inf, -math.inf, 2**63, -(2**63), 2**64, 10**400, 1e308, -1e308, 1e-300, -1, 0, 0.5,
            1, 2, 3, 21, 64, 65, 4097, True, False, "1", [1], None, {}]
FIELDS = [f.name for f in dataclasses.fields(SamplingParams)]
# values a parameter must refuse, beyond whatever else among EXTREMES it refuses
MUST_REFUSE = {
    "n": [0, -1, 2**63, 1.0, True, "1", None], "temperature": [math.nan, math.inf, -1, 1e-300, 1e308, True, "1"],
    "top_p": [0, math.nan, 2, -1, True], "top_k": [2**63, -1, 0.5, True, "1", 65],
    "min_p": [math.nan, 2, -1], "repetition_penalty": [0, 1e-300, math.inf, 1e308, -1, math.nan],
    "presence_penalty": [math.nan, math.inf, 3, "1"], "frequency_penalty": [-math.inf, -3, True],
    "seed": [2**63, -(2**63) - 1, 0.5, True, "1"], "max_tokens": [0, -1, 2**63, 1.5, True, None],
    "min_tokens": [-1, 2**63, True, 0.5], "stop": [[1], [""], ["x"] * 65, ["x" * 5000], 3],
    "stop_token_ids": [[-1], [2**63], [True], ["1"], [64], 3], "ignore_eos": [1, "yes", None],
    "include_stop_str_in_output": [0, None], "logprobs": [-1, 21, True, 0.5, "1"], "skip_special_tokens": [1, None],
}


def _params(name: str, value: object) -> SamplingParams:
    params = SamplingParams(max_tokens=3, min_tokens=0)
    setattr(params, name, value)  # a dataclass may be changed after construction: the engine checks again
    params.check_vocab(VOCAB)
    return SamplingParams(**{**dataclasses.asdict(params), name: value})


def test_every_field_is_covered() -> None:
    assert set(MUST_REFUSE) == set(FIELDS)


@pytest.mark.parametrize("name", FIELDS)
def test_extreme_values_are_refused_naming_the_parameter_or_run(name: str) -> None:
    torch.manual_seed(0)
    model = r1forge.build_model(r1forge.ModelConfig.from_preset("tiny", vocab_size=VOCAB, num_hidden_layers=1))
    llm = LLM(model, max_num_seqs=64, block_size=16, max_model_len=128)
    accepted = []
    for value in [*EXTREMES, *MUST_REFUSE[name]]:
        try:
            params = _params(name, value)
        except SamplingParamError as e:
            assert e.param == name and f"SamplingParams.{name}" in str(e), (value, e)
            assert isinstance(e, ValueError)
            continue
        assert repr(value) not in map(repr, MUST_REFUSE[name]), value
        accepted.append(params)
    # the accepted values share one batch with a sampled and a greedy request: nothing may fail in the engine
    batch = [*accepted, SamplingParams(temperature=0.8, top_k=5, max_tokens=3), SamplingParams(temperature=0.0)]
    outs = llm.generate([[3, 4, 5]] * len(batch), [dataclasses.replace(p, max_tokens=min(p.max_tokens, 3))
                                                   for p in batch])
    assert all(c.finish_reason in ("stop", "length") for o in outs for c in o.outputs), \
        [(p, o.outputs[0].error) for p, o in zip(batch, outs)]


def test_engine_refuses_top_k_beyond_the_vocabulary_naming_it() -> None:
    torch.manual_seed(0)
    model = r1forge.build_model(r1forge.ModelConfig.from_preset("tiny", vocab_size=VOCAB, num_hidden_layers=1))
    llm = LLM(model, max_num_seqs=4, block_size=16, max_model_len=64)
    with pytest.raises(SamplingParamError, match="vocabulary size 64") as info:
        llm.generate([[3, 4]], SamplingParams(top_k=65))
    assert info.value.param == "top_k"
    params = SamplingParams()
    params.top_k = 2**63  # changed after construction: add_request validates again
    with pytest.raises(SamplingParamError) as info:
        llm.generate([[3, 4]], params)
    assert info.value.param == "top_k"
    assert llm.generate([[3, 4]], SamplingParams(top_k=64, max_tokens=2))[0].finish_reason == "length"
