"""`Trainer`: the pretraining / SFT loop, built from the small pieces beside it.

One optimizer step:
  1. take `grad_accum` micro-batches from the loader (their target counts normalise the loss: exact token mean);
  2. forward + backward each under autocast (bf16 on CUDA), summing each MoE layer's tokens per expert;
  3. the guard: a non-finite loss or gradient norm skips the step (no update, no bias update), logged;
     `max_bad_steps` in a row stop the run, leaving the last checkpoint as it was;
  4. clip, AdamW step, then the auxiliary-loss-free bias update from the step's loads (balance.py);
  5. advance the schedule; log, evaluate and checkpoint on their periods.

Everything a resumed run needs is in the checkpoint (model, optimizer, scheduler, RNGs, loader position, guard
and logging-interval counters), so training N steps, being killed, and resuming gives the same numbers bit for
bit as training straight through (on CPU; CUDA kernels may not be deterministic).
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from r1forge.parallel import ParallelMesh
from r1forge.parallel.expert_parallel import drop_unrouted_grads
from r1forge.parallel.grad import clip_grad_norm_
from r1forge.train.balance import (
    ExpertLoadTracker, load_fractions, load_ratios, set_aux_loss_alpha, update_router_biases,
)
from r1forge.train.checkpointing import (
    CHECKPOINTS_DIR, clean_staging, latest_checkpoint, load_training_checkpoint, save_training_checkpoint,
)
from r1forge.train.config import LogConfig, TrainConfig
from r1forge.train.guard import NonFiniteGuard
from r1forge.train.loss import Batch, CausalLMLoss, TrainingLoss, evaluate_loss
from r1forge.train.metrics import MetricsLogger, Progress, Silent
from r1forge.train.schedule import build_optimizer, build_scheduler


class ResumableLoader(Protocol):
    def __next__(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class StepOutput:
    """One optimizer step: its loss parts (step-normalised floats), gradient norm, lr, tokens, whether applied."""

    metrics: dict[str, float]
    grad_norm: float
    lr: float
    tokens: int
    applied: bool


@dataclass
class TrainResult:
    status: str  # "completed" or "diverged" (stopped by the guard, or ended in a non-finite streak)
    step: int
    checkpoint: Path | None
    eval_loss: float | None
    reason: str = ""  # why it diverged: which steps were non-finite, and what was


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute every decoder layer (and MTP module) in backward instead of storing its activations.

    Returns the number of layers wrapped. Only forwards that build a graph are checkpointed.
    """
    from r1forge.model.dense import DenseDecoderLayer
    from r1forge.model.transformer import DecoderLayer

    count = 0
    for module in model.modules():
        if isinstance(module, (DecoderLayer, DenseDecoderLayer)) and not getattr(module, "_activation_checkpointing", False):
            inner = module.forward

            def forward(*args: Any, _inner: Any = inner, **kwargs: Any) -> torch.Tensor:
                if torch.is_grad_enabled():
                    return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
                return _inner(*args, **kwargs)

            module.forward = forward
            module._activation_checkpointing = True
            count += 1
    return count


def _moe_names(model: nn.Module) -> list[str]:
    """Short names of the MoE layers for metric keys ("layer3", "mtp0"), in `moe_layers` order."""
    from r1forge.model.moe import DeepseekMoE

    names = []
    for name, module in model.named_modules():
        if isinstance(module, DeepseekMoE):
            parts = name.split(".")
            if "mtp" in parts:
                names.append(f"mtp{parts[parts.index('mtp') + 1]}")
            elif "layers" in parts:
                names.append(f"layer{parts[parts.index('layers') + 1]}")
            else:
                names.append(name)
    return names


