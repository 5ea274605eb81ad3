"""Where training numbers go: a JSONL file (the record of truth), TensorBoard, and a tqdm progress bar.

`RUN_DIR/metrics.jsonl` holds one JSON object per line, each with a `step`. Resuming from the checkpoint of
step k first drops the lines with step > k (a killed run may have logged steps past its last checkpoint), so
the file of a resumed run reads exactly like the file of a run that was never interrupted. TensorBoard is
told the same (`purge_step`). Non-finite numbers are written as null, keeping the file strict JSON.
"""

from __future__ import annotations

import json
import math
import os
import sys
from numbers import Number
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of RUN_DIR/metrics.jsonl (a torn last line, from a kill mid-write, is ignored)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"no {METRICS_FILE} in {run_dir}")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(path: Path, last_step: int) -> int:
    """Keep only records with step <= last_step (atomically rewritten); returns how many were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and record.get("step", 0) > last_step:
            dropped += 1
        else:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
    return dropped


class MetricsLogger:
    """Appends records to RUN_DIR/metrics.jsonl and scalars to TensorBoard under RUN_DIR/tb.

    Args:
        run_dir: the run directory (created).
        tensorboard: also write TensorBoard events.
        resume_step: None starts a fresh file; k continues a run from its step-k checkpoint.
    """

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True, resume_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        else:
            truncate_metrics(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=purge)

    def log(self, step: int, record: dict[str, Any]) -> None:
        """Write `{"step": step, **record}`; numeric entries also become TensorBoard scalars (tag = key)."""
        line = json.dumps(_clean({"step": step, **record}), ensure_ascii=False)
        self._file.write(line + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, Number) and not isinstance(value, bool) and math.isfinite(float(value)):
                    self._tb.add_scalar(key, float(value), step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Progress:
    """A tqdm bar over optimizer steps showing loss and tokens/s (tqdm adds rate and ETA); prints go above it.

    Args:
        total: the run's last step.
        initial: the step it starts from (non-zero on resume).
        enabled: False prints messages only (non-interactive jobs, tests).
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train") -> None:
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                             file=sys.stderr)

    def update(self, steps: int = 1, **postfix: float) -> None:
        """Advance by `steps`; new postfix values (loss=..., tok_s=...) replace the shown ones."""
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                      refresh=False)
            self._bar.update(steps)

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class Silent:
    """The metrics logger and progress bar of data-parallel ranks other than 0 (rank 0 logs for the run)."""

    def log(self, step: int, record: dict[str, Any]) -> None:
        pass

    def update(self, steps: int = 1, **postfix: Any) -> None:
        pass

    def write(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass
