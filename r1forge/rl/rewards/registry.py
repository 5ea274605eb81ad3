"""Rewards by name, user rewards from "module:function" or "file.py:function", and their weighted sum.

A run's config names its rewards (`{"accuracy": 1.0, "format": 0.5, "my_pkg.rewards:brevity": 0.1}`);
`combine_rewards` turns that into the `reward_fn(prompt, completion, **example) -> (total, components)` the
rollout calls, the components (unweighted, by name) going to the logs.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from r1forge.rl.rewards.accuracy import accuracy_reward
from r1forge.rl.rewards.format_rewards import format_reward, format_reward_soft, language_consistency_reward
from r1forge.rl.rewards.stats import RewardFunction, call_with_timeout, finite_reward, guarded

REWARD_FUNCTIONS: dict[str, RewardFunction] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "format_soft": format_reward_soft,
    "language": language_consistency_reward,
}


def register_reward(name: str, fn: Callable[..., Any]) -> RewardFunction:
    """Add a reward under `name` (wrapped so that it never raises); returns the wrapped reward."""
    if not name or ":" in name:
        raise ValueError(f"reward name {name!r} must be non-empty and contain no ':' (that marks a user spec)")
    REWARD_FUNCTIONS[name] = guarded(name)(fn)
    return REWARD_FUNCTIONS[name]


def _load_callable(spec: str) -> Callable[..., Any]:
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(f"reward {spec!r}: expected 'package.module:function' or 'path/to/file.py:function'")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise ValueError(f"reward {spec!r}: file {str(path)!r} does not exist")
        module_name = "r1forge_user_reward_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ValueError(f"reward {spec!r}: cannot load {str(path)!r} as a Python module")
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            raise ValueError(f"reward {spec!r}: importing {str(path)!r} failed: {exc!r}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise ValueError(f"reward {spec!r}: cannot import module {target!r}: {exc!r}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward {spec!r}: {target!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward {spec!r}: {attr!r} is not callable")
    return obj


def load_reward(spec: str) -> RewardFunction:
    """A user reward from `"package.module:function"` or `"path/to/file.py:function"`, called as
    `fn(prompt, completion, **example)`. Config errors (no such file/module/function) raise ValueError now;
    at call time it never raises: errors score 0 and are counted, the result is coerced to float, and a
    non-finite result scores 0 and is counted, all under the name `spec` in REWARD_STATS."""
    return guarded(spec)(_load_callable(spec))


def get_reward(name: str) -> RewardFunction:
    """A registered reward by name, or a user reward when `name` is a "module:function" / "file.py:function"."""
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    if ":" in name:
        return load_reward(name)
    raise ValueError(f"unknown reward {name!r}; known: {sorted(REWARD_FUNCTIONS)}, or 'module:function'")


class CombinedReward:
    """sum_k weight_k * reward_k(prompt, completion, **example), returned with the unweighted components.

    `timeout_s`: each component call scoring 0 (counted as "timeout" under its name) when it runs longer (see
    `call_with_timeout`); None waits for ever. The weighted sum is bounded as each component is
    (`finite_reward`, counted under "weighted_sum").
    """

    def __init__(self, rewards: Sequence[tuple[str, RewardFunction, float]], timeout_s: float | None = None) -> None:
        self.rewards = list(rewards)
        self.timeout_s = timeout_s

    @property
    def weights(self) -> dict[str, float]:
        return {name: weight for name, _, weight in self.rewards}

    def with_timeout(self, timeout_s: float | None) -> "CombinedReward":
        """The same rewards and weights, each call limited to `timeout_s` seconds."""
        return CombinedReward(self.rewards, timeout_s)

    def __call__(self, prompt: Any, completion: Any, /, **example: Any) -> tuple[float, dict[str, float]]:
        components = {name: call_with_timeout(name, fn, self.timeout_s, prompt, completion, **example)
                      for name, fn, _ in self.rewards}
        total = sum(weight * components[name] for name, _, weight in self.rewards)
        return finite_reward("weighted_sum", total), components


def combine_rewards(names_and_weights: Mapping[str, float] | Sequence[str | tuple[str, float]]) -> CombinedReward:
    """Build the rollout's reward_fn from `{"accuracy": 1.0, "format": 0.5}`, `[("accuracy", 1.0), ...]` or
    `["accuracy", "format"]` (weight 1). Names are registry names or user specs (see get_reward)."""
    items = list(names_and_weights.items()) if isinstance(names_and_weights, Mapping) else [
        (x, 1.0) if isinstance(x, str) else tuple(x) for x in names_and_weights]
    if not items:
        raise ValueError("rewards: at least one reward is needed, e.g. {'accuracy': 1.0, 'format': 0.5}")
    rewards, seen = [], set()
    for item in items:
        if len(item) != 2:
            raise ValueError(f"rewards: expected (name, weight) pairs, got {item!r}")
        name, weight = item
        if name in seen:
            raise ValueError(f"rewards: {name!r} is listed twice")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"rewards: the weight of {name!r} must be a finite number, got {weight!r}")
        seen.add(name)
        rewards.append((name, get_reward(name), float(weight)))
    return CombinedReward(rewards)