class Trainer:
    """Trains `model` in place on batches from `train_loader` (`input_ids`, `labels`, optional `position_ids`).

    Args:
        model: a DeepseekForCausalLM (or anything with `.model`, `.lm_head`, optionally MTP and MoE layers),
            already on its device.
        train_loader: endless batches with `state_dict` / `load_state_dict` (r1forge.data.StatefulLoader).
        config: optimisation settings.
        log_config: logging, evaluation and checkpoint periods.
        run_dir: metrics.jsonl, tb/ and checkpoints/ go here.
        eval_batches: fixed held-out batches for the periodic eval loss (None: no evaluation).
        tokenizer: saved into every checkpoint.
        loss: the objective (default: next-token CE + lambda * MTP + aux).
        optimizer, scheduler: defaults are AdamW (decay on matrices) and warmup + cosine from `config`.
        run_info: JSON-able facts logged at start and stored in checkpoints (e.g. the unigram entropy).
        parallel: the run's mesh when `model` is parallelized (r1forge.parallel): each rank then trains on its
            share of every batch, loss normalisers, metrics and expert loads are summed over ranks, rank 0
            logs, and checkpoints are sharded (DCP). None: one process.
    """

    def __init__(self, model: nn.Module, train_loader: ResumableLoader, config: TrainConfig, log_config: LogConfig,
                 run_dir: str | Path, *, eval_batches: list[Batch] | None = None, tokenizer: Any = None,
                 loss: TrainingLoss | None = None, optimizer: torch.optim.Optimizer | None = None,
                 scheduler: Any = None, run_info: dict[str, Any] | None = None,
                 parallel: ParallelMesh | None = None) -> None:
        self.model = model
        self.loader = train_loader
        self.config = config
        self.log_config = log_config
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / CHECKPOINTS_DIR
        self.eval_batches = eval_batches
        self.tokenizer = tokenizer
        self.loss = loss or CausalLMLoss(config.mtp_lambda)
        self.optimizer = optimizer or build_optimizer(model, config.lr, config.weight_decay,
                                                      (config.beta1, config.beta2), config.eps)
        self.scheduler = scheduler or build_scheduler(self.optimizer, config.warmup_steps, config.steps,
                                                      config.min_lr_ratio)
        self.run_info = dict(run_info or {})
        self.parallel = parallel or ParallelMesh.single(next(model.parameters()).device)
        self.device = next(model.parameters()).device
        set_aux_loss_alpha(model, config.aux_loss_alpha)
        if config.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.tracker = ExpertLoadTracker(model)
        self.moe_names = _moe_names(model)
        self.guard = NonFiniteGuard(config.max_bad_steps)
        self.step = 0
        self.tokens_seen = 0
        self.resumed_from: int | None = None
        self._interval: dict[str, float] = {}

    # ------------------------------------------------------------------ pieces
    def autocast(self) -> AbstractContextManager:
        if self.device.type == "cuda" and self.config.bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return nullcontext()

    def next_batches(self) -> list[Batch]:
        """The step's micro-batches, still on the CPU (counting them there costs no device sync)."""
        return [next(self.loader) for _ in range(self.config.grad_accum)]

    def train_step(self) -> StepOutput:
        """One optimizer step (see the module docstring)."""
        self.model.train()
        cpu_batches = self.next_batches()
        world = self.parallel.world_size
        norms = self.parallel.sum_floats(self.loss.normalizers(self.model, cpu_batches))  # global target counts
        tokens = sum(int(b["attention_mask"].sum()) if b.get("attention_mask") is not None else b["input_ids"].numel()
                     for b in cpu_batches)
        batches = [{k: v.to(self.device, non_blocking=True) for k, v in b.items()} for b in cpu_batches]
        sums: dict[str, torch.Tensor] = {}
        for batch in batches:
            with self.autocast():
                out = self.loss(self.model, batch, norms, len(batches) * world)  # the global micro-batch count
            out.loss.backward()
            if self.tracker.layers:
                self.tracker.collect()
            for key, value in out.metrics.items():
                sums[key] = sums[key] + value if key in sums else value
        metrics = dict(zip(sums, torch.stack([v.detach().float() for v in sums.values()]).tolist())) if sums else {}
        if self.parallel.distributed:
            metrics = self.parallel.sum_floats(metrics)  # each rank holds its share of the global mean
            tokens = int(self.parallel.sum_floats({"tokens": tokens})["tokens"])
            if self.tracker.layers:
                loads = self.parallel.all_reduce_(self.tracker.step_loads())  # global: identical biases everywhere
                drop_unrouted_grads(self.tracker.layers, loads)  # as on one device: no token, no gradient
        lr = self.optimizer.param_groups[0]["lr"]
        grad_norm = math.nan
        if self.guard.is_finite(*metrics.values()):
            max_norm = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
            grad_norm = clip_grad_norm_(self.model.parameters(), max_norm, self.parallel).item()
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)} or {"grad_norm": grad_norm}
        applied = self.guard.check(*metrics.values(), grad_norm, step=self.step + 1,
                                   reason=", ".join(f"{k}={v}" for k, v in bad.items()))
        if applied:
            self.optimizer.step()
            if self.config.bias_update_gamma > 0 and self.tracker.layers:
                update_router_biases(self.model, self.config.bias_update_gamma, self.tracker.step_loads())
        self.tracker.end_step(applied)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += tokens
        return StepOutput(metrics, grad_norm, lr, tokens, applied)

    def evaluate(self) -> float | None:
        """Held-out next-token loss (nats/token) over the fixed eval batches."""
        if not self.eval_batches:
            return None
        return evaluate_loss(self.model, self.eval_batches[: self.log_config.eval_batches or None], self.autocast)

    # ------------------------------------------------------------------ checkpoints
    def state_extra(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict(), "guard": self.guard.state_dict(), "tokens_seen": self.tokens_seen,
                "interval": dict(self._interval), "interval_loads": self.tracker.state_dict()}

    def save(self) -> Path:
        """Checkpoint the current step (atomically; older ones pruned to `keep_last`)."""
        info = {"tokens_seen": self.tokens_seen, **self.run_info}
        if self.parallel.distributed:
            from r1forge.parallel.checkpoint import save_sharded_checkpoint  # (it imports this package)

            return save_sharded_checkpoint(self.checkpoint_dir, self.step, self.model, self.parallel,
                                           optimizer=self.optimizer, scheduler=self.scheduler, tokenizer=self.tokenizer,
                                           extra=self.state_extra(), info=info, keep_last=self.log_config.keep_last)
        return save_training_checkpoint(self.checkpoint_dir, self.step, self.model, tokenizer=self.tokenizer,
                                        optimizer=self.optimizer, scheduler=self.scheduler, extra=self.state_extra(),
                                        info=info, keep_last=self.log_config.keep_last)

    def resume(self, path: str | Path | None = None) -> int | None:
        """Continue from `path` or the newest complete checkpoint of this run; returns its step (None: none)."""
        if self.parallel.is_main:
            clean_staging(self.checkpoint_dir)
        self.parallel.barrier()
        path = Path(path) if path is not None else latest_checkpoint(self.checkpoint_dir)
        if path is None:
            return None
        from r1forge.parallel.checkpoint import is_sharded, load_sharded_checkpoint

        if is_sharded(path):
            state = load_sharded_checkpoint(path, self.model, self.parallel, optimizer=self.optimizer,
                                            scheduler=self.scheduler)
            for note in state["notes"]:
                self._say(f"resume: {note}")
        else:
            state = load_training_checkpoint(path, self.model, self.optimizer, self.scheduler)
        extra = state["extra"]
        self.loader.load_state_dict(extra["loader"])
        self.guard.load_state_dict(extra.get("guard", {}))
        self.tokens_seen = int(extra.get("tokens_seen", 0))
        self._interval = dict(extra.get("interval") or {})
        self.tracker.load_state_dict(extra.get("interval_loads") or {})
        self.step = self.resumed_from = state["step"]
        return self.step

    def _say(self, message: str) -> None:
        if self.parallel.is_main:
            print(message)

    # ------------------------------------------------------------------ the loop
    def _accumulate(self, out: StepOutput) -> None:
        acc = self._interval
        for key, value in out.metrics.items():
            acc[key] = acc.get(key, 0.0) + value
        acc["grad_norm"] = acc.get("grad_norm", 0.0) + out.grad_norm
        acc["steps"] = acc.get("steps", 0.0) + 1
        acc["tokens"] = acc.get("tokens", 0.0) + out.tokens

    def _record(self, out: StepOutput, elapsed: float) -> dict[str, Any]:
        acc, self._interval = self._interval, {}
        n = acc.pop("steps", 0.0)
        tokens = acc.pop("tokens", 0.0)
        record: dict[str, Any] = {key: value / n for key, value in acc.items()} if n else {}
        record.update(lr=out.lr, tokens=self.tokens_seen, tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0,
                      skipped_steps=self.guard.total)
        loads = self.tracker.pop_interval()
        if loads is not None:
            ratios = load_ratios(loads)
            record["load_max_mean"] = sum(ratios) / len(ratios)
            record.update({f"load_max_mean/{name}": r for name, r in zip(self.moe_names, ratios, strict=True)})
            record["expert_load"] = load_fractions(loads)
            record["expert_load_layers"] = self.moe_names
        return record

    def fit(self) -> TrainResult:
        """Train to `config.steps`, logging, evaluating and checkpointing on the way."""
        cfg, lcfg = self.config, self.log_config
        main = self.parallel.is_main  # only rank 0 writes metrics and shows progress
        logger = MetricsLogger(self.run_dir, lcfg.tensorboard, resume_step=self.resumed_from) if main else Silent()
        progress = Progress(cfg.steps, self.step, lcfg.progress) if main else Silent()
        logger.log(self.step, {"event": "start", "resumed_from": self.resumed_from, **self.run_info})
        status, eval_loss, last_log, reason = "completed", None, time.perf_counter(), ""
        try:
            while self.step < cfg.steps:
                out = self.train_step()
                if not out.applied:
                    logger.log(self.step, {"event": "skipped_step", **out.metrics, "grad_norm": out.grad_norm,
                                           "consecutive": self.guard.consecutive})
                    progress.write(f"step {self.step}: non-finite loss/gradient {out.metrics} "
                                   f"(grad_norm {out.grad_norm}); step skipped ({self.guard.consecutive} in a row)")
                    if self.guard.should_stop:
                        status, reason = "diverged", self._diverged(logger, "train.max_bad_steps reached")
                        progress.write(f"stopping: {reason}")
                        break
                else:
                    self._accumulate(out)
                done = self.step == cfg.steps
                if self.step % lcfg.log_every == 0 or done:
                    now = time.perf_counter()
                    record = self._record(out, now - last_log)
                    last_log = now
                    logger.log(self.step, record)
                    progress.update(1, loss=record.get("loss", math.nan), tok_s=f"{record['tokens_per_s']:.0f}")
                else:
                    progress.update(1)
                if self.eval_batches and ((lcfg.eval_every and self.step % lcfg.eval_every == 0) or done):
                    eval_loss = self.evaluate()
                    logger.log(self.step, {"eval_loss": eval_loss})
                    progress.write(f"step {self.step}: eval loss {eval_loss:.4f}")
                # No checkpoint in the middle of a bad streak: the newest one stays a healthy step's.
                if ((lcfg.save_every and self.step % lcfg.save_every == 0) or done) and not self.guard.consecutive:
                    path = self.save()
                    logger.log(self.step, {"event": "checkpoint", "path": str(path)})
            if status == "completed" and self.guard.consecutive:  # the schedule ran out inside a bad streak
                status, reason = "diverged", self._diverged(
                    logger, "the schedule ended inside the streak, so the run did not finish healthy")
        finally:
            progress.close()
            logger.close()
        return TrainResult(status, self.step, latest_checkpoint(self.checkpoint_dir), eval_loss, reason)

    def _diverged(self, logger: MetricsLogger, why: str) -> str:
        """Log the divergence event; the message naming the bad steps and what was non-finite."""
        newest = latest_checkpoint(self.checkpoint_dir)
        reason = (f"{self.guard.describe(self.step)}; {why}. Nothing was saved from the streak: the newest "
                  f"checkpoint is {newest.name if newest else 'none'}")
        logger.log(self.step, {"event": "diverged", "consecutive": self.guard.consecutive,
                               "first_bad_step": self.guard.streak_start, "reason": reason})
        return reason

