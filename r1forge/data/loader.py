"""A deterministic batch iterator whose position can be saved and restored exactly.

Training resumed from a checkpoint must see the very batches it would have seen without the interruption.
The order of epoch e is a shuffle seeded by (seed, e) alone, so the whole position is two integers:
`{"epoch": e, "index": batches already taken in e}`. No worker processes, no hidden RNG state.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

Batch = dict[str, torch.Tensor]


class MapDataset(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]: ...


def stack_collate(samples: list[dict[str, torch.Tensor]]) -> Batch:
    """Stack same-shaped samples key by key."""
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The sample order of one epoch: a function of (seed, epoch) only, the same on every machine."""
    order = list(range(num_samples))
    if shuffle:
        random.Random(f"r1forge-loader:{seed}:{epoch}").shuffle(order)
    return order


class StatefulLoader:
    """Endless batches over epochs, each epoch in a fresh seeded order; the last partial batch is dropped.

    Args:
        dataset: indexable samples (dicts of tensors).
        batch_size: samples per batch on this rank.
        seed: fixes every epoch's order.
        shuffle: shuffle each epoch (False keeps dataset order, e.g. for evaluation).
        collate_fn: samples -> batch; defaults to the dataset's `collate` or stacking.
        rank, world_size: data-parallel sharding; rank r takes every world_size-th batch-sized slice.
    """

    def __init__(self, dataset: MapDataset, batch_size: int, seed: int = 0, shuffle: bool = True,
                 collate_fn: Callable[[list[dict[str, torch.Tensor]]], Batch] | None = None,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if len(dataset) < batch_size * world_size:
            raise ValueError(f"dataset has {len(dataset)} samples, fewer than one batch "
                             f"(batch_size {batch_size} x world_size {world_size})")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.collate_fn = collate_fn or getattr(dataset, "collate", None) or stack_collate
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.index = 0
        self._order: list[int] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def next_indices(self) -> list[int]:
        """The dataset indices of the next batch; advances the position."""
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = epoch_order(len(self.dataset), self.seed, self.epoch, self.shuffle)
        start = (self.index * self.world_size + self.rank) * self.batch_size
        self.index += 1
        return self._order[start : start + self.batch_size]

    def __next__(self) -> Batch:
        return self.collate_fn([self.dataset[i] for i in self.next_indices()])

    def state_dict(self) -> dict[str, Any]:
        """The position (and what it is only valid for), to store in a training checkpoint."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_samples": len(self.dataset),
                "batch_size": self.batch_size, "world_size": self.world_size, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; refuses one taken over different data or batching."""
        for key, mine in (("seed", self.seed), ("num_samples", len(self.dataset)), ("shuffle", self.shuffle)):
            if key in state and state[key] != mine:
                raise ValueError(f"loader state {key}={state[key]!r} does not match this loader's {mine!r}: "
                                 "resuming would not replay the same batches")
        # The position counts global batches, so another world size with the same global batch continues it.
        saved = state.get("batch_size", self.batch_size) * state.get("world_size", self.world_size)
        if saved != self.batch_size * self.world_size:
            raise ValueError(f"loader state batch_size={state.get('batch_size')} x world_size={state.get('world_size')} "
                             f"(a global batch of {saved}) does not match this loader's {self.batch_size} x "
                             f"{self.world_size}: resuming would not replay the same batches")
        for key in ("epoch", "index"):
            if not isinstance(state.get(key), int) or state[key] < 0:
                raise ValueError(f"loader state needs a non-negative integer {key!r}, got {state.get(key)!r}")
        self.epoch, self.index, self._order = state["epoch"], state["index"], None
