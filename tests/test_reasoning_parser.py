"""Reasoning parser: fixed R1 outputs one-shot, tags cut across chunks, stream == one-shot on random chunkings."""

import random
import zlib

import pytest

from r1forge.serve.reasoning import ReasoningStreamParser, prompt_opens_think, split_reasoning

# (output, prompt_opened_think, expected reasoning, expected content)
CASES = [
    # R1 template opened <think>\n: only the closing tag comes back
    ("Let me add.\n2 + 2 = 4.\n</think>\n\nThe answer is 4.", True, "Let me add.\n2 + 2 = 4.\n", "The answer is 4."),
    # both tags in the output
    ("<think>\nreasoning here\n</think>\n\nanswer", False, "reasoning here\n", "answer"),
    ("  \n<think>x</think>y", False, "x", "y"),
    # no tags and no think in the prompt: all content, verbatim
    ("Just an answer.\n", False, None, "Just an answer.\n"),
    ("\n\n  spaced answer", False, None, "\n\n  spaced answer"),
    # <think> not at the start is not reasoning
    ("Answer: <think>no</think> done", False, None, "Answer: <think>no</think> done"),
    # never closed: all reasoning
    ("thinking forever and", True, "thinking forever and", ""),
    ("<think>\nstill thinking", False, "still thinking", ""),
    ("", True, "", ""),
    ("", False, None, ""),
    # the model repeats the <think> that the prompt already opened
    ("<think>\nr</think>c", True, "r", "c"),
    # one reasoning block: later tags are content
    ("<think>a</think>b</think>c<think>d", False, "a", "b</think>c<think>d"),
    # near-tags that never complete are text
    ("abc</th", True, "abc</th", ""),
    ("<thi", False, None, "<thi"),
    ("<thinking>no</thinking>", False, None, "<thinking>no</thinking>"),
    ("a </thx> b</think>\n", True, "a </thx> b", ""),
    # only the newlines right after a tag are dropped, other whitespace kept
    ("\n\n  indented thought\n</think>\n\n  indented answer", True, "  indented thought\n", "  indented answer"),
    ("<think></think>\n\nno reasoning needed", False, "", "no reasoning needed"),
    ("\n</think>", True, "", ""),
]


@pytest.mark.parametrize("text,opened,reasoning,content", CASES)
def test_split_reasoning(text, opened, reasoning, content):
    assert split_reasoning(text, prompt_opened_think=opened) == (reasoning, content)


def _stream(text: str, opened: bool, cuts: list[int]) -> tuple[str | None, str, list[tuple[str, str]]]:
    parser = ReasoningStreamParser(prompt_opened_think=opened)
    pieces, start = [], 0
    for end in cuts + [len(text)]:
        pieces.append(parser.feed(text[start:end]))
        start = end
    pieces.append(parser.finish())
    reasoning = "".join(r for r, _ in pieces)
    content = "".join(c for _, c in pieces)
    return (reasoning if parser.has_reasoning else None), content, pieces


def _random_cuts(rng: random.Random, n: int) -> list[int]:
    k = rng.randint(0, n)
    return sorted(rng.sample(range(n + 1), k)) if n else []


@pytest.mark.parametrize("text,opened,reasoning,content", CASES)
def test_stream_equals_one_shot_on_random_chunkings(text, opened, reasoning, content):
    rng = random.Random(zlib.crc32(text.encode()) + opened)
    chunkings = [[], list(range(1, len(text)))] + [_random_cuts(rng, len(text)) for _ in range(150)]
    for cuts in chunkings:
        got_r, got_c, pieces = _stream(text, opened, cuts)
        assert (got_r, got_c) == (reasoning, content), f"cuts={cuts}"
        # deltas are only ever appended: every partial sum is a prefix of the final result
        acc_r = acc_c = ""
        for r, c in pieces:
            acc_r, acc_c = acc_r + r, acc_c + c
            assert (reasoning or "").startswith(acc_r) and content.startswith(acc_c)


def test_stream_equals_one_shot_on_generated_outputs():
    """Random outputs built from tag fragments, newlines and text, cut at random places."""
    rng = random.Random(0)
    atoms = ["<think>", "</think>", "</th", "ink>", "<", "/", "\n", "\n\n", " ", "a", "think", "<thi", "x>"]
    for _ in range(300):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 12)))
        for opened in (False, True):
            expected = split_reasoning(text, prompt_opened_think=opened)
            got_r, got_c, _ = _stream(text, opened, _random_cuts(rng, len(text)))
            assert (got_r, got_c) == expected, (text, opened)


def test_closing_tag_cut_across_chunks_is_held_then_released():
    parser = ReasoningStreamParser(prompt_opened_think=True)
    assert parser.feed("2 + 2 = 4</th") == ("2 + 2 = 4", "")
    assert parser.feed("ink>\n\nFour.") == ("", "Four.")
    assert parser.finish() == ("", "")


def test_held_prefix_that_is_not_a_tag_is_released_as_reasoning():
    parser = ReasoningStreamParser(prompt_opened_think=True)
    assert parser.feed("a</th") == ("a", "")
    assert parser.feed("is is prose") == ("</this is prose", "")
    assert parser.feed("</") == ("", "")
    assert parser.finish() == ("</", "")


def test_opening_tag_cut_across_chunks():
    parser = ReasoningStreamParser(prompt_opened_think=False)
    assert parser.feed("<th") == ("", "")
    assert not parser.has_reasoning
    assert parser.feed("ink>\n") == ("", "")
    assert parser.has_reasoning and parser.in_reasoning
    assert parser.feed("\nidea</think>") == ("idea", "")
    assert not parser.in_reasoning
    assert parser.feed("\n\nanswer <think>") == ("", "answer <think>")


def test_plain_text_is_not_delayed():
    parser = ReasoningStreamParser(prompt_opened_think=False)
    assert parser.feed("Hello") == ("", "Hello")
    assert parser.feed(" world</think>") == ("", " world</think>")
    parser = ReasoningStreamParser(prompt_opened_think=True)
    assert parser.feed("\n\nFirst") == ("First", "")
    assert parser.feed(" step") == (" step", "")


def test_prompt_opened_think_never_gives_null_reasoning():
    """vLLM's deepseek_r1 parser returns reasoning_content=None when the output lacks <think>; we must not."""
    parser = ReasoningStreamParser(prompt_opened_think=True)
    assert parser.has_reasoning
    parser.feed("only the answer")
    assert parser.finish() == ("", "")
    assert split_reasoning("only the answer", prompt_opened_think=True) == ("only the answer", "")
    assert split_reasoning("r</think>", prompt_opened_think=True) == ("r", "")


def test_prompt_opens_think():
    assert prompt_opens_think("<｜User｜>2+2?<｜Assistant｜><think>\n")
    assert not prompt_opens_think("<｜User｜>2+2?<｜Assistant｜>")
    assert not prompt_opens_think("<｜User｜>2+2?<｜Assistant｜></think>")
    assert not prompt_opens_think("<think>old</think><｜User｜>hi<｜Assistant｜>")
    assert prompt_opens_think("<think>old</think><｜User｜>hi<｜Assistant｜><think>")
