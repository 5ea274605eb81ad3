"""Gradient-norm clipping over the whole sharded model (DTensor-aware, as torchtitan's `clip_grad_norm_`).

Every parameter of a parallelized model is either a DTensor sharded over some mesh (FSDP2: dense parameters
over all ranks, routed experts over the ranks holding them) or, under EP, unique to its EP rank. So each rank
sums the squares of what it holds, and one all-reduce over all ranks gives ||g||^2 of the single-device model:
no element is counted twice. The clip coefficient is torch's: min(1, max_norm / (norm + 1e-6)).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor, Shard

from r1forge.parallel.mesh import ParallelMesh


def _local(t: torch.Tensor) -> torch.Tensor:
    if isinstance(t, DTensor):
        if not all(isinstance(p, Shard) for p in t.placements):
            raise ValueError(f"clip_grad_norm_: a gradient with placements {t.placements} is replicated; only "
                             "sharded gradients are summed without double counting")
        return t.to_local()
    return t


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.nn.Parameter], max_norm: float, mesh: ParallelMesh) -> torch.Tensor:
    """Scale the gradients so that their global L2 norm is at most `max_norm` (inf: only measure); the norm."""
    grads = [_local(p.grad) for p in parameters if p.grad is not None]
    squares = torch.zeros(1, dtype=torch.float64, device=mesh.device)
    for g in grads:
        squares += g.double().pow(2).sum()
    (squares,) = mesh.all_reduce_(list([squares]))
    total = squares.sqrt().squeeze(0).float()
    if math.isfinite(max_norm):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return total
