"""`run_pretrain` / `run_sft`: a run config -> tokenizer, data, model and a `Trainer`; what the CLI calls.

    from r1forge.train import PretrainRunConfig, load_run_config, run_pretrain
    result = run_pretrain(load_run_config(PretrainRunConfig, "configs/pretrain_tiny.yaml", ["--train.steps", "50"]))

The run directory holds the resolved `config.yaml`, `metrics.jsonl`, `tb/`, the tokenizer trained for the run
(when none was given) and `checkpoints/step-N/`; it is opened by the prologue every run shares
(`r1forge.train.prologue.start_run`: no silent overwrite, seeds, device).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from r1forge.accounting import check_model_fits
from r1forge.auto_config import config_from_preset, load_config
from r1forge.data import Tokenizer, load_tokenizer, train_tokenizer
from r1forge.model import CausalLM, build_model
from r1forge.parallel import ParallelMesh, parallelize
from r1forge.train.checkpointing import resolve_model_dir
from r1forge.train.config import ModelSection, PretrainRunConfig, SFTRunConfig
from r1forge.train.data import (
    fixed_batches, make_loader, pretrain_datasets, pretrain_texts, sft_datasets, sft_texts, target_counts,
    unigram_entropy,
)
from r1forge.train.prologue import RunStart, start_parallel_run
from r1forge.train.trainer import Trainer, TrainResult


def _resolve_tokenizer(given: str | None, checkpoint: Path | None, init_dir: Path | None, run_dir: Path,
                       vocab_size: int, files: list[str], texts: Callable[[], list[str] | None]) -> Tokenizer:
    """The run's tokenizer: the configured one, the resumed checkpoint's, the init model's, or a new one."""
    if given is not None:
        return load_tokenizer(given)
    for directory in (checkpoint, init_dir):
        if directory is not None and (directory / "tokenizer.json").is_file():
            return load_tokenizer(directory)
    out = run_dir / "tokenizer"
    print(f"training a {vocab_size}-token BPE tokenizer on the training data -> {out}")
    train_tokenizer(files or None, out, vocab_size=vocab_size, texts=texts())
    return load_tokenizer(out)


def build_run_model(section: ModelSection, tokenizer: Tokenizer, device: torch.device) -> CausalLM:
    """A random model of `section.preset` (+ overrides) sized to the tokenizer, or the `init_from` model.

    Without `section.mtp` the model has no MTP modules and its config says so (num_nextn_predict_layers 0),
    so its checkpoints describe exactly what they hold.
    """
    if section.init_from is not None:
        if section.overrides:
            raise ValueError("model.overrides cannot reshape a pretrained model (model.init_from is set)")
        from r1forge.loading import load_model

        model_dir = resolve_model_dir(section.init_from)
        config = load_config(model_dir)
        mtp = section.mtp and config.num_nextn_predict_layers > 0
        check_model_fits(config, device, include_mtp=mtp, copies=4, what=f"training {model_dir}")
        model = load_model(model_dir, device=device, with_mtp=mtp)
        model.config.num_nextn_predict_layers = model.num_mtp
    else:
        config_cls = type(config_from_preset(section.preset))  # ModelConfig, or DenseConfig for a Qwen2/Llama preset
        known = {f.name for f in dataclasses.fields(config_cls)} - {"extra"}
        for key in section.overrides:
            if key not in known:
                raise ValueError(f"model.overrides.{key}: not a {config_cls.__name__} field")
        overrides: dict[str, Any] = {"vocab_size": tokenizer.vocab_size, "bos_token_id": tokenizer.bos_token_id,
                                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
        overrides.update(section.overrides)
        config = config_from_preset(section.preset, **overrides)
        if not section.mtp and config.num_nextn_predict_layers:
            config = config.replace(num_nextn_predict_layers=0)
        check_model_fits(config, device, include_mtp=section.mtp, copies=4,
                         what=f"training model.preset {section.preset!r} with its overrides")
        model = build_model(config, device=device, with_mtp=section.mtp)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"the model's vocab_size {model.config.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size}")
    model.train()
    return model


def check_global_batch(batch_size: int, mesh: ParallelMesh, key: str = "train.batch_size") -> None:
    """The global batch must split evenly over the data-parallel ranks."""
    if batch_size % mesh.world_size:
        raise ValueError(f"{key} {batch_size} (the global batch) is not divisible by the {mesh.world_size} "
                         "data-parallel ranks")


def _parallel_prologue(cfg: Any, resume: bool | str) -> tuple[ParallelMesh, RunStart]:
    """The mesh (1 process without torchrun) and the run's start, which rank 0 makes and broadcasts."""
    return start_parallel_run(cfg, cfg.parallel, resume, cfg.train.device, "train.device",
                              check=lambda mesh: check_global_batch(cfg.train.batch_size, mesh))


