"""`run_grpo`: a GRPO run config -> policy, prompts, rewards and a `GRPOTrainer`; what `r1forge grpo` calls.

    from r1forge.rl.run import GRPORunConfig, run_grpo
    from r1forge.train import load_run_config
    result = run_grpo(load_run_config(GRPORunConfig, "configs/grpo_tiny.yaml", ["--grpo.steps", "20"]))

The run directory holds the resolved `config.yaml`, `metrics.jsonl` (one record per step, evaluations as
`event: "eval"`), `tb/`, `completions.jsonl` (sample completions every `grpo.log_completions_every` steps),
`plots/` and `checkpoints/step-N/` (weights + tokenizer + optimizer + prompt order: `--resume` continues
exactly). Prompts are train-split problems (or `data.files`); evaluation uses test-split problems, which no
training stage ever sees (see r1forge.data.synthetic for the split rule).

Under torchrun every rank holds the policy and rolls out its share of each step's prompts (r1forge.parallel.rl);
the gradient, the metrics and the evaluations are the global batch's, rank 0 writes the run directory, and the
checkpoints are the 1-process ones (the replicas are identical), so a run resumes under any world size:

    torchrun --nproc-per-node 2 -m r1forge grpo configs/grpo_tiny.yaml
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r1forge.data import load_tokenizer
from r1forge.data.jsonl import append_jsonl
from r1forge.parallel.mesh import ParallelMesh
from r1forge.parallel.rl import RolloutParallel, sum_dicts
from r1forge.rl.examples import train_and_held_out
from r1forge.rl.config import GRPORunConfig
from r1forge.rl.evaluate import EvalResult, eval_record
from r1forge.rl.trainer import GRPOTrainer
from r1forge.rl.rewards import REWARD_STATS, combine_rewards
from r1forge.train.checkpointing import CHECKPOINTS_DIR, resolve_model_dir, save_training_checkpoint
from r1forge.train.metrics import MetricsLogger, Progress, Silent
from r1forge.train.prologue import start_parallel_run
from r1forge.train.run import build_run_model


@dataclass
class GRPOResult:
    status: str  # "completed", or "diverged": the last steps were non-finite (no update made, none saved)
    step: int
    before: EvalResult | None
    after: EvalResult | None
    checkpoint: Path | None
    run_dir: Path
    plots: list[Path]
    reason: str = ""  # when diverged: which steps, and what was non-finite
    train_seconds: float = 0.0  # the training loop's time in this process (no evaluation before or after)


def run_grpo(cfg: GRPORunConfig, resume: bool = False, before: EvalResult | None = None) -> GRPOResult:
    """Train the `model.init_from` policy with GRPO as `cfg` says; evaluate before and after on held-out problems.

    `before`: the initial policy's held-out evaluation when the caller already made it (logged, not recomputed).
    """
    if cfg.model.init_from is None:
        raise ValueError("model.init_from: GRPO starts from a trained policy (a checkpoint or run directory)")
    mesh, start = start_parallel_run(cfg, cfg.parallel, resume, cfg.device, "device",
                                     check=lambda mesh: _check_parallel(cfg, mesh))
    run_dir, checkpoint, device = start.run_dir, start.checkpoint, start.device
    main = mesh.is_main  # rank 0 prints, logs and saves for the run
    say = print if main else (lambda *args, **kwargs: None)
    init_dir = resolve_model_dir(cfg.model.init_from)
    tokenizer = load_tokenizer(checkpoint if checkpoint is not None else init_dir)
    model = build_run_model(cfg.model, tokenizer, device)
    train_examples, held_out = train_and_held_out(cfg.data, cfg.seed)
    held_out = held_out[: cfg.log.eval_problems] if cfg.log.eval_problems else []
    reward_fn = combine_rewards(cfg.rewards)
    trainer = GRPOTrainer(model, tokenizer, cfg.grpo, reward_fn, train_examples, parallel=mesh)
    if checkpoint is not None:
        trainer.resume(checkpoint)
        say(f"resumed from {checkpoint} (step {trainer.step_count})")
    n_params = sum(p.numel() for p in model.parameters())
    say(f"grpo: {n_params / 1e6:.2f}M-parameter policy from {init_dir}, {len(train_examples)} prompts, "
        f"{len(held_out)} held-out problems, G={cfg.grpo.num_generations}, loss {cfg.grpo.loss_type}, "
        f"beta {cfg.grpo.beta}, rewards {cfg.rewards}, device {device}"
        + (f", {mesh.world_size} data-parallel ranks" if mesh.distributed else ""))

    logger = MetricsLogger(run_dir, tensorboard=cfg.log.tensorboard,
                           resume_step=trainer.step_count if checkpoint is not None else None) if main else Silent()
    completions_path = run_dir / "completions.jsonl"
    if checkpoint is None and main:
        completions_path.write_text("", encoding="utf-8")

    if main:  # (rank 0's completions: the first group of the step's global prompt list)
        trainer.log_completions = lambda step, rows: append_jsonl(completions_path,
                                                                  ({"step": step, **r} for r in rows))
    REWARD_STATS.reset()
    if before is None and cfg.log.eval_before and held_out and checkpoint is None:
        before = trainer.evaluate(held_out, progress=cfg.log.progress)
    if before is not None and checkpoint is None:
        logger.log(0, {"event": "eval", **eval_record(before, examples=held_out)})
        say(f"before GRPO: accuracy {before.accuracy:.3f} +- {before.stderr:.3f}, format {before.format_rate:.3f}, "
            f"length {before.mean_length:.1f} tokens on {before.num_problems} held-out problems")
    progress = Progress(cfg.grpo.steps, initial=trainer.step_count, enabled=cfg.log.progress, desc="grpo") \
        if main else Silent()
    saved: Path | None = None
    t0 = time.perf_counter()
    try:
        while trainer.step_count < cfg.grpo.steps:
            metrics = trainer.step()
            step = trainer.step_count
            # running counts (calls, unparsable answers, errors), summed over ranks
            metrics.update(sum_dicts(mesh, REWARD_STATS.as_metrics()))
            logger.log(step, metrics)
            progress.update(1, reward=metrics.get("reward_mean", float("nan")),
                            acc=metrics.get("reward/accuracy", float("nan")),
                            len=metrics.get("completion_length", float("nan")))
            if cfg.log.eval_every and step % cfg.log.eval_every == 0 and step < cfg.grpo.steps and held_out:
                result = trainer.evaluate(held_out)
                logger.log(step, {"event": "eval", **eval_record(result, examples=held_out)})
                progress.write(f"step {step}: held-out accuracy {result.accuracy:.3f} +- {result.stderr:.3f}")
            # no checkpoint in the middle of a non-finite streak: the newest one stays a healthy step's
            if cfg.log.save_every and step % cfg.log.save_every == 0 and step < cfg.grpo.steps \
                    and not trainer.guard.consecutive:
                saved = _save(trainer, run_dir, cfg, tokenizer, mesh)
            if cfg.grpo.time_limit_s and step < cfg.grpo.steps and \
                    _time_is_up(mesh, time.perf_counter() - t0 >= cfg.grpo.time_limit_s):
                progress.write(f"grpo.time_limit_s {cfg.grpo.time_limit_s:g} reached after {step} steps")
                break
    finally:
        progress.close()
    train_seconds = time.perf_counter() - t0
    after = None
    if held_out:
        after = trainer.evaluate(held_out, progress=cfg.log.progress)
        logger.log(trainer.step_count, {"event": "eval", **eval_record(after, examples=held_out)})
        say(f"after GRPO ({trainer.step_count} steps, {time.perf_counter() - t0:.0f}s): accuracy "
            f"{after.accuracy:.3f} +- {after.stderr:.3f}, format {after.format_rate:.3f}, "
            f"length {after.mean_length:.1f} tokens")
    status, reason = "completed", ""
    if trainer.guard.consecutive:  # the run ends inside a non-finite streak: not finished, nothing saved from it
        status, reason = "diverged", f"{trainer.guard.describe(trainer.step_count)}; no checkpoint saved from it"
        logger.log(trainer.step_count, {"event": "diverged", "reason": reason,
                                        "first_bad_step": trainer.guard.streak_start})
        say(f"grpo diverged at step {trainer.step_count} ({reason})")
    else:
        saved = _save(trainer, run_dir, cfg, tokenizer, mesh)
    logger.close()
    plots: list[Path] = []
    if cfg.log.plots and main:
        from r1forge.rl.plots import plot_grpo_run

        plots = plot_grpo_run(run_dir)
    for path in plots:
        say(f"plot: {path}")
    say(f"checkpoint: {saved}")
    return GRPOResult(status, trainer.step_count, before, after, saved, run_dir, plots, reason, train_seconds)


def _time_is_up(mesh: ParallelMesh, here: bool) -> bool:
    """Rank 0's verdict on grpo.time_limit_s on every rank: ranks that stopped at different steps would leave
    the others waiting in the next gradient all-reduce."""
    return bool(mesh.broadcast(here))


def _check_parallel(cfg: GRPORunConfig, mesh: ParallelMesh) -> None:
    """Before anything is written: replicated data parallelism (parallel.ep 1), whole groups on every rank."""
    RolloutParallel(mesh).check_prompts(cfg.grpo.prompts_per_step)


def _save(trainer: GRPOTrainer, run_dir: Path, cfg: GRPORunConfig, tokenizer: Any, mesh: ParallelMesh) -> Path:
    """The 1-process checkpoint, written by rank 0 (every rank holds the same weights, optimizer state, prompt
    order and RNG); the others wait until it is in place, and every rank returns its path."""
    path = None
    if mesh.is_main:
        path = save_training_checkpoint(run_dir / CHECKPOINTS_DIR, trainer.step_count, trainer.model,
                                        tokenizer=tokenizer, optimizer=trainer.optimizer, scheduler=trainer.scheduler,
                                        extra=trainer.extra_state(), info={"kind": "grpo"},
                                        keep_last=cfg.log.keep_last)
    return Path(mesh.broadcast(str(path) if path is not None else None))

