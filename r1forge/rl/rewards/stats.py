"""Counters of what the rewards could not score, and the wrapper that makes every reward total.

Why: a reward that silently returns 0 for every sample looks exactly like a model that learns nothing. Rewards
never raise (one bad completion must not stop a training step), so instead they count, per reward name, the
completions they could not parse, the checks that timed out and the errors they swallowed; the trainer logs
`REWARD_STATS.as_metrics()` and calls `reset()` when it wants per-step numbers.
"""

from __future__ import annotations

import functools
import math
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

KINDS = ("calls", "unparsable", "timeout", "error", "non_finite")


class RewardFunction(Protocol):
    """Every reward: `reward(prompt, completion, **example) -> float` (example holds e.g. `answer=`)."""

    def __call__(self, prompt: str, completion: str, /, **example: Any) -> float: ...


class Unparsable(Exception):
    """Raised inside a reward when the completion (or the reference) has nothing to score: scores 0, counted."""


class RewardStats:
    """Thread-safe counts per reward name and kind ("calls", "unparsable", "timeout", "error", "non_finite")."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, Counter[str]] = {}

    def record(self, name: str, kind: str, n: int = 1) -> None:
        with self._lock:
            self._counts.setdefault(name, Counter())[kind] += n

    def count(self, name: str, kind: str) -> int:
        with self._lock:
            return self._counts.get(name, Counter())[kind]

    def snapshot(self) -> dict[str, dict[str, int]]:
        """A copy: {reward name: {kind: count}}."""
        with self._lock:
            return {name: dict(c) for name, c in self._counts.items()}

    def as_metrics(self, prefix: str = "reward_stats") -> dict[str, float]:
        """Flat `{prefix/name/kind: count}` for a metrics logger."""
        return {f"{prefix}/{name}/{kind}": float(n) for name, c in self.snapshot().items() for kind, n in c.items()}

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()


REWARD_STATS = RewardStats()


def to_text(value: Any) -> str:
    """Any completion/prompt as a str that encodes to UTF-8: bytes are decoded with errors="replace", lone
    surrogates (from a lossy detokenizer or surrogateescape) become "?", None becomes ""."""
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", errors="replace")
    if not isinstance(value, str):
        value = str(value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", errors="replace").decode("utf-8")
    return value


def guarded(name: str, stats: RewardStats | None = None) -> Callable[[Callable[..., Any]], RewardFunction]:
    """Decorator: the wrapped reward never raises and always returns a finite float.

    Unparsable -> 0 counted as "unparsable"; TimeoutError -> 0 counted as "timeout"; any other Exception -> 0
    counted as "error"; a return value float() rejects -> 0 counted as "error"; NaN/inf -> 0 counted as
    "non_finite". `stats` defaults to the module-wide REWARD_STATS (looked up at call time).
    prompt and completion are positional-only, so an example that holds its own "prompt" column can still be
    passed as **example; those two keys are dropped before `fn` sees the example.
    """

    def wrap(fn: Callable[..., Any]) -> RewardFunction:
        @functools.wraps(fn)
        def reward(prompt: Any = "", completion: Any = "", /, **example: Any) -> float:
            st = stats if stats is not None else REWARD_STATS
            st.record(name, "calls")
            if "prompt" in example or "completion" in example:  # datasets often carry a "prompt" column
                example = {k: v for k, v in example.items() if k not in ("prompt", "completion")}
            try:
                value = fn(prompt, completion, **example)
            except Unparsable:
                st.record(name, "unparsable")
                return 0.0
            except TimeoutError:
                st.record(name, "timeout")
                return 0.0
            except Exception:  # noqa: BLE001 - a reward must never stop a training step
                st.record(name, "error")
                return 0.0
            try:
                value = float(value)
            except Exception:  # noqa: BLE001 - float() of a user object can raise anything
                st.record(name, "error")
                return 0.0
            if not math.isfinite(value):
                st.record(name, "non_finite")
                return 0.0
            return value

        reward.reward_name = name  # type: ignore[attr-defined]
        return reward

    return wrap
