"""Training checkpoints: a Hugging Face model directory plus everything needed to continue bit for bit.

    RUN_DIR/checkpoints/step-00000400/
        config.json, generation_config.json, model.safetensors   (r1forge.checkpoint.save_checkpoint)
        tokenizer.json, tokenizer_config.json                    (loads in transformers.AutoTokenizer)
        training_state.pt    optimizer, scheduler, RNG states (torch, CUDA, python, numpy), `extra`
                             (data position, guard counters, ...), loaded with weights_only=True
        trainer_state.json   step and human-readable info
        checksums.json       size and SHA-256 of every file above (r1forge.checkpoint.manifest); written last,
                             verified in full on every resume

The directory is assembled under a hidden staging name (`.step-00000400.tmp-PID-XXXX`) in the same folder,
every file fsynced, and renamed into place in one step. A kill at any moment therefore leaves either no
`step-N` or a complete one; `latest_checkpoint` only ever returns complete ones, and `clean_staging` removes
the leftovers of killed saves. The model directory itself loads with `r1forge.load_model` and transformers.
A checkpoint whose bytes no longer match its checksums is refused, naming the file; `resume="latest-intact"`
(`--resume latest-intact`) instead skips back to the newest checkpoint that verifies.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from r1forge.checkpoint import CheckpointError, save_checkpoint
from r1forge.checkpoint.atomic import exchange_directories, fsync_path
from r1forge.checkpoint.manifest import MANIFEST_FILE, read_manifest, verify_checkpoint, write_manifest

TRAINING_STATE_FILE = "training_state.pt"
TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINTS_DIR = "checkpoints"
RESUME_MODES = ("latest", "latest-intact")  # --resume [MODE]: the newest checkpoint, or the newest that verifies
_NAME_RE = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


# ---------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, in a form `torch.load(weights_only=True)` accepts."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # numpy is optional: nothing of ours draws from it
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured (CUDA only when this process has the same devices)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))


# ---------------------------------------------------------------------------------------------- listing
def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under `directory` as (step, path), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    out = []
    for entry in directory.iterdir():
        m = _NAME_RE.match(entry.name)
        if m and entry.is_dir() and (entry / TRAINER_STATE_FILE).is_file() and (entry / TRAINING_STATE_FILE).is_file():
            out.append((int(m[1]), entry))
    return sorted(out)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `directory` (a run's `checkpoints/` folder), or None."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def resume_mode(resume: bool | str) -> str | None:
    """None (start fresh), "latest" or "latest-intact" from a run's `resume` argument (True means "latest")."""
    if resume is False or resume is None:
        return None
    mode = "latest" if resume is True else resume
    if mode not in RESUME_MODES:
        raise ValueError(f"resume must be true or one of {RESUME_MODES}, got {resume!r}")
    return mode


def newest_intact_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `directory` whose files all match their checksums (None: none).

    Each damaged one skipped is printed with the reason, so that falling back is never silent.
    """
    for step, path in reversed(list_checkpoints(directory)):
        try:
            verify_training_checkpoint(path)
        except CheckpointError as e:
            print(f"skipping checkpoint step {step}, it is damaged: {e}")
            continue
        return path
    return None


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A model directory from a path that is one, a run directory, or a run's checkpoints folder (newest)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    for candidate in (path / CHECKPOINTS_DIR, path):
        latest = latest_checkpoint(candidate)
        if latest is not None:
            return latest
    raise ValueError(f"{path}: not a model directory (no config.json) nor a run with complete checkpoints")


def clean_staging(directory: str | os.PathLike) -> list[str]:
    """Delete staging folders left by saves that were killed (only call while no save is running)."""
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for entry in directory.iterdir():
            if entry.name.startswith(".") and ".tmp-" in entry.name:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
    return removed


def prune_checkpoints(directory: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (0 keeps all); returns the deleted paths."""
    if keep_last <= 0:
        return []
    old = [path for _, path in list_checkpoints(directory)[:-keep_last]]
    for path in old:
        # Renamed away first, so a kill mid-delete never leaves a half-deleted `step-N` that looks complete.
        trash = path.with_name(f".{path.name}.tmp-delete-{secrets.token_hex(4)}")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return old


# ---------------------------------------------------------------------------------------------- save / load
def _write_state(path: Path, state: dict[str, Any]) -> None:
    """training_state.pt, flushed to disk."""
    torch.save(state, path)
    fsync_path(path)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    fsync_path(path)


def place_checkpoint(staging: Path, final: Path) -> None:
    """Move a complete staging folder to `final` in one step (replacing an older copy), both fsynced."""
    fsync_path(staging)
    if final.exists() and exchange_directories(staging, final):  # re-saving a step: one atomic swap
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old checkpoint
    elif final.exists():  # no renameat2: two renames (a crash between them leaves the old copy in trash)
        trash = final.parent / f".{final.name}.tmp-old-{secrets.token_hex(4)}"
        os.rename(final, trash)
        os.rename(staging, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(staging, final)
    fsync_path(final.parent)


def save_training_checkpoint(directory: str | os.PathLike, step: int, model: nn.Module, *,
                             tokenizer: Any = None, optimizer: torch.optim.Optimizer | None = None,
                             scheduler: Any = None, extra: dict[str, Any] | None = None,
                             info: dict[str, Any] | None = None, keep_last: int = 0) -> Path:
    """Write `directory/step-N` atomically and return its path.

    Args:
        directory: the run's checkpoints folder (created).
        step: optimizer steps taken; names the checkpoint.
        model: saved in the Hugging Face layout (MTP modules at layer num_hidden_layers + k).
        tokenizer: anything with `save_pretrained(dir)`; saved beside the weights.
        optimizer, scheduler: their state_dicts go into training_state.pt.
        extra: more resumable state (tensors, numbers, strings, lists, dicts), e.g. the data position.
        info: JSON-able facts for trainer_state.json (metrics, config).
        keep_last: delete older checkpoints beyond this many once the new one is in place (0 keeps all).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint_name(step)
    staging = directory / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        save_checkpoint(model, staging)  # creates `staging` (atomically, by its own staging folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
            for name in ("tokenizer.json", "tokenizer_config.json"):
                if (staging / name).is_file():
                    fsync_path(staging / name)
        state = {"step": step, "rng": rng_state(), "extra": extra or {},
                 "optimizer": optimizer.state_dict() if optimizer is not None else None,
                 "scheduler": scheduler.state_dict() if scheduler is not None else None}
        _write_state(staging / TRAINING_STATE_FILE, state)
        _write_json(staging / TRAINER_STATE_FILE, {"step": step, "checksums": MANIFEST_FILE, **(info or {})})
        model_files = read_manifest(staging)  # hashed by save_checkpoint a moment ago
        write_manifest(staging, reuse=model_files["files"] if model_files else None)
        place_checkpoint(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    prune_checkpoints(directory, keep_last)
    return final


def verify_training_checkpoint(path: str | os.PathLike) -> None:
    """Check every file of a training checkpoint against its checksums.json, in full (SHA-256).

    Raises CheckpointError naming each damaged file. A checkpoint without a manifest is accepted only when its
    trainer_state.json does not say one was written (checkpoints of r1forge before checksums existed).
    """
    path = Path(path)
    if verify_checkpoint(path, "full") is not None:
        return
    try:
        promised = json.loads((path / TRAINER_STATE_FILE).read_text(encoding="utf-8")).get("checksums")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{path / TRAINER_STATE_FILE} is unreadable ({e}) and there is no {MANIFEST_FILE} "
                              "to verify the checkpoint with") from None
    if promised:
        raise CheckpointError(f"{path / MANIFEST_FILE} is missing (trainer_state.json says it was written): the "
                              "checkpoint's files cannot be verified")
    print(f"note: {path} has no {MANIFEST_FILE} (written before r1forge kept checksums): resuming unverified")


def load_training_checkpoint(path: str | os.PathLike, model: nn.Module | None = None,
                             optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                             restore_rng: bool = True) -> dict[str, Any]:
    """Restore a checkpoint written by `save_training_checkpoint` into the given objects.

    Every file is first checked against the checkpoint's checksums (`verify_training_checkpoint`): damaged
    bytes raise CheckpointError naming the file, before anything is restored.

    Returns:
        {"step": N, "extra": ..., "info": trainer_state.json's contents}.
    """
    from r1forge.checkpoint import load_checkpoint

    path = Path(path)
    state_file = path / TRAINING_STATE_FILE
    if not state_file.is_file():
        raise ValueError(f"{path}: not a training checkpoint (no {TRAINING_STATE_FILE})")
    try:
        verify_training_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}\nrefusing to resume from it; resume='latest-intact' (--resume latest-intact) "
                              "resumes from the newest checkpoint that verifies instead") from None
    if model is not None:
        load_checkpoint(model, path, strict=True, verify="none")  # verified above
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    if optimizer is not None:
        if state.get("optimizer") is None:
            raise ValueError(f"{state_file}: has no optimizer state to resume from")
        optimizer.load_state_dict(state["optimizer"])  # moves the moments to their parameters' device
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    info = json.loads((path / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
    return {"step": int(state["step"]), "extra": state.get("extra", {}), "info": info}
