"""Rule-based shape rewards: the R1-Zero format, R1's language consistency, DAPO's overlong punishment."""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import Any

from r1forge.data.tags import ANSWER_START, R1_TAGS, THINK_END, THINK_START, prompt_opens_think
from r1forge.rl.rewards.stats import guarded, to_text



def format_tags(prompt: str, completion: str) -> int:
    """How many of the four tags are right (0..4), walking them in order `<think> </think> <answer> </answer>`.

    A tag is right when it occurs exactly once, after the previous right tag; `<think>` must also have only
    whitespace before it, or be absent because the prompt opened it; `</answer>` must have only whitespace
    after it. Anything may stand between the tags. All four right <=> the strict format.
    """
    right, cursor = 0, 0
    for k, tag in enumerate(R1_TAGS):
        count = completion.count(tag)
        if k == 0 and prompt_opens_think(prompt):
            right += count == 0
            continue
        if count != 1:
            continue
        idx = completion.find(tag)
        if idx < cursor or (k == 0 and completion[:idx].strip()):
            continue
        if k == 3 and completion[idx + len(tag) :].strip():
            continue
        right, cursor = right + 1, idx + len(tag)
    return right


@guarded("format")
def format_reward(prompt: Any, completion: Any, /, **example: Any) -> float:
    """1.0 for `<think> ... </think> ... <answer> ... </answer>` (each tag once, in order, only whitespace after
    `</answer>`), also when the prompt already opened `<think>`; else 0.0."""
    return 1.0 if format_tags(to_text(prompt), to_text(completion)) == 4 else 0.0


@guarded("format_soft")
def format_reward_soft(prompt: Any, completion: Any, /, **example: Any) -> float:
    """Shaping variant of format_reward: 0.25 per right tag (see format_tags); 1.0 exactly when strict is 1.0."""
    return 0.25 * format_tags(to_text(prompt), to_text(completion))


# ---------------------------------------------------------------------------------------------- language
_LANGUAGE_SCRIPTS = {
    **{code: {"latin"} for code in ("fr", "de", "es", "it", "pt", "nl", "sv", "da", "no", "fi", "pl", "cs", "tr",
                                    "ro", "hu", "id", "vi", "ms", "ca")},
    "zh": {"han"}, "ja": {"han", "hiragana", "katakana"}, "ko": {"hangul"},
    **{code: {"cyrillic"} for code in ("ru", "uk", "bg", "sr", "be", "kk")},
    "el": {"greek"}, "ar": {"arabic"}, "fa": {"arabic"}, "ur": {"arabic"}, "he": {"hebrew"},
    "hi": {"devanagari"}, "mr": {"devanagari"}, "ne": {"devanagari"}, "th": {"thai"},
}
_PER_CHAR_SCRIPTS = {"han", "hiragana", "katakana"}  # written without spaces: one token per character
_LETTER_RUN = re.compile(r"[^\W\d_]+")
_TAG_RE = re.compile(r"</?(?:think|answer)>")


@functools.lru_cache(maxsize=1 << 16)
def char_script(ch: str) -> str:
    """The Unicode script of a letter, from its character name ("CJK UNIFIED IDEOGRAPH-4E2D" -> "han")."""
    name = unicodedata.name(ch, "")
    if name.startswith("CJK") or name.startswith("IDEOGRAPHIC"):
        return "han"
    word = name.split(" ")[0].lower()
    if word in ("fullwidth", "halfwidth") and " " in name:
        word = name.split(" ")[1].lower()
    return word or "unknown"


def script_tokens(text: str) -> list[tuple[str, bool]]:
    """(script, is_ascii) per word; CJK characters count one token each (they are written without spaces)."""
    tokens: list[tuple[str, bool]] = []
    for run in _LETTER_RUN.findall(text):
        if run.isascii():
            tokens.append(("latin", True))
            continue
        current = ""
        for ch in run:
            script = char_script(ch)
            if script in _PER_CHAR_SCRIPTS:
                tokens.append((script, False))
                current = ""
            elif script != current:
                tokens.append((script, ch.isascii()))
                current = script
            elif not ch.isascii():
                tokens[-1] = (script, False)
    return tokens


def reasoning_text(completion: str) -> str:
    """The chain of thought: between `<think>` (or the start, when absent or opened by the prompt) and the
    first `</think>` (or, when the model never closed it, the first `<answer>` or the end); no tags in it."""
    close = completion.find(THINK_END)
    if close < 0:
        close = completion.find(ANSWER_START)
    body = completion if close < 0 else completion[:close]
    open_ = body.rfind(THINK_START)
    body = body if open_ < 0 else body[open_ + len(THINK_START) :]
    return _TAG_RE.sub(" ", body)


def language_fraction(text: str, language: str) -> float:
    """Share of the word tokens of `text` in `language`'s script: for English, ASCII-latin words; for zh, CJK
    characters; otherwise by Unicode script (see _LANGUAGE_SCRIPTS). 0.0 for text without words."""
    code = re.split(r"[-_]", language.strip().lower())[0]
    if code != "en" and code not in _LANGUAGE_SCRIPTS:
        raise ValueError(f"language {language!r} is not known; expected en or one of {sorted(_LANGUAGE_SCRIPTS)}")
    tokens = script_tokens(text)
    if not tokens:
        return 0.0
    if code == "en":
        hits = sum(1 for script, ascii_ in tokens if script == "latin" and ascii_)
    else:
        scripts = _LANGUAGE_SCRIPTS[code]
        hits = sum(1 for script, _ in tokens if script in scripts)
    return hits / len(tokens)


@guarded("language")
def language_consistency_reward(prompt: Any, completion: Any, /, **example: Any) -> float:
    """DeepSeek-R1's language-consistency reward: the share of the chain-of-thought's words written in the target
    language `example.get("language", "en")`. Empty reasoning scores 0."""
    return language_fraction(reasoning_text(to_text(completion)), str(example.get("language") or "en"))


# ---------------------------------------------------------------------------------------------- length
def overlong_penalty(num_tokens: int, max_len: int, buffer_len: int) -> float:
    """DAPO's soft overlong punishment, added to the reward of a completion of `num_tokens` tokens:
    0 up to max_len - buffer_len, then a linear ramp down to -1 at max_len, and -1 beyond."""
    if max_len <= 0:
        raise ValueError(f"max_len (the maximum completion length) must be > 0, got {max_len}")
    if not 0 <= buffer_len <= max_len:
        raise ValueError(f"buffer_len (grpo.overlong_buffer) must be in [0, max_len={max_len}], got {buffer_len}")
    expected = max_len - buffer_len
    if num_tokens <= expected:
        return 0.0
    if num_tokens <= max_len:
        return (expected - num_tokens) / buffer_len
    return -1.0
