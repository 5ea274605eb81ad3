"""DeepSeek-V3 tool-call parser: fixed outputs one-shot, OpenAI streaming deltas, markers cut across chunks."""

import json
import random
import re
import zlib

import pytest

from r1forge.serve.tool_calls import (TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP,
                                      ToolCallDelta, ToolCallStreamParser, parse_tool_calls)


def call(name: str, args: str) -> str:
    """One call exactly as DeepSeek-V3's chat template writes it."""
    return f"{TOOL_CALL_BEGIN}function{TOOL_SEP}{name}\n```json\n{args}\n```{TOOL_CALL_END}"


WEATHER = '{"city": "Paris"}'
NESTED = ('{"location": {"city": "Paris", "coords": [48.85, 2.35]}, "note": "braces } { and \\"quotes\\" '
          'and ``` inside", "opts": {"a": {"b": [], "c": "<tag>"}}}')
BAD_JSON = '{"city": "Paris"'
ONE = "Let me check.\n\n" + TOOL_CALLS_BEGIN + call("get_weather", WEATHER) + TOOL_CALLS_END
TWO = (TOOL_CALLS_BEGIN + call("get_weather", WEATHER) + "\n" + call("get_time", '{"tz": "CET"}')
       + TOOL_CALLS_END)
NESTED_ONE = TOOL_CALLS_BEGIN + call("plan_trip", NESTED) + TOOL_CALLS_END
MALFORMED = "Checking.\n" + TOOL_CALLS_BEGIN + call("get_weather", BAD_JSON) + TOOL_CALLS_END
BAD_HEAD = TOOL_CALLS_BEGIN + f"{TOOL_CALL_BEGIN}get_weather{TOOL_SEP}{WEATHER}{TOOL_CALL_END}" + TOOL_CALLS_END
MIXED = (TOOL_CALLS_BEGIN + call("a", '{"x": 1}') + call("b", '["not", "an", "object"]') + " stray "
         + call("c", '{"y": {"z": 2}}') + TOOL_CALLS_END + "\nafter")
UNFINISHED = TOOL_CALL_BEGIN + "function" + TOOL_SEP + 'b\n```json\n{"y": '  # max_tokens hit mid-call
TRUNCATED = "Sure.\n" + TOOL_CALLS_BEGIN + call("a", '{"x": 1}') + "\n" + UNFINISHED
NO_FENCE = TOOL_CALLS_BEGIN + f"{TOOL_CALL_BEGIN}function{TOOL_SEP}f\n{WEATHER}{TOOL_CALL_END}" + TOOL_CALLS_END
CUT_SHORT = TOOL_CALLS_BEGIN + f"{TOOL_CALL_BEGIN}function{TOOL_SEP}f\n{WEATHER}" + call("g", "{}") + TOOL_CALLS_END

# text -> (content, [(name, arguments)])
CASES = {
    "plain": ("No tools needed: 1 < 2 and <｜ is not a marker.", []),
    "one": ("Let me check.\n\n", [("get_weather", WEATHER)]),
    "two": ("", [("get_weather", WEATHER), ("get_time", '{"tz": "CET"}')]),
    "nested": ("", [("plan_trip", NESTED)]),
    "malformed": ("Checking.\n" + call("get_weather", BAD_JSON), []),
    "bad_head": (f"{TOOL_CALL_BEGIN}get_weather{TOOL_SEP}{WEATHER}{TOOL_CALL_END}", []),
    "mixed": (call("b", '["not", "an", "object"]') + " stray " + "\nafter",
              [("a", '{"x": 1}'), ("c", '{"y": {"z": 2}}')]),
    "truncated": ("Sure.\n" + UNFINISHED, [("a", '{"x": 1}')]),
    "no_fence": ("", [("f", WEATHER)]),
    "cut_short": (f"{TOOL_CALL_BEGIN}function{TOOL_SEP}f\n{WEATHER}", [("g", "{}")]),
}
TEXTS = {"plain": CASES["plain"][0], "one": ONE, "two": TWO, "nested": NESTED_ONE, "malformed": MALFORMED,
         "bad_head": BAD_HEAD, "mixed": MIXED, "truncated": TRUNCATED, "no_fence": NO_FENCE, "cut_short": CUT_SHORT}
