"""PNG curves of a GRPO run from its metrics.jsonl: the R1-Zero signature (reward and accuracy rising, and how
response length moves with them), plus the optimisation health signals (KL, entropy, clip fraction, zero-variance
groups). matplotlib with the Agg backend: no display needed.
"""

from __future__ import annotations

import os
from pathlib import Path

from r1forge.train.metrics import read_metrics
from r1forge.train.plots import _series

# (file name, title, y label, [(metric key, legend label)])
_PANELS: list[tuple[str, str, str, list[tuple[str, str]]]] = [
    ("reward.png", "reward per step (rollouts)", "reward",
     [("reward_mean", "total reward"), ("reward/accuracy", "accuracy reward"), ("reward/format", "format reward")]),
    ("accuracy.png", "accuracy", "fraction correct",
     [("reward/accuracy", "rollout accuracy (sampled)"), ("eval/accuracy", "held-out accuracy (greedy)")]),
    ("response_length.png", "mean response length", "tokens",
     [("completion_length", "rollouts"), ("eval/response_length", "held-out (greedy)")]),
    ("health.png", "optimisation health", "value",
     [("kl", "KL to reference"), ("entropy", "entropy (nats/token)"), ("clip_ratio/region", "clip fraction"),
      ("zero_std_fraction", "zero-variance groups")]),
]


SMOOTH = 10


def _running_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _plot_reasoning(records: list[dict], path: Path) -> bool:
    """Held-out accuracy and response length over GRPO steps, side by side on one figure, overall and, where
    the evaluations carry them, per number of steps: DeepSeek-R1's figures 2-3 in one picture. False when the
    run has fewer than two held-out evaluations."""
    import matplotlib.pyplot as plt

    steps, acc = _series(records, "eval/accuracy")
    if len(steps) < 2:
        return False
    levels = sorted({int(k.split("/")[1][len("steps_"):]) for r in records for k in r
                     if k.startswith("eval/steps_") and k.endswith("/accuracy")})
    fig, (ax_acc, ax_len) = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric, ylabel in ((ax_acc, "accuracy", "held-out accuracy (greedy)"),
                               (ax_len, "response_length", "held-out response length (tokens)")):
        xs, ys = _series(records, f"eval/{metric}")
        ax.plot(xs, ys, "o-", color="black", linewidth=2, label="all problems")
        for level in levels:
            xs, ys = _series(records, f"eval/steps_{level}/{metric}")
            if xs:
                ax.plot(xs, ys, ".-", alpha=0.8, label=f"{level}-step problems")
        ax.set_xlabel("GRPO step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_acc.set_title("held-out accuracy rises ...")
    ax_len.set_title("... as the reasoning gets longer where it pays")
    ax_len.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_grpo_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write reward.png, accuracy.png, response_length.png, health.png and (with held-out evaluations during
    the run) reasoning.png; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not any("reward_mean" in r for r in records):
        raise ValueError(f"{run_dir}: metrics.jsonl has no GRPO records (reward_mean) to plot")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, title, ylabel, series in _PANELS:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        drawn = 0
        for key, label in series:
            steps, values = _series(records, key)
            if steps:
                if key.startswith("eval/"):
                    ax.plot(steps, values, "o-", label=label)
                else:  # rollout batches are small and noisy: the raw series faint, a running mean on top
                    line, = ax.plot(steps, values, "-", alpha=0.3)
                    ax.plot(steps, _running_mean(values, SMOOTH), "-", color=line.get_color(),
                            label=f"{label}, mean of {SMOOTH} steps" if len(values) > SMOOTH else label)
                drawn += 1
        if drawn:
            ax.set_xlabel("GRPO step")
            ax.set_ylabel(ylabel)
            ax.set_title(title)
            ax.legend()
            ax.grid(alpha=0.3)
            fig.tight_layout()
            written.append(out / name)
            fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    if _plot_reasoning(records, out / "reasoning.png"):
        written.append(out / "reasoning.png")
    return written
