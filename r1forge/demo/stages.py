"""The demo's stage cache: each stage writes one directory or file under OUT_DIR and is skipped when it is there.

Why a cache: the demo takes minutes, and a second `make demo` should only print the report; an interrupted
training stage resumes from its newest checkpoint. A stage that reruns makes every stage after it stale (they
were computed from its old output), so those are removed and rebuilt.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from r1forge.data.jsonl import write_json

DONE_FILE = "DONE.json"


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 100 - len(text)), flush=True)


class StageCache:
    """The outputs of one recipe under `out` and what each is computed from: `depends_on[name]` lists the outputs
    (relative paths under `out`, possibly in another recipe's directory) that `name` reads."""

    def __init__(self, out: Path, depends_on: dict[str, list[str]]) -> None:
        self.out = out
        self.depends_on = depends_on
        self.timings: dict[str, float] = {}

    def downstream(self, name: str) -> list[str]:
        """Every output computed, directly or not, from `name`."""
        stale: list[str] = []
        frontier = [name]
        while frontier:
            current = frontier.pop()
            for output, deps in self.depends_on.items():
                if current in deps and output not in stale:
                    stale.append(output)
                    frontier.append(output)
        return stale

    def done(self, name: str) -> dict[str, Any] | None:
        marker = self.out / name / DONE_FILE
        return json.loads(marker.read_text()) if marker.is_file() else None

    def invalidate_after(self, name: str) -> None:
        """Remove every output computed from `name`: it was just rebuilt, so they are stale."""
        for rel in self.downstream(name):
            path = self.out / rel
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def train(self, name: str, run: Callable[[bool], Any], info: Callable[[Any], dict[str, Any]] | None = None
              ) -> dict[str, Any]:
        """Run a training stage into OUT/name (`run(resume)`) unless its DONE.json exists; returns DONE.json."""
        done = self.done(name)
        if done is not None:
            print(f"cached: {self.out / name} (delete it to redo this stage)")
            return done
        t0 = time.perf_counter()
        result = run((self.out / name / "checkpoints").is_dir())
        seconds = time.perf_counter() - t0
        self.timings[name] = seconds
        done = {"seconds": seconds, **(info(result) if info else {"eval_loss": getattr(result, "eval_loss", None)})}
        write_json(self.out / name / DONE_FILE, done)
        self.invalidate_after(name)
        return done

    def record(self, name: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """A JSON result OUT/name (an evaluation), computed unless it exists."""
        path = self.out / name
        if path.is_file():
            print(f"cached: {path}")
            return json.loads(path.read_text())
        t0 = time.perf_counter()
        value = compute()
        self.timings[name.removesuffix(".json")] = time.perf_counter() - t0
        write_json(path, value)  # atomic: these files are cache markers
        self.invalidate_after(name)
        return value
