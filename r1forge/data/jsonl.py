"""JSONL reading with errors that name file and line, record validators for pretraining and chat data, and the
atomic writers every dataset, report and cache marker goes through.

A malformed line (invalid JSON, not an object, a missing key, a value of the wrong type) raises `DataError`
with `path:line: what is wrong`, or, with `skip_malformed=True`, is skipped and counted so a large scraped file
can still be used while the count tells how much was lost. Blank lines are not records and are ignored.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from r1forge.checkpoint.atomic import new_file_mode

ROLES = ("system", "user", "assistant", "tool")
Validator = Callable[[dict[str, Any]], None]


class DataError(ValueError):
    """A bad record in a data file; the message starts with `path:line:`."""

    def __init__(self, path: str | os.PathLike, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path = str(path)
        self.line = line


def validate_text_record(record: dict[str, Any], key: str = "text") -> None:
    """A pretraining record: `{"text": str}`."""
    if key not in record:
        raise ValueError(f"missing key {key!r}")
    if not isinstance(record[key], str):
        raise ValueError(f"{key!r} must be a string, got {type(record[key]).__name__}")


def _validate_content(content: Any, where: str, may_be_none: bool) -> None:
    if content is None and may_be_none:
        return
    if isinstance(content, str):
        return
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in content):
        return
    raise ValueError(f"{where}.content must be a string (or a list of text parts), got {type(content).__name__}")


def validate_chat_record(record: dict[str, Any]) -> None:
    """A chat record: `{"messages": [{"role": ..., "content": ...}, ...]}` with at least one assistant turn."""
    messages = record.get("messages")
    if messages is None:
        raise ValueError("missing key 'messages'")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
        calls = message.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list):
                raise ValueError(f"{where}.tool_calls must be a list on an assistant message")
            for j, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise ValueError(f"{where}.tool_calls[{j}].function.name must be a string")
        if "content" not in message and not calls:
            raise ValueError(f"{where} is missing key 'content'")
        _validate_content(message.get("content"), where, may_be_none=bool(calls))
        reasoning = message.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise ValueError(f"{where}.reasoning_content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message: nothing to train on")


class JsonlReader:
    """Iterate `(line_number, record)` over a JSONL file; `num_skipped` counts malformed lines skipped.

    Args:
        path: the file.
        validate: raises ValueError on a record of the wrong shape (e.g. `validate_chat_record`).
        skip_malformed: skip and count bad lines instead of raising `DataError`.
    """

    def __init__(self, path: str | os.PathLike, validate: Validator | None = None,
                 skip_malformed: bool = False) -> None:
        self.path = Path(path)
        self.validate = validate
        self.skip_malformed = skip_malformed
        self.num_skipped = 0
        if not self.path.is_file():
            raise ValueError(f"data file not found: {self.path}")

    def _parse(self, line_no: int, line: str) -> dict[str, Any]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(self.path, line_no, f"invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(self.path, line_no, f"expected a JSON object, got {type(record).__name__}")
        if self.validate is not None:
            try:
                self.validate(record)
            except ValueError as e:
                raise DataError(self.path, line_no, str(e)) from None
        return record

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        with open(self.path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield line_no, self._parse(line_no, line)
                except DataError:
                    if not self.skip_malformed:
                        raise
                    self.num_skipped += 1


def iter_jsonl(path: str | os.PathLike, validate: Validator | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """`(line_number, record)` pairs; the first malformed line raises `DataError`."""
    return iter(JsonlReader(path, validate))


def read_jsonl(path: str | os.PathLike, validate: Validator | None = None,
               skip_malformed: bool = False) -> tuple[list[dict[str, Any]], int]:
    """All records of a file and the number of malformed lines skipped (always 0 unless skip_malformed)."""
    reader = JsonlReader(path, validate, skip_malformed)
    records = [record for _, record in reader]
    return records, reader.num_skipped


def _write_atomically(path: str | os.PathLike, write: Callable[[TextIO], None]) -> None:
    """Write a file through `write(f)` into a temp file beside it, fsync, then rename over `path`: a reader (or
    a later `r1forge sft`) sees the old file or the whole new one, never half of it, even if the run is killed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, new_file_mode(path.parent))  # mkstemp makes it 0600; give it what open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """One JSON object per line (UTF-8 kept readable, no \\u escapes), written atomically; the record count."""
    count = 0

    def write(f: TextIO) -> None:
        nonlocal count
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1

    _write_atomically(path, write)
    return count


def append_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Append records to a log (sample completions): a log grows while the run writes it, so it is not atomic;
    a torn last line after a kill is what `read_metrics`-style readers skip."""
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_json(path: str | os.PathLike, obj: dict[str, Any]) -> None:
    """A small JSON file (a report, statistics, a stage's DONE marker), written atomically like the datasets."""
    _write_atomically(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"))
