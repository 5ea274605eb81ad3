"""Parse DeepSeek-V3 / R1 tool calls out of model output, one-shot or as OpenAI streaming deltas.

The format (DeepSeek-V3's chat template; one or more calls, separated by optional whitespace)::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
    ```json
    {"city": "Paris"}
    ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

Rules shared by `parse_tool_calls` and `ToolCallStreamParser`:

1. Text before `<｜tool▁calls▁begin｜>` (and after `<｜tool▁calls▁end｜>`) is content. The markers are
   always markers, even inside a JSON string: DeepSeek's tokenizer has one token for each.
2. A call's body runs from `<｜tool▁call▁begin｜>` to `<｜tool▁call▁end｜>`. It is well formed when it reads
   `function<｜tool▁sep｜>NAME`, an optional ```` ```json ```` fence, one JSON object, an optional closing fence
   (whitespace allowed between them). The arguments are the object's text exactly as generated.
3. A malformed call (bad head, invalid JSON, not an object, stray text, cut off by another marker or by the
   end of the output) is not dropped: its raw text, markers included, is returned as content.
4. Between calls, whitespace is dropped and any other text is content.

The text passed in must keep the tool markers (detokenise without skipping them). Text whose request had
no `tools` should not go through this parser at all.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

TOOL_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
TOOL_CALLS_END = "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN = "<｜tool▁call▁begin｜>"
TOOL_CALL_END = "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"
TOOL_NAME_CHARS = r"A-Za-z0-9_.\-"  # characters of a function name; protocol.py validates declared names with it

# Head of a call body, up to (not including) the "{" that opens the arguments. Every quantifier stops at "{",
# so a match on a prefix of the body is the match on the whole body: the stream parser relies on it.
_HEAD_RE = re.compile(rf"\s*function\s*{re.escape(TOOL_SEP)}\s*([{TOOL_NAME_CHARS}]+)\s*(?:```[A-Za-z]*)?\s*(?=\{{)")
_TAIL_RE = re.compile(r"\s*(?:```)?\s*")
_DECODER = json.JSONDecoder()
_SECTION_MARKERS = (TOOL_CALL_BEGIN, TOOL_CALLS_END)
_CALL_MARKERS = (TOOL_CALL_END, TOOL_CALL_BEGIN, TOOL_CALLS_END)


def new_tool_call_id() -> str:
    """An OpenAI-style tool call id: `call_` and 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCall:
    """One complete call. `arguments` is the JSON object's text as the model wrote it (OpenAI's convention)."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolCallDelta:
    """One streaming piece of a call: the first carries id and name, the rest only argument text to append."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None

    def to_openai(self) -> dict[str, Any]:
        """The `choices[].delta.tool_calls[]` entry of a chat completion chunk."""
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def _parse_call_body(body: str) -> tuple[str, str] | None:
    """(name, arguments) of a well-formed call body (rule 2), else None."""
    head = _HEAD_RE.match(body)
    if head is None:
        return None
    start = head.end()
    try:
        obj, end = _DECODER.raw_decode(body, start)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or _TAIL_RE.fullmatch(body, end) is None:
        return None
    return head.group(1), body[start:end]


def _first_marker(text: str, markers: tuple[str, ...]) -> tuple[str | None, int]:
    """The marker that occurs first in `text` and its position, or (None, -1)."""
    best, pos = None, -1
    for marker in markers:
        i = text.find(marker)
        if i >= 0 and (pos < 0 or i < pos):
            best, pos = marker, i
    return best, pos


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """Split a complete output into (content, calls).

    Args:
        text: the generated content (after reasoning was split off), tool markers kept.
    Returns:
        content: the text around the calls plus the raw text of malformed calls (rules 1, 3, 4), "" if none.
        calls: the well-formed calls, in order, each with a fresh id.
    """
    content: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    while True:
        begin = text.find(TOOL_CALLS_BEGIN, pos)
        if begin < 0:
            content.append(text[pos:])
            return "".join(content), calls
        content.append(text[pos:begin])
        pos = begin + len(TOOL_CALLS_BEGIN)
        while True:  # inside a section
            marker, i = _first_marker(text[pos:], _SECTION_MARKERS)
            gap = text[pos:] if marker is None else text[pos:pos + i]
            if gap.strip():
                content.append(gap)
            if marker is None:
                return "".join(content), calls
            pos += i + len(marker)
            if marker == TOOL_CALLS_END:
                break
            end_marker, j = _first_marker(text[pos:], _CALL_MARKERS)
            body = text[pos:] if end_marker is None else text[pos:pos + j]
            closed = end_marker == TOOL_CALL_END
            parsed = _parse_call_body(body) if closed else None
            if parsed is not None:
                calls.append(ToolCall(new_tool_call_id(), *parsed))
            else:
                content.append(TOOL_CALL_BEGIN + body + (TOOL_CALL_END if closed else ""))
            if end_marker is None:
                return "".join(content), calls
            pos += j + (len(TOOL_CALL_END) if closed else 0)


