"""Sharded training checkpoints with `torch.distributed.checkpoint` (DCP), and their export to the HF layout.

    RUN_DIR/checkpoints/step-00000400/
        dcp/                 model and optimizer, every rank writing its own shards (FQN keys: one name per
                             expert whatever the EP degree, so DCP reshards to any world size or EP degree)
        rank-00003.pt        that rank's RNG states and its `extra` (data position, ...)
        training_state.pt    step, scheduler, the layout it was saved under (rank 0)
        config.json, tokenizer files (rank 0)
        trainer_state.json   written last, by rank 0, once every rank has finished

Atomic as the single-process checkpoints: all ranks write into one staging folder (its name broadcast from
rank 0), a barrier waits for all of them, rank 0 writes trainer_state.json and renames the folder into place,
and a second barrier holds everyone until it is there. A kill at any moment leaves no `step-N` or a complete one.

Resuming under another world size or EP degree restores weights and optimizer (resharded by DCP), the
scheduler and the data position (the global batch is the same); per-rank RNG states cannot be mapped onto
different ranks and are left as seeded, which the returned notes say.
"""

from __future__ import annotations

import os
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict,
)

from r1forge.checkpoint.atomic import fsync_path
from r1forge.checkpoint.manifest import MANIFEST_FILE, write_manifest
from r1forge.parallel.mesh import ParallelMesh
from r1forge.train.checkpointing import (
    TRAINER_STATE_FILE, TRAINING_STATE_FILE, _write_json, checkpoint_name, place_checkpoint, prune_checkpoints,
    rng_state, set_rng_state, verify_training_checkpoint,
)

DCP_DIR = "dcp"
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def is_sharded(path: str | os.PathLike) -> bool:
    return (Path(path) / DCP_DIR).is_dir()


def _layout(mesh: ParallelMesh) -> dict[str, int]:
    return {"world_size": mesh.world_size, "dp_shard": mesh.dp_shard, "ep": mesh.ep}


def save_sharded_checkpoint(directory: str | os.PathLike, step: int, model: nn.Module, mesh: ParallelMesh, *,
                            optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None, tokenizer: Any = None,
                            extra: dict[str, Any] | None = None, info: dict[str, Any] | None = None,
                            keep_last: int = 0) -> Path:
    """Write `directory/step-N` from every rank (a collective: all ranks call it); its path."""
    directory = Path(directory)
    final = directory / checkpoint_name(step)
    staging = None
    if mesh.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        staging = directory / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        staging.mkdir()
    staging = Path(mesh.broadcast(str(staging)))
    try:
        state = {"model": get_model_state_dict(model, options=_OPTIONS)}
        if optimizer is not None:
            state["model"], state["optimizer"] = get_state_dict(model, optimizer, options=_OPTIONS)
        dcp.save(state, checkpoint_id=staging / DCP_DIR)
        own = staging / rank_file(mesh.rank)
        torch.save({"rng": rng_state(), "extra": extra or {}}, own)
        fsync_path(own)
        if mesh.is_main:
            torch.save({"step": step, "layout": _layout(mesh), "extra": extra or {},
                        "scheduler": scheduler.state_dict() if scheduler is not None else None},
                       staging / TRAINING_STATE_FILE)
            fsync_path(staging / TRAINING_STATE_FILE)
            # The config says what the checkpoint holds (a model built without its MTP modules has none).
            model.config.replace(num_nextn_predict_layers=model.num_mtp).save_json(staging / "config.json")
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
        mesh.barrier()  # every rank's shards are on disk
        if mesh.is_main:
            _write_json(staging / TRAINER_STATE_FILE,
                        {"step": step, "checksums": MANIFEST_FILE, **_layout(mesh), **(info or {})})
            # every rank's shard files too (dcp/...): resume verifies them all before any is read
            write_manifest(staging, [f.relative_to(staging).as_posix() for f in sorted(staging.rglob("*"))
                                     if f.is_file()])
            place_checkpoint(staging, final)
            prune_checkpoints(directory, keep_last)
        mesh.barrier()  # nobody goes on (or resumes) before the checkpoint is in place
    except BaseException:
        if mesh.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def load_sharded_checkpoint(path: str | os.PathLike, model: nn.Module, mesh: ParallelMesh, *,
                            optimizer: torch.optim.Optimizer | None = None,
                            scheduler: Any = None) -> dict[str, Any]:
    """Restore a sharded checkpoint into this rank's shards (a collective).

    Returns {"step", "extra" (this rank's, or rank 0's under another layout), "notes": what was not carried}.
    """
    path = Path(path)
    if not is_sharded(path):
        raise ValueError(f"{path}: not a sharded checkpoint (no {DCP_DIR}/)")
    verify_training_checkpoint(path)  # every rank's shards, against the manifest rank 0 wrote
    state = torch.load(path / TRAINING_STATE_FILE, map_location="cpu", weights_only=True)
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
        dcp.load({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=path / DCP_DIR,
                 no_dist=not mesh.distributed)
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=_OPTIONS)
    else:
        model_sd = get_model_state_dict(model, options=_OPTIONS)
        dcp.load({"model": model_sd}, checkpoint_id=path / DCP_DIR, no_dist=not mesh.distributed)
        set_model_state_dict(model, model_sd, options=_OPTIONS)
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    notes = []
    saved = state.get("layout", {})
    own = path / rank_file(mesh.rank)
    if saved == _layout(mesh) and own.is_file():
        mine = torch.load(own, map_location="cpu", weights_only=True)
        set_rng_state(mine["rng"])
        extra = mine["extra"]
    else:
        notes.append(f"saved with {saved}, resumed with {_layout(mesh)}: weights, optimizer, scheduler and the "
                     "data position carried over; per-rank RNG states were not (each rank keeps its seeded RNG)")
        extra = state.get("extra", {})
    return {"step": int(state["step"]), "extra": extra, "notes": notes}


def export_checkpoint(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """A sharded checkpoint -> the Hugging Face safetensors layout in `out_dir` (one process, no process group).

    Reads only the model's tensors (DCP assembles each from its shards); the tokenizer files are copied.
    """
    from r1forge.auto_config import load_config
    from r1forge.checkpoint import save_checkpoint
    from r1forge.model.factory import new_model

    path = Path(path)
    if not is_sharded(path):
        raise ValueError(f"{path}: not a sharded checkpoint (no {DCP_DIR}/); it is already a model directory"
                         if (path / "config.json").is_file() else f"{path}: not a sharded checkpoint")
    config = load_config(path)  # DeepSeek, or a dense Qwen2 / Llama student
    model = new_model(config, with_mtp=config.num_nextn_predict_layers > 0)
    model_sd = model.state_dict()
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load({"model": model_sd}, checkpoint_id=path / DCP_DIR, no_dist=True)
    out = Path(out_dir)
    save_checkpoint(model, out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (path / name).is_file() and out.resolve() != path.resolve():
            shutil.copy2(path / name, out / name)
    return out