def _run(cfg: Any, resume: bool | str, make_data: Any, tokenizer_texts: Any, kind: str) -> TrainResult:
    mesh, start = _parallel_prologue(cfg, resume)
    run_dir, checkpoint = Path(cfg.run_dir), start.checkpoint
    say = print if mesh.is_main else (lambda *args, **kwargs: None)
    device = mesh.device if mesh.distributed else start.device
    init_dir = resolve_model_dir(cfg.model.init_from) if cfg.model.init_from else None
    made: list[list[str] | None] = []  # the built-in texts, generated only if a tokenizer is trained on them

    def texts() -> list[str] | None:
        if not made:
            made.append(tokenizer_texts())
        return made[0]

    tokenizer = None
    if mesh.is_main:  # rank 0 trains the run's tokenizer (when there is none); the others then read it
        tokenizer = _resolve_tokenizer(cfg.data.tokenizer, checkpoint, init_dir, run_dir, cfg.data.vocab_size,
                                       cfg.data.files, texts)
    mesh.barrier()
    if tokenizer is None:
        given = cfg.data.tokenizer or (str(run_dir / "tokenizer") if (run_dir / "tokenizer").is_dir() else None)
        tokenizer = _resolve_tokenizer(given, checkpoint, init_dir, run_dir, cfg.data.vocab_size, cfg.data.files,
                                       texts)
    model = build_run_model(cfg.model, tokenizer, device)
    n_params = sum(p.numel() for p in model.parameters())  # before sharding: the whole model's
    model = parallelize(model, mesh, cfg.train.bf16)
    train_ds, eval_ds = make_data(tokenizer, made[0] if made else None)
    counts = target_counts(train_ds, model.config.vocab_size)
    entropy = unigram_entropy(counts)
    info = {"kind": kind, "unigram_entropy": entropy, "train_targets": int(counts.sum()), "train_rows": len(train_ds),
            "eval_rows": len(eval_ds) if eval_ds is not None else 0, "params": n_params, "device": str(device),
            "world_size": mesh.world_size, "dp_shard": mesh.dp_shard, "ep": mesh.ep}
    say(f"{kind}: {n_params / 1e6:.2f}M parameters ({model.num_mtp} MTP), {len(train_ds)} training rows, "
          f"{int(counts.sum())} target tokens, device {device}")
    say(f"unigram entropy of the training tokens: {entropy:.4f} nats/token (the loss of a context-free model)")
    loader = make_loader(train_ds, cfg.train.batch_size // mesh.world_size, cfg.seed, mesh.rank, mesh.world_size)
    eval_batches = fixed_batches(eval_ds, cfg.train.batch_size, cfg.log.eval_batches)
    trainer = Trainer(model, loader, cfg.train, cfg.log, run_dir, eval_batches=eval_batches, tokenizer=tokenizer,
                      run_info=info, parallel=mesh)
    if checkpoint is not None:
        trainer.resume(checkpoint)
        say(f"resumed from {checkpoint} (step {trainer.step})")
    result = trainer.fit()
    if mesh.distributed and result.checkpoint is not None:  # the HF layout beside the shards, for load_model
        if mesh.is_main:
            from r1forge.parallel.checkpoint import export_checkpoint

            export_checkpoint(result.checkpoint, result.checkpoint)
        mesh.barrier()
    summary = f"{kind} {result.status} at step {result.step}" + (f" ({result.reason})" if result.reason else "")
    if result.eval_loss is not None:
        summary += f": held-out loss {result.eval_loss:.4f} vs unigram {entropy:.4f} nats/token"
    say(summary + (f"; checkpoint {result.checkpoint}" if result.checkpoint else ""))
    return result


def run_pretrain(cfg: PretrainRunConfig, resume: bool | str = False) -> TrainResult:
    """Pretrain as `cfg` says (see the module docstring); `resume` continues the run's newest checkpoint
    (True / "latest"), or its newest intact one ("latest-intact", see `prepare_run_dir`)."""
    return _run(cfg, resume,
                lambda tok, texts: pretrain_datasets(cfg.data, tok, cfg.seed, texts),
                lambda: pretrain_texts(cfg.data, cfg.seed), "pretrain")


def run_sft(cfg: SFTRunConfig, resume: bool | str = False) -> TrainResult:
    """Supervised fine-tuning on chat data (loss on assistant tokens only); usually `model.init_from` a pretrain run."""
    return _run(cfg, resume,
                lambda tok, texts: sft_datasets(cfg.data, tok, cfg.seed),
                lambda: sft_texts(cfg.data, cfg.seed) if cfg.data.tokenizer is None else None, "sft")
