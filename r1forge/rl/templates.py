"""Prompt templates for RL: DeepSeek-R1-Zero's plain-text template, or the tokenizer's chat template."""

from __future__ import annotations

from typing import Any

from r1forge.data.synthetic import R1_ZERO_TEMPLATE  # one template for RL prompts and the data's rl_example

TEMPLATES = ("chat", "r1-zero")


def render_prompt(tokenizer: Any, question: str, template: str) -> tuple[str, list[int]]:
    """(prompt text, prompt token ids) for one question.

    "r1-zero": the R1-Zero paper's template, no chat markup (RL straight from a base model).
    "chat": the tokenizer's chat template with the assistant turn opened by `<think>` (R1's template), so the
    completion starts inside the reasoning and holds only the closing tag.
    """
    if template == "r1-zero":
        text = R1_ZERO_TEMPLATE.format(question=question)
        ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + tokenizer.encode(text)
        return text, ids
    if template == "chat":
        messages = [{"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, thinking=True, tokenize=False)
        return text, tokenizer.encode(text)  # what tokenize=True gives, without rendering the template twice
    raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")
