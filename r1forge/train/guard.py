"""The loss / NaN guard: a step with a non-finite loss or gradient norm is skipped, too many in a row stop the run.

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
    """Counts consecutive bad steps.

    Args:
        max_bad_steps: this many non-finite steps in a row mean the run should stop.
    """

    max_bad_steps: int = 5
    consecutive: int = 0
    total: int = 0

    @staticmethod
    def is_finite(*values: float) -> bool:
        return all(math.isfinite(v) for v in values)

    def check(self, *values: float) -> bool:
        """Record one step; True when it may be applied (every value finite)."""
        if self.is_finite(*values):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.consecutive >= self.max_bad_steps

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consecutive = int(state.get("consecutive", 0))
        self.total = int(state.get("total", 0))
