"""PNG plots of a run from its metrics.jsonl (matplotlib, Agg backend: no display needed).

- loss.png: training loss (and MTP loss) per logged step, held-out loss, the unigram baseline;
- expert_load.png: one heatmap per MoE layer, expert x step, colour = the expert's load / its fair share;
- load_balance.png: max/mean expert load per MoE layer over training (1.0 is perfect balance).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from r1forge.train.metrics import read_metrics


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write the run's PNGs into `out_dir` (default RUN_DIR/plots); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []

    train = [r for r in records if "loss" in r and r.get("event") is None]
    if not train:
        raise ValueError(f"{run_dir}: metrics.jsonl has no training loss records to plot")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(*_series(train, "loss"), label="train loss")
    if any("mtp_loss" in r for r in train):
        ax.plot(*_series(train, "mtp_loss"), label="MTP loss", alpha=0.6)
    steps, evals = _series(records, "eval_loss")
    if steps:
        ax.plot(steps, evals, "o-", label="held-out loss")
    baseline = next((r["unigram_entropy"] for r in records if isinstance(r.get("unigram_entropy"), float)), None)
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle="--", label=f"unigram entropy {baseline:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.set_title("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(out / "loss.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    loads = [r for r in train if r.get("expert_load")]
    if loads:
        written += _plot_loads(plt, loads, out)
    return written


def _plot_loads(plt: Any, records: list[dict[str, Any]], out: Path) -> list[Path]:
    import numpy as np

    names = records[-1].get("expert_load_layers") or [f"moe{i}" for i in range(len(records[-1]["expert_load"]))]
    steps = [r["step"] for r in records]
    left, right = (steps[0], steps[-1]) if steps[-1] > steps[0] else (steps[0] - 0.5, steps[0] + 0.5)
    n = len(names)
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.2 * n + 0.8), squeeze=False, sharex=True)
    for i, (name, ax) in enumerate(zip(names, axes[:, 0], strict=True)):
        grid = np.array([r["expert_load"][i] for r in records]).T  # [E, time]
        vmax = max(2.0, float(grid.max()))
        image = ax.imshow(grid, aspect="auto", origin="lower", cmap="coolwarm", vmin=0.0, vmax=vmax,
                          extent=(left, right, -0.5, grid.shape[0] - 0.5), interpolation="nearest")
        ax.set_ylabel(f"{name}\nexpert")
        fig.colorbar(image, ax=ax, label="load / mean")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle("expert load (layer x expert over time; 1.0 = fair share)")
    fig.tight_layout()
    heatmap = out / "expert_load.png"
    fig.savefig(heatmap, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in names:
        ax.plot(*_series(records, f"load_max_mean/{name}"), label=name)
    ax.axhline(1.0, color="grey", linestyle="--")
    ax.set_xlabel("step")
    ax.set_ylabel("max / mean tokens per expert")
    ax.set_title("MoE load balance")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    balance = out / "load_balance.png"
    fig.savefig(balance, dpi=100)
    plt.close(fig)
    return [heatmap, balance]
