"""Split R1 output into `reasoning_content` (the `<think>` block) and `content`, one-shot or while streaming.

The rules, shared by `split_reasoning` and `ReasoningStreamParser` (a test checks they agree on every chunking):

1. Where the reasoning starts. DeepSeek-R1's chat template ends the prompt with `<think>\\n`, so the output
   carries only the closing tag; the caller says so with `prompt_opened_think=True` (see `prompt_opens_think`)
   and everything up to `</think>` is reasoning. Unlike vLLM's `deepseek_r1` parser, reasoning is then never
   null, even when `</think>` never comes. Otherwise the output is reasoning only if it *starts* with `<think>`
   (after optional whitespace); then it is parsed the same way. A `<think>` repeated at the start of an output
   whose prompt already opened one is swallowed. An output that does not start with `<think>` is all content
   and the reasoning is None (a non-thinking answer, e.g. `chat_template_kwargs={"thinking": false}`).
2. One reasoning block. After `</think>` everything is content, tags included: a model explaining the
   `<think>` tag is not re-parsed.
3. Newlines. As in DeepSeek's API, the newlines right after `<think>` and right after `</think>` are
   dropped (the template writes `<think>\\n`, the model writes `</think>\\n\\n`); other whitespace is kept.
4. A never-closed think (the stream hit max_tokens or a stop string) is all reasoning; content is "".

Streaming holds back only what could still turn into a tag (`"</th"` at the end of a delta, or leading
whitespace plus `"<thi"` at the start of the output) and releases it once the next delta settles it or
`finish()` is called; nothing else is delayed.
"""

from __future__ import annotations

from r1forge.data.tags import THINK_END, THINK_START, prompt_opens_think

__all__ = ["THINK_START", "THINK_END", "prompt_opens_think", "split_reasoning", "ReasoningStreamParser"]


def split_reasoning(text: str, prompt_opened_think: bool) -> tuple[str | None, str]:
    """Split a complete output into (reasoning_content, content).

    Args:
        text: the generated text, special tokens such as `<think>` kept.
        prompt_opened_think: the prompt already opened `<think>` (see `prompt_opens_think`).
    Returns:
        (reasoning, content): reasoning is None only when there was no reasoning block at all.
    """
    head = text.lstrip()
    if head.startswith(THINK_START):
        body = head[len(THINK_START):]
    elif prompt_opened_think:
        body = text
    else:
        return None, text
    body = body.lstrip("\n")
    end = body.find(THINK_END)
    if end < 0:
        return body, ""
    return body[:end], body[end + len(THINK_END):].lstrip("\n")


def _held_suffix_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (could still become the tag)."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


class ReasoningStreamParser:
    """Incremental `split_reasoning`: feed text deltas, get (reasoning delta, content delta) back.

    The concatenation of all returned reasoning deltas (plus `finish()`'s) equals `split_reasoning`'s
    reasoning, or "" where that is None; `has_reasoning` tells the two apart at the end. Same for content.
    """

    _START, _REASONING, _CONTENT = "start", "reasoning", "content"

    def __init__(self, prompt_opened_think: bool) -> None:
        self.prompt_opened_think = prompt_opened_think
        self._state = self._START
        self._held = ""  # text that could still be the start of a tag
        self._strip_newlines = False  # drop "\n" until the first other character (rule 3)
        self._has_reasoning = prompt_opened_think

    @property
    def has_reasoning(self) -> bool:
        """True once the output is known to have a reasoning block (from the start if the prompt opened one)."""
        return self._has_reasoning

    @property
    def in_reasoning(self) -> bool:
        """True while the output is (or, at the very start, may be) inside the reasoning block."""
        return self._state == self._REASONING or (self._state == self._START and self.prompt_opened_think)

    def _strip(self, text: str) -> str:
        if self._strip_newlines and text:
            stripped = text.lstrip("\n")
            if stripped:
                self._strip_newlines = False
            return stripped
        return text

    def feed(self, delta_text: str) -> tuple[str, str]:
        """Consume the next piece of output; returns the (reasoning, content) text that is now settled."""
        reasoning, content = "", ""
        text = self._held + delta_text
        self._held = ""
        if self._state == self._START:
            head = text.lstrip()
            if head.startswith(THINK_START):
                self._state, self._has_reasoning, self._strip_newlines = self._REASONING, True, True
                text = head[len(THINK_START):]
            elif THINK_START.startswith(head):  # only whitespace and maybe "<thi" so far: wait
                self._held = text
                return "", ""
            elif self.prompt_opened_think:
                self._state, self._strip_newlines = self._REASONING, True
            else:
                self._state = self._CONTENT
        if self._state == self._REASONING:
            end = text.find(THINK_END)
            if end < 0:
                keep = _held_suffix_len(text, THINK_END)
                self._held = text[len(text) - keep:] if keep else ""
                return self._strip(text[:len(text) - keep]), ""
            reasoning = self._strip(text[:end])
            self._state, self._strip_newlines = self._CONTENT, True
            text = text[end + len(THINK_END):]
        content = self._strip(text)
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """End of output: release held text (an unfinished tag is plain text). Returns (reasoning, content)."""
        held, self._held = self._held, ""
        if self._state == self._START:
            if not self.prompt_opened_think:
                self._state = self._CONTENT
                return "", held
            self._state, self._strip_newlines = self._REASONING, True
        if self._state == self._REASONING:
            return self._strip(held), ""
        return "", self._strip(held)
