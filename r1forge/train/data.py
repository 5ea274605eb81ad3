"""Run-config -> datasets: the built-in arithmetic corpus or files, held-out splits, the unigram baseline.

The datasets themselves are `r1forge.data`'s; this module only decides which texts go where:
- pretraining on the built-in corpus trains on `make_pretrain_corpus` (train-split problems and simple
  English) and evaluates on test-split problems, which never occur in training;
- pretraining on files evaluates on `eval_files`, or else on the last `eval_fraction` of the packed rows;
- SFT on the built-in problems trains on train-split conversations and evaluates on test-split ones.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from r1forge.data import (
    IGNORE_INDEX, PretrainDataset, SFTDataset, StatefulLoader, Tokenizer, make_pretrain_corpus,
    pretrain_text, sft_messages, stack_collate,
)
from r1forge.data.synthetic import Problem, shows_steps
from r1forge.train.config import PretrainDataConfig, SFTDataConfig

Batch = dict[str, torch.Tensor]


class RowSubset:
    """Rows `indices` of a dataset, as a dataset (keeps the parent's `collate`)."""

    def __init__(self, dataset: Any, indices: range | list[int]) -> None:
        self.dataset = dataset
        self.indices = indices
        if hasattr(dataset, "collate"):
            self.collate = dataset.collate

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.dataset[self.indices[index]]


def pretrain_texts(cfg: PretrainDataConfig, seed: int) -> list[str] | None:
    """The built-in corpus when no files are given (also what a tokenizer is trained on), else None."""
    if cfg.files:
        return None
    return make_pretrain_corpus(cfg.synthetic_docs, seed, cfg.problem_fraction, cfg.min_steps, cfg.max_steps,
                                cfg.max_operand, tuple(cfg.kinds), cfg.max_result, cfg.tagged_fraction)


def pretrain_datasets(cfg: PretrainDataConfig, tokenizer: Tokenizer, seed: int,
                      texts: list[str] | None = None) -> tuple[Any, Any | None]:
    """(train, held-out) packed datasets; held-out is None when there is nothing to evaluate on."""
    if not cfg.files:
        texts = texts if texts is not None else pretrain_texts(cfg, seed)
        train = PretrainDataset(tokenizer, cfg.seq_len, texts=texts, seed=seed)
        problems = cfg.problems(cfg.synthetic_eval_problems, seed, "test")
        held_out = PretrainDataset(tokenizer, cfg.seq_len, texts=[pretrain_text(p) for p in problems], seed=None)
        return train, held_out
    train = PretrainDataset(tokenizer, cfg.seq_len, files=cfg.files, seed=seed, skip_malformed=cfg.skip_malformed)
    _report_skipped(train, cfg.files)
    if cfg.eval_files:
        held_out = PretrainDataset(tokenizer, cfg.seq_len, files=cfg.eval_files, seed=None,
                                   skip_malformed=cfg.skip_malformed)
        _report_skipped(held_out, cfg.eval_files)
        return train, held_out
    n_eval = int(len(train) * cfg.eval_fraction)
    if n_eval == 0:
        return train, None
    n_train = len(train) - n_eval
    return RowSubset(train, range(n_train)), RowSubset(train, range(n_train, len(train)))


def sft_records(cfg: SFTDataConfig, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Built-in (train, held-out) conversations, used where no files are given."""
    def conversation(p: Problem) -> dict[str, Any]:
        return {"messages": sft_messages(p, shows_steps(p, cfg.shown_steps_fraction, seed))}

    train = [] if cfg.files else [conversation(p) for p in cfg.problems(cfg.synthetic_problems, seed, "train")]
    held_out = [] if cfg.eval_files else [conversation(p)
                                          for p in cfg.problems(cfg.synthetic_eval_problems, seed, "test")]
    return train, held_out


def sft_texts(cfg: SFTDataConfig, seed: int) -> list[str]:
    """Message contents to train a tokenizer on when none is given (files are read by train_tokenizer)."""
    train, _ = sft_records(cfg, seed)
    return [m["content"] for r in train for m in r["messages"] if isinstance(m.get("content"), str)]


def sft_datasets(cfg: SFTDataConfig, tokenizer: Tokenizer, seed: int) -> tuple[SFTDataset, SFTDataset]:
    """(train, held-out) chat datasets, labels on assistant tokens only."""
    train_records, eval_records = sft_records(cfg, seed)
    train = SFTDataset(tokenizer, cfg.max_len, files=cfg.files or None, records=train_records or None,
                       packing=cfg.packing, seed=seed, skip_malformed=cfg.skip_malformed)
    held_out = SFTDataset(tokenizer, cfg.max_len, files=cfg.eval_files or None, records=eval_records or None,
                          packing=cfg.packing, seed=None, skip_malformed=cfg.skip_malformed)
    _report_skipped(train, cfg.files)
    _report_skipped(held_out, cfg.eval_files)
    return train, held_out


def _report_skipped(dataset: Any, files: list[str]) -> None:
    skipped = getattr(dataset, "num_skipped", 0)
    if skipped:
        print(f"skipped {skipped} malformed line(s) in {', '.join(files)} (data.skip_malformed)")


def target_counts(dataset: Any, vocab_size: int) -> torch.Tensor:
    """How often each token id is a training target (labels != -100) across the dataset [vocab_size]."""
    labels = torch.cat([dataset[i]["labels"].flatten() for i in range(len(dataset))]) if len(dataset) else \
        torch.zeros(0, dtype=torch.long)
    return torch.bincount(labels[labels != IGNORE_INDEX], minlength=vocab_size)[:vocab_size].double()


def unigram_entropy(counts: torch.Tensor) -> float:
    """Entropy (nats/token) of the targets' unigram distribution: the loss of a model that ignores context."""
    total = counts.sum()
    if total <= 0:
        return math.nan
    p = counts[counts > 0] / total
    return float(-(p * p.log()).sum())


def make_loader(dataset: Any, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> StatefulLoader:
    """Shuffled, endless, resumable batches; data-parallel rank `rank` of `world_size` takes its disjoint
    `batch_size` slice of every global batch (so the global batches are the 1-process run's)."""
    if len(dataset) < batch_size * world_size:
        raise ValueError(f"train.batch_size {batch_size * world_size} is larger than the dataset ({len(dataset)} rows)")
    return StatefulLoader(dataset, batch_size, seed=seed, shuffle=True, rank=rank, world_size=world_size)


def fixed_batches(dataset: Any | None, batch_size: int, max_batches: int) -> list[Batch] | None:
    """Held-out batches in dataset order (the same every evaluation); a last partial batch is kept."""
    if dataset is None or len(dataset) == 0 or max_batches == 0:
        return None
    collate = getattr(dataset, "collate", None) or stack_collate
    out = []
    for start in range(0, len(dataset), batch_size):
        out.append(collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]))
        if len(out) == max_batches:
            break
    return out