def _held_suffix_len(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `markers`."""
    longest = max(len(m) for m in markers) - 1
    for k in range(min(len(text), longest), 0, -1):
        tail = text[-k:]
        if any(m.startswith(tail) for m in markers):
            return k
    return 0


class ToolCallStreamParser:
    """Incremental `parse_tool_calls` producing OpenAI `delta.content` text and `delta.tool_calls` entries.

    With `stream_arguments=True` (default) a call is announced (index, id, type, name) as soon as its head is
    complete and its JSON opens, and its argument text is streamed as it arrives, fences stripped; a JSON
    scanner (strings and escapes aware) finds where the object closes. The cost: a call found malformed
    only *after* it was announced (invalid JSON, a stray tail, cut off) cannot be taken back. It then stays a
    call whose arguments are the text as generated (OpenAI's own caveat: arguments may not be valid JSON),
    and its index is listed in `invalid_call_indices`. A call malformed before its announcement is content,
    as in `parse_tool_calls`.
    With `stream_arguments=False` each call is held until its end marker and emitted in one delta, and the
    stream's result equals `parse_tool_calls` exactly, malformed calls included.
    Only text that could still be a marker is held back (e.g. a trailing `"<｜tool▁ca"`).
    """

    _CONTENT, _SECTION, _CALL = "content", "section", "call"

    def __init__(self, stream_arguments: bool = True) -> None:
        self.stream_arguments = stream_arguments
        self.tool_calls: list[ToolCall] = []  # every announced call, arguments as sent
        self.invalid_call_indices: list[int] = []  # announced calls that turned out malformed
        self._state = self._CONTENT
        self._buf = ""  # unprocessed text (only a possible marker prefix between calls to feed)
        self._gap, self._gap_has_text = "", False  # text between calls: dropped if only whitespace
        self._body = ""  # body of the current call so far
        self._call: ToolCall | None = None  # the current call once announced
        self._scan = 0  # position in _body up to which the arguments were scanned and sent
        self._depth, self._in_string, self._escape, self._json_done = 0, False, False, False
        self._content: list[str] = []
        self._deltas: list[ToolCallDelta] = []

    @property
    def has_tool_calls(self) -> bool:
        return bool(self.tool_calls)

    def feed(self, delta_text: str) -> tuple[str, list[ToolCallDelta]]:
        """Consume the next piece of output; returns (content delta, tool call deltas) now settled."""
        self._buf += delta_text
        self._process(final=False)
        return self._take()

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """End of output: held text is released and an unfinished call is closed as malformed."""
        self._process(final=True)
        return self._take()

    def _take(self) -> tuple[str, list[ToolCallDelta]]:
        content, deltas = "".join(self._content), self._deltas
        self._content, self._deltas = [], []
        return content, deltas

    def _process(self, final: bool) -> None:
        while True:
            markers = {self._CONTENT: (TOOL_CALLS_BEGIN,), self._SECTION: _SECTION_MARKERS,
                       self._CALL: _CALL_MARKERS}[self._state]
            marker, i = _first_marker(self._buf, markers)
            if marker is None:
                keep = 0 if final else _held_suffix_len(self._buf, markers)
                text, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                self._consume(text)
                if final and self._state == self._CALL:
                    self._end_call(closed=False)
                    self._state = self._SECTION
                return
            self._consume(self._buf[:i])
            if self._state == self._CONTENT:
                self._state, self._gap, self._gap_has_text = self._SECTION, "", False
            elif self._state == self._SECTION:
                self._state = self._CALL if marker == TOOL_CALL_BEGIN else self._CONTENT
                self._gap, self._gap_has_text = "", False
                if marker == TOOL_CALL_BEGIN:
                    self._start_call()
            else:
                self._end_call(closed=marker == TOOL_CALL_END)
                self._state = self._SECTION
                if marker != TOOL_CALL_END:  # another marker cut this call short: the section handles it
                    self._buf = self._buf[i:]
                    continue
            self._buf = self._buf[i + len(marker):]

    def _consume(self, text: str) -> None:
        if not text:
            return
        if self._state == self._CONTENT:
            self._content.append(text)
        elif self._state == self._SECTION:
            if not self._gap_has_text:
                self._gap += text
                if self._gap.strip():
                    self._content.append(self._gap)
                    self._gap, self._gap_has_text = "", True
            else:
                self._content.append(text)
        else:
            self._body += text
            if self.stream_arguments:
                self._stream_arguments()

    def _start_call(self) -> None:
        self._body, self._call, self._scan = "", None, 0
        self._depth, self._in_string, self._escape, self._json_done = 0, False, False, False

    def _emit(self, delta: ToolCallDelta) -> None:
        last = self._deltas[-1] if self._deltas else None
        if last is not None and last.index == delta.index and delta.id is None:
            last.arguments += delta.arguments
        else:
            self._deltas.append(delta)

    def _announce(self, name: str, arguments: str) -> ToolCall:
        call = ToolCall(new_tool_call_id(), name, arguments)
        self._emit(ToolCallDelta(len(self.tool_calls), arguments, call.id, name))
        self.tool_calls.append(call)
        return call

    def _stream_arguments(self) -> None:
        if self._call is None:
            head = _HEAD_RE.match(self._body)
            if head is None:
                return
            self._call, self._scan = self._announce(head.group(1), ""), head.end()
        if self._json_done:
            return
        end = len(self._body)
        for j in range(self._scan, len(self._body)):
            c = self._body[j]
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif c == "\\":
                    self._escape = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._json_done, end = True, j + 1
                    break
        piece, self._scan = self._body[self._scan:end], end
        if piece:
            self._call.arguments += piece
            self._emit(ToolCallDelta(len(self.tool_calls) - 1, piece))

    def _end_call(self, closed: bool) -> None:
        parsed = _parse_call_body(self._body) if closed else None
        if self._call is not None:  # already announced and streamed
            if parsed is None or parsed[1] != self._call.arguments:
                self.invalid_call_indices.append(len(self.tool_calls) - 1)
        elif parsed is not None:
            self._announce(*parsed)
        else:
            self._content.append(TOOL_CALL_BEGIN + self._body + (TOOL_CALL_END if closed else ""))
        self._start_call()