# cases whose every call is well formed or malformed before its JSON opens: streamed arguments agree with one-shot
STREAM_EXACT = ["plain", "one", "two", "nested", "bad_head", "no_fence"]


@pytest.mark.parametrize("name", CASES)
def test_parse_tool_calls(name):
    content, calls = parse_tool_calls(TEXTS[name])
    expected_content, expected_calls = CASES[name]
    assert content == expected_content
    assert [(c.name, c.arguments) for c in calls] == expected_calls
    for c in calls:
        assert re.fullmatch(r"call_[0-9a-f]{24}", c.id)
        assert isinstance(json.loads(c.arguments), dict)
    assert len({c.id for c in calls}) == len(calls)


def test_nested_arguments_round_trip():
    _, calls = parse_tool_calls(NESTED_ONE)
    assert json.loads(calls[0].arguments) == json.loads(NESTED)
    assert calls[0].to_openai() == {"id": calls[0].id, "type": "function",
                                    "function": {"name": "plan_trip", "arguments": NESTED}}


def _stream(text: str, cuts: list[int], stream_arguments: bool):
    parser = ToolCallStreamParser(stream_arguments=stream_arguments)
    outputs, start = [], 0
    for end in cuts + [len(text)]:
        outputs.append(parser.feed(text[start:end]))
        start = end
    outputs.append(parser.finish())
    return parser, outputs


def _assemble(outputs: list[tuple[str, list[ToolCallDelta]]]) -> tuple[str, list[tuple[str, str]], list[str]]:
    """Concatenate content deltas and rebuild the calls the way an OpenAI client does."""
    content, calls, ids = "", {}, []
    for text, deltas in outputs:
        content += text
        for d in deltas:
            if d.id is not None:
                assert d.index == len(calls) and d.name, "a call's first delta carries the next index, id and name"
                calls[d.index] = [d.name, ""]
                ids.append(d.id)
            assert d.index in calls, "argument delta for an unannounced call"
            calls[d.index][1] += d.arguments
    return content, [tuple(v) for _, v in sorted(calls.items())], ids


def _chunkings(text: str, count: int) -> list[list[int]]:
    rng = random.Random(zlib.crc32(text.encode()))
    n = len(text)
    return [[], list(range(1, n))] + [sorted(rng.sample(range(n + 1), rng.randint(0, n))) for _ in range(count)]


@pytest.mark.parametrize("name", CASES)
def test_buffered_stream_equals_one_shot(name):
    text = TEXTS[name]
    expected_content, expected_calls = CASES[name]
    for cuts in _chunkings(text, 60):
        parser, outputs = _stream(text, cuts, stream_arguments=False)
        content, calls, ids = _assemble(outputs)
        assert (content, calls) == (expected_content, expected_calls), f"cuts={cuts}"
        assert [(c.name, c.arguments) for c in parser.tool_calls] == expected_calls
        assert [c.id for c in parser.tool_calls] == ids and parser.invalid_call_indices == []


@pytest.mark.parametrize("name", STREAM_EXACT)
def test_streamed_arguments_equal_one_shot(name):
    text = TEXTS[name]
    expected_content, expected_calls = CASES[name]
    for cuts in _chunkings(text, 60):
        parser, outputs = _stream(text, cuts, stream_arguments=True)
        assert _assemble(outputs)[:2] == (expected_content, expected_calls), f"cuts={cuts}"
        assert parser.invalid_call_indices == [] and parser.has_tool_calls == bool(expected_calls)


def test_arguments_stream_as_they_arrive_without_fences():
    parser = ToolCallStreamParser()
    content, deltas = parser.feed("Checking." + TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "function" + TOOL_SEP + "plan")
    assert content == "Checking." and deltas == []  # the name may still grow
    content, deltas = parser.feed("_trip\n```json\n")
    assert deltas == []  # the JSON has not opened: a malformed call could still turn out to be content
    _, deltas = parser.feed('{"location": {"ci')
    assert len(deltas) == 1 and deltas[0].name == "plan_trip" and deltas[0].id.startswith("call_")
    assert deltas[0].arguments == '{"location": {"ci'
    assert deltas[0].to_openai() == {"index": 0, "id": deltas[0].id, "type": "function",
                                     "function": {"name": "plan_trip", "arguments": '{"location": {"ci'}}
    _, deltas = parser.feed('ty": "}"}}\n``')
    assert [d.to_openai() for d in deltas] == [{"index": 0, "function": {"arguments": 'ty": "}"}}'}}]
    assert parser.feed("`" + TOOL_CALL_END) == ("", [])
    assert parser.feed(TOOL_CALLS_END) == ("", [])
    assert parser.finish() == ("", [])
    assert parser.tool_calls[0].arguments == '{"location": {"city": "}"}}'


