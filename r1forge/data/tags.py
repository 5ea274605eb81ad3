"""The R1 output format's four tags, declared once: `<think> reasoning </think> <answer> answer </answer>`.

The tokenizer keeps them as control tokens that always decode to text (chat_template.py), the rewards check
them (r1forge.rl.rewards), the server splits reasoning on them (r1forge.serve.reasoning), the synthetic SFT
data writes them (synthetic.py).
"""

from __future__ import annotations

THINK_START, THINK_END = "<think>", "</think>"
ANSWER_START, ANSWER_END = "<answer>", "</answer>"
R1_TAGS = (THINK_START, THINK_END, ANSWER_START, ANSWER_END)  # in the order a well-formed answer has them


def prompt_opens_think(prompt: str) -> bool:
    """True when the rendered prompt ends by opening the reasoning (R1's chat template ends with `<think>\\n`), so
    the completion starts inside it and holds only `</think>`.

    The rule is "the prompt ends with `<think>`, whitespace aside", not "its last `<think>` comes after its last
    `</think>`": a user message that mentions the tag (`what does <think> mean?`) must not make a non-thinking
    answer (`thinking=False`, which leaves the prompt at `<｜Assistant｜>`) count as reasoning. A reward that
    misses this rule scores every R1 completion as unformatted; a server that misses it loses the reasoning.
    """
    return prompt.rstrip().endswith(THINK_START)
