"""Counters of what the rewards could not score, and the wrapper that makes every reward total and bounded.

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

KINDS = ("calls", "unparsable", "timeout", "error", "non_finite", "clipped")
# Rule-based rewards are O(1). One past a million in magnitude is a bug or a unit mistake, and near 1e19 the
# float32 statistics GRPO takes of rewards (squares for the group std) overflow to inf; beyond 3.4e38 the value
# itself becomes inf in the float32 reward tensor. Such a reward is clipped to +-MAX_ABS_REWARD and counted.
MAX_ABS_REWARD = 1e6


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


def finite_reward(name: str, value: float, stats: RewardStats | None = None) -> float:
    """`value` as a reward GRPO can take statistics of: NaN/inf -> 0 ("non_finite"), beyond +-MAX_ABS_REWARD
    -> clipped ("clipped"), both counted under `name`."""
    st = stats if stats is not None else REWARD_STATS
    if not math.isfinite(value):
        st.record(name, "non_finite")
        return 0.0
    if abs(value) > MAX_ABS_REWARD:
        st.record(name, "clipped")
        return math.copysign(MAX_ABS_REWARD, value)
    return value


def call_with_timeout(name: str, fn: Callable[..., float], timeout_s: float | None, *args: Any,
                      stats: RewardStats | None = None, **kwargs: Any) -> float:
    """`fn(*args, **kwargs)` (a guarded reward: it returns a float and never raises), 0 after `timeout_s`.

    Why a thread: user rewards are arbitrary Python callables (closures, lambdas) that a worker process cannot
    receive, and a signal alarm only works in the main thread. A call past its time is counted as "timeout"
    under `name` and left behind in its daemon thread (Python cannot stop a thread): its result is dropped, and
    a reward that never returns keeps that one thread. Math equivalence, which can truly run forever in C code,
    has its own killable process (r1forge.rl.rewards.checker).
    """
    if timeout_s is None:
        return fn(*args, **kwargs)
    box: list[Any] = []

    def target() -> None:
        try:
            box.append(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - carried to the caller, who decides
            box.append(e)

    thread = threading.Thread(target=target, name=f"reward:{name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive() or not box:
        (stats if stats is not None else REWARD_STATS).record(name, "timeout")
        return 0.0
    if isinstance(box[0], BaseException):
        if isinstance(box[0], KeyboardInterrupt):
            raise box[0]
        (stats if stats is not None else REWARD_STATS).record(name, "error")  # guarded lets only these through
        return 0.0
    return box[0]


def guarded(name: str, stats: RewardStats | None = None) -> Callable[[Callable[..., Any]], RewardFunction]:
    """Decorator: the wrapped reward never raises and always returns a finite float.

    Unparsable -> 0 counted as "unparsable"; TimeoutError -> 0 counted as "timeout"; any other exception,
    SystemExit included (a `sys.exit()` in a reward must not end the run with status 0; only KeyboardInterrupt
    passes) -> 0 counted as "error"; a return value float() rejects -> 0 counted as "error"; NaN/inf -> 0
    counted as "non_finite"; |value| > MAX_ABS_REWARD -> clipped to +-MAX_ABS_REWARD, counted as "clipped".
    `stats` defaults to the module-wide REWARD_STATS (looked up at call time).
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
            except KeyboardInterrupt:
                raise
            except BaseException:  # noqa: BLE001 - a reward must never stop a training step, nor exit the process
                st.record(name, "error")
                return 0.0
            try:
                value = float(value)
            except Exception:  # noqa: BLE001 - float() of a user object can raise anything
                st.record(name, "error")
                return 0.0
            return finite_reward(name, value, st)

        reward.reward_name = name  # type: ignore[attr-defined]
        return reward

    return wrap