def test_char_by_char_streams_arguments_incrementally():
    parser, outputs = _stream(NESTED_ONE, list(range(1, len(NESTED_ONE))), stream_arguments=True)
    arg_deltas = [d for _, ds in outputs for d in ds]
    assert len(arg_deltas) > len(NESTED) // 2  # held back only where a character could start a marker
    assert "".join(d.arguments for d in arg_deltas) == NESTED  # the fences around it are not arguments


def test_marker_cut_across_chunks():
    parser = ToolCallStreamParser()
    assert parser.feed("Hi <｜tool▁ca") == ("Hi ", [])  # could be the begin marker: held
    assert parser.feed("lls▁begin｜>" + TOOL_CALL_BEGIN + "function<｜tool▁") == ("", [])
    _, deltas = parser.feed('sep｜>f\n```json\n{"a": "x<｜to')
    assert [(d.name, d.arguments) for d in deltas] == [("f", '{"a": "x')]  # "<｜to" held: could end the call
    _, deltas = parser.feed('ol▁x"}\n```<｜tool▁call')
    assert [d.arguments for d in deltas] == ['<｜tool▁x"}']  # released: it was not a marker
    assert parser.feed("▁end｜><｜tool▁calls▁end｜>tail") == ("tail", [])
    assert parser.finish() == ("", [])
    assert [(c.name, c.arguments) for c in parser.tool_calls] == [("f", '{"a": "x<｜tool▁x"}')]
    assert parser.invalid_call_indices == []
    parser = ToolCallStreamParser()
    assert parser.feed("a <｜tool") == ("a ", [])
    assert parser.feed(" not a marker") == ("<｜tool not a marker", [])
    assert parser.feed("<") == ("", [])
    assert parser.finish() == ("<", [])


def test_malformed_json_after_announcement_stays_a_call():
    """Streaming arguments cannot be taken back: the call keeps its text and is flagged, nothing is lost."""
    parser, outputs = _stream(MALFORMED, [], stream_arguments=True)
    content, calls, _ = _assemble(outputs)
    assert content == "Checking.\n"
    # the object never closed, so the scanner could not tell the closing fence from argument text
    assert calls == [("get_weather", BAD_JSON + "\n```")] and parser.invalid_call_indices == [0]
    parser, outputs = _stream(TRUNCATED, [], stream_arguments=True)
    content, calls, _ = _assemble(outputs)
    assert content == "Sure.\n" and calls == [("a", '{"x": 1}'), ("b", '{"y": ')]
    assert parser.invalid_call_indices == [1]


def test_malformed_call_without_streaming_is_content():
    parser, outputs = _stream(MALFORMED, [5, 20, 40], stream_arguments=False)
    content, calls, _ = _assemble(outputs)
    assert calls == [] and content == CASES["malformed"][0] and BAD_JSON in content


def test_stream_equals_one_shot_on_generated_outputs():
    """Random sequences of markers, marker fragments, JSON pieces and text, cut at random places."""
    rng = random.Random(1)
    atoms = [TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP, "function", "get_x",
             "<｜tool▁", "call▁end｜>", "```json\n", "\n```", '{"a": 1}', '{"b": "}{"}', "{", "}", '"', "\n", " ",
             "text", "<"]
    for _ in range(400):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 14)))
        if rng.random() < 0.5:  # make well-formed calls common
            text = rng.choice(["", "pre "]) + TOOL_CALLS_BEGIN + call("f", '{"a": [1, {"b": "c"}]}') + text
        content, calls = parse_tool_calls(text)
        expected = (content, [(c.name, c.arguments) for c in calls])
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, len(text))))
        parser, outputs = _stream(text, cuts, stream_arguments=False)
        assert _assemble(outputs)[:2] == expected, repr(text)
        parser, outputs = _stream(text, cuts, stream_arguments=True)
        if not parser.invalid_call_indices:
            assert _assemble(outputs)[:2] == expected, repr(text)
