"""The start every run shares (pretrain, SFT, GRPO, distillation): the run directory, the resolved config
written into it, the seeds, the device.

    start = start_run(cfg, resume, device=cfg.train.device, device_key="train.device")
    start.run_dir, start.checkpoint, start.device
    mesh, start = start_parallel_run(cfg, cfg.parallel, resume, cfg.train.device, "train.device")  # torchrun

A run directory with checkpoints is only continued with `resume` (True / "latest": its newest complete
checkpoint; "latest-intact": the newest whose checksums verify),
never silently overwritten; the resolved config goes to `config.yaml` (a fresh run) or `config.resumed.yaml`.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from r1forge.parallel.config import ParallelConfig
from r1forge.parallel.mesh import ParallelMesh, init_parallel
from r1forge.train.checkpointing import (
    CHECKPOINTS_DIR, clean_staging, latest_checkpoint, newest_intact_checkpoint, resume_mode,
)
from r1forge.train.config import save_run_config


def resolve_device(name: str, key: str = "device") -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else as torch reads it. `key` names the setting the
    value came from (`train.device`, `device`, `--device`) in errors."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"{key}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key} is {name!r} but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    """torch (CPU and CUDA), python and numpy RNGs."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional
        pass


def prepare_run_dir(run_dir: str | Path, resume: bool | str) -> Path | None:
    """Create the run directory; the checkpoint to resume from (None: start fresh).

    `resume`: False, True / "latest" (the newest checkpoint; refused later if damaged) or "latest-intact" (the
    newest whose checksums verify, damaged newer ones skipped and named). Refuses (ValueError naming run_dir)
    to start fresh over a run that has checkpoints.
    """
    run_dir = Path(run_dir)
    checkpoints = run_dir / CHECKPOINTS_DIR
    clean_staging(checkpoints)
    mode = resume_mode(resume)
    latest = latest_checkpoint(checkpoints)
    if latest is not None and mode == "latest-intact":
        latest = newest_intact_checkpoint(checkpoints)
        if latest is None:
            raise ValueError(f"--resume latest-intact: every checkpoint in {checkpoints} is damaged (see above)")
    if latest is not None and not resume:
        raise ValueError(f"run_dir {str(run_dir)!r} already has checkpoints (newest {latest.name}): pass --resume to "
                         "continue it, or choose another run_dir")
    if resume and latest is None:
        print(f"--resume: no complete checkpoint in {checkpoints}, starting from scratch")
    run_dir.mkdir(parents=True, exist_ok=True)
    return latest if resume else None


@dataclass
class RunStart:
    run_dir: Path
    checkpoint: Path | None  # the newest checkpoint when resuming, else None (a fresh run)
    device: torch.device


def start_run(cfg: Any, resume: bool | str, device: str, device_key: str) -> RunStart:
    """The prologue of a run config with `run_dir` and `seed`: the directory (refusing to overwrite a run), the
    resolved config saved into it, every RNG seeded, the device resolved (errors name `device_key`)."""
    device_ = resolve_device(device, device_key)  # before anything is written: a bad device leaves no run_dir
    run_dir = Path(cfg.run_dir)
    checkpoint = prepare_run_dir(run_dir, resume)
    save_run_config(cfg, run_dir / ("config.yaml" if checkpoint is None else "config.resumed.yaml"))
    seed_everything(cfg.seed)
    return RunStart(run_dir, checkpoint, device_)


def start_parallel_run(cfg: Any, parallel: ParallelConfig, resume: bool | str, device: str, device_key: str,
                       check: Callable[[ParallelMesh], None] | None = None) -> tuple[ParallelMesh, RunStart]:
    """`start_run` under torchrun: the mesh (1 process without torchrun), then the run's start, which rank 0
    makes (directory, saved config) and broadcasts; every rank is seeded alike. `check(mesh)` runs before
    anything is written (a config that does not fit the world size leaves no run directory). Under more than
    one process `start.device` is this rank's device (`cuda:LOCAL_RANK` under NCCL)."""
    mesh = init_parallel(parallel)
    if check is not None:
        check(mesh)
    start = start_run(cfg, resume, device=device, device_key=device_key) if mesh.is_main else None
    start = mesh.broadcast(start)
    if not mesh.is_main:
        seed_everything(cfg.seed)
    if mesh.distributed:
        start = dataclasses.replace(start, device=mesh.device)
    return mesh, start
