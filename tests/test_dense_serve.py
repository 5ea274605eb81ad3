"""An R1-Distill-shaped checkpoint (tiny Qwen2, a Hugging Face tokenizer.json + tokenizer_config.json with the
distills' chat template) in chat, serve and GRPO's format reward. The template opens `<think>\\n` in the prompt,
so the model writes only `</think>`: every consumer must know the reasoning started in the prompt."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from dense_helpers import build_hf_dense, make_r1_distill_tokenizer
from test_server import ANSWER, API_KEY, CORPUS, MODEL, REASONING, SCRIPTS, script_outputs
from r1forge import LLM, SamplingParams
from r1forge.data import load_tokenizer
from r1forge.engine.async_llm import AsyncLLM
from r1forge.serve import BackgroundServer, ServerConfig


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("r1-distill-tiny")
    tok_dir = make_r1_distill_tokenizer(directory, CORPUS)
    vocab = load_tokenizer(tok_dir).vocab_size
    build_hf_dense("qwen2", std=0.3, vocab_size=vocab).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def server(model_dir: Path):
    llm = LLM(str(model_dir), max_num_seqs=16, block_size=16, max_model_len=512)
    script_outputs(llm)
    srv = BackgroundServer(AsyncLLM(llm), ServerConfig(model_name=MODEL, port=0, api_key=API_KEY, max_tokens=200,
                                                       shutdown_timeout=2.0, log_level="warning"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _field(obj: Any, name: str) -> Any:
    return getattr(obj, name, None) or (obj.model_extra or {}).get(name)


def test_template_renders_as_in_transformers_and_opens_think(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    ours, theirs = load_tokenizer(model_dir), AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "sum?"},
                {"role": "assistant", "content": "<think>\nhm\n</think>\n\n42"}, {"role": "user", "content": "again"}]
    text = ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<｜Assistant｜><think>\n") and "hm" not in text  # history keeps answers only
    assert ours.apply_chat_template(messages, add_generation_prompt=True) == \
        theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_serve_returns_reasoning_under_both_names(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "SCRIPT_REASON please"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0)
    message = r.choices[0].message
    assert _field(message, "reasoning_content") == _field(message, "reasoning") == REASONING
    assert message.content == ANSWER
    reasoning = {"reasoning_content": "", "reasoning": ""}
    content = ""
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, temperature=0, stream=True):
        for c in chunk.choices:
            for name in reasoning:
                reasoning[name] += _field(c.delta, name) or ""
            content += c.delta.content or ""
    assert reasoning == {"reasoning_content": REASONING, "reasoning": REASONING} and content == ANSWER


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_serve_accepts_either_reasoning_field_sent_back(server: BackgroundServer, client: openai.OpenAI,
                                                        field: str) -> None:
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ANSWER, field: REASONING},
               {"role": "user", "content": "and?"}]
    r = client.chat.completions.create(model=MODEL, messages=history, max_tokens=3)
    plain = [dict(m) for m in history]
    plain[1].pop(field)
    prompt = server.engine.tokenizer.apply_chat_template(plain, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(prompt)  # the template drops reasoning from history, as R1 does
    with pytest.raises(openai.BadRequestError, match="reasoning"):
        client.chat.completions.create(model=MODEL, max_tokens=3, messages=[
            history[0], {**history[1], "reasoning": "a", "reasoning_content": "b"}, history[2]])


def test_chat_turn_shows_reasoning_apart_from_the_answer(model_dir: Path) -> None:
    from r1forge.commands.chat import chat_turn

    llm = LLM(str(model_dir), block_size=16, max_model_len=512)
    script_outputs(llm)
    out = io.StringIO()
    answer = chat_turn(llm, [{"role": "user", "content": "SCRIPT_REASON"}], SamplingParams(temperature=0.0, max_tokens=200),
                       thinking=True, out=out)
    assert answer == ANSWER and out.getvalue().startswith("[thinking] " + REASONING)


def test_format_reward_knows_the_prompt_opened_think(model_dir: Path) -> None:
    from r1forge.rl.rewards import format_reward

    tok = load_tokenizer(model_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "1+1?"}], add_generation_prompt=True,
                                     tokenize=False)
    assert format_reward(prompt, "one and one</think>\n<answer>2</answer>") == 1.0
    assert format_reward(prompt, "one and one\n<answer>2</answer>") == 0.0
