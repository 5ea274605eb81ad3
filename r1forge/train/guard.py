"""The loss / NaN guard: a step with a non-finite loss or gradient norm is skipped, too many in a row stop the run.

A run whose last steps are a bad streak (shorter than `max_bad_steps`, at the end of the schedule) has not
finished healthy either: the trainer reports it as diverged too, naming the steps, so no run ending in NaNs is
ever called "completed".

A skipped step makes no optimizer update and no router-bias update; the data it consumed stays consumed (the
same batch would likely fail again). Stopping leaves the last checkpoint as it was: nothing is saved from a
run whose updates have gone bad.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass
class NonFiniteGuard:
    """Counts consecutive bad steps, and remembers where the current streak began and why its last step failed.

    Args:
        max_bad_steps: this many non-finite steps in a row mean the run should stop.
    """

    max_bad_steps: int = 5
    consecutive: int = 0
    total: int = 0
    streak_start: int | None = None  # the first step of the current bad streak (None: no streak)
    reason: str = ""  # what was non-finite in the latest bad step, e.g. "loss=nan"

    @staticmethod
    def is_finite(*values: float) -> bool:
        return all(math.isfinite(v) for v in values)

    def check(self, *values: float, step: int | None = None, reason: str = "") -> bool:
        """Record one step (`step`: its number, `reason`: what was non-finite); True when it may be applied."""
        if self.is_finite(*values):
            self.consecutive, self.streak_start, self.reason = 0, None, ""
            return True
        if self.consecutive == 0:
            self.streak_start = step
        self.consecutive += 1
        self.total += 1
        self.reason = reason
        return False

    @property
    def should_stop(self) -> bool:
        return self.consecutive >= self.max_bad_steps

    def describe(self, last_step: int) -> str:
        """The current streak in words: "steps 4-6 (3 in a row) were non-finite (last: loss=nan)"."""
        first = self.streak_start if self.streak_start is not None else last_step - self.consecutive + 1
        steps = f"step {last_step}" if first == last_step else f"steps {first}-{last_step}"
        return f"{steps} ({self.consecutive} in a row) were non-finite" + (f" (last: {self.reason})" if self.reason
                                                                            else "")

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": self.consecutive, "total": self.total, "streak_start": self.streak_start,
                "reason": self.reason}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consecutive = int(state.get("consecutive", 0))
        self.total = int(state.get("total", 0))
        start = state.get("streak_start")
        self.streak_start = int(start) if start is not None else None
        self.reason = str(state.get("reason", ""))
