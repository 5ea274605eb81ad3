"""The R1 tags and `prompt_opens_think`: one module, one rule, used by the rewards and the server alike."""

from __future__ import annotations

from r1forge.data import load_tokenizer, train_tokenizer
from r1forge.data.tags import THINK_START, prompt_opens_think
from r1forge.rl.rewards import format_reward
from r1forge.serve import reasoning


def test_prompt_opens_think_is_the_prompts_ending(tmp_path) -> None:
    assert prompt_opens_think("<｜User｜>2+2?<｜Assistant｜><think>\n")
    assert prompt_opens_think("<think>old</think><｜User｜>hi<｜Assistant｜><think>")
    assert not prompt_opens_think("<｜User｜>2+2?<｜Assistant｜>")
    assert not prompt_opens_think("<｜User｜>2+2?<｜Assistant｜></think>")
    # a user message that mentions the tag does not open the reasoning of a non-thinking answer
    assert not prompt_opens_think("<｜User｜>What does <think> mean?<｜Assistant｜>")
    # the R1-Zero template names the tags in its instructions and opens nothing
    assert not prompt_opens_think("... i.e., <think> reasoning process here </think> ... User: 2+2. Assistant:")
    assert reasoning.prompt_opens_think is prompt_opens_think  # the server uses the same rule


def test_the_rule_decides_the_format_reward_and_follows_the_chat_template(tmp_path) -> None:
    completion = "2 + 2 = 4.\n</think>\n<answer>4</answer>"
    assert format_reward("<｜User｜>2+2?<｜Assistant｜><think>\n", completion) == 1.0
    assert format_reward("<｜User｜>What does <think> mean?<｜Assistant｜>", completion) == 0.0
    train_tokenizer(None, tmp_path / "tok", vocab_size=300, texts=["hello world 2 + 2 = 4"] * 20)
    tok = load_tokenizer(tmp_path / "tok")
    messages = [{"role": "user", "content": f"What does {THINK_START} mean?"}]
    assert prompt_opens_think(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    assert not prompt_opens_think(tok.apply_chat_template(messages, add_generation_prompt=True, thinking=False,
                                                          tokenize=False))
