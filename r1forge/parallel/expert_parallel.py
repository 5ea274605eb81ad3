"""Expert parallelism: each EP rank holds n_routed_experts / ep routed experts; tokens travel to them by all-to-all.

`AllToAllDispatch` implements the `ExpertDispatch` seam of r1forge/model/moe.py, so the router, the shared
experts and the model code do not change. Per MoE layer and forward:

    1. sort the T*K token copies by expert (as SortedDispatch); experts are contiguous per rank, so this also
       groups the copies by destination rank;
    2. exchange the per-expert counts (all_to_all_single of [E] counts: rank s learns how many of its copies
       each source sends to each of its experts), then the token copies, with uneven splits;
    3. regroup the received rows by local expert (they arrive grouped by source), run each local expert once
       over its slice (also over none, so every expert takes part in the gradient reduction), undo the regroup;
    4. send the results back by the reverse all-to-all and combine them with the gate weights on the token's
       own rank (float32 sum, as SortedDispatch).

The all-to-all is an autograd Function whose backward is the reverse exchange, so gradients reach the experts
from every rank's tokens and come back to the tokens' ranks. Letters: T tokens, D width, E experts, K top-k.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from r1forge.model.moe import DeepseekMoE, combine_copies, run_sorted, sort_copies


class LocalExperts(nn.Module):
    """The routed experts one EP rank holds, under their global indices (`experts.5.gate_proj.weight`).

    Keys are the single-device model's, so a sharded checkpoint names every expert once whatever the EP degree,
    and resuming with another degree is only a matter of which rank reads which key. `len()` is the global count.

    Args:
        experts: all E experts (the non-local ones are dropped).
        first: the global index of the first local expert.
        count: how many experts this rank holds.
    """

    def __init__(self, experts: nn.ModuleList, first: int, count: int) -> None:
        super().__init__()
        self.num_experts = len(experts)
        self.first = first
        self.count = count
        for e in range(first, first + count):
            self.add_module(str(e), experts[e])

    def __len__(self) -> int:
        return self.num_experts

    def __getitem__(self, e: int) -> nn.Module:
        if not self.first <= e < self.first + self.count:
            raise IndexError(f"expert {e} is not on this rank (it holds {self.first}..{self.first + self.count - 1})")
        return self._modules[str(e)]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())

    def forward(self, x_grouped: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Local expert j over its counts[j] contiguous rows of x_grouped [N, D] -> [N, D].

        Every local expert runs, also over no rows, so each takes part in the gradient reduction; the call
        goes through `forward` so that FSDP's hooks gather the experts' shards first.
        """
        return run_sorted(self, x_grouped, counts, first=self.first, run_empty=True)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits along dim 0; backward sends the gradients the reverse way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int],
               group: dist.ProcessGroup) -> torch.Tensor:
    """Rows x[in_splits[r] ...] go to rank r; the result holds out_splits[s] rows from each rank s."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


class AllToAllDispatch:
    """`ExpertDispatch` over an EP group (see the module docstring). Two host syncs per layer (the splits).

    Args:
        group: the EP process group (consecutive ranks, `ParallelMesh.ep_group`).
        ep: its size.
    """

    def __init__(self, group: dist.ProcessGroup, ep: int) -> None:
        self.group = group
        self.ep = ep

    def __call__(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                 experts: LocalExperts) -> torch.Tensor:
        E, ep = len(experts), self.ep
        E_local = E // ep
        order, token_of_copy, counts_E = sort_copies(topk_ids_TK, E)
        recv_counts = torch.empty_like(counts_E)  # [ep * E_local]: from source s to my expert j at s * E_local + j
        dist.all_to_all_single(recv_counts, counts_E, group=self.group)
        recv_SE = recv_counts.view(ep, E_local)
        send_splits = counts_E.view(ep, E_local).sum(1).tolist()
        recv_splits = recv_SE.sum(1).tolist()
        x_recv = all_to_all(x_TD.index_select(0, token_of_copy), recv_splits, send_splits,
                            self.group)  # [N, D] by (source, expert)
        expert_of_row = torch.arange(E_local, device=x_TD.device).repeat(ep).repeat_interleave(recv_SE.reshape(-1))
        by_expert = expert_of_row.argsort(stable=True)  # regroup by local expert, sources in rank order
        out_grouped = experts(x_recv.index_select(0, by_expert), recv_SE.sum(0).tolist())
        out_recv = out_grouped[by_expert.argsort()]  # back to (source, expert) order
        out_sorted = all_to_all(out_recv, send_splits, recv_splits, self.group)  # [T*K, D] in my sorted order
        return combine_copies(x_TD, out_sorted, order, token_of_copy, topk_weights_TK)


def shard_experts(model: nn.Module, ep_rank: int, ep: int, group: dist.ProcessGroup) -> int:
    """Keep EP rank `ep_rank`'s share of every MoE layer's routed experts and dispatch by all-to-all.

    Returns the number of MoE layers changed. The router (replicated) and the shared experts stay as they are.
    """
    layers = [m for m in model.modules() if isinstance(m, DeepseekMoE)]
    for layer in layers:
        E = len(layer.experts)
        if E % ep:
            raise ValueError(f"parallel.ep={ep} does not divide the model's n_routed_experts ({E})")
        count = E // ep
        layer.experts = LocalExperts(layer.experts, ep_rank * count, count)
        layer.dispatch = AllToAllDispatch(group, ep)
    return len(layers)


def drop_unrouted_grads(layers: list[DeepseekMoE], loads: list[torch.Tensor]) -> int:
    """Set to None the gradients of the experts no token chose in the whole global step; how many experts.

    On one device such an expert has no gradient and AdamW skips it (no decay, no moment update); sharded, it
    joined the gradient reduction with zeros. Dropping them makes the update the single-device one.
    `loads` are the step's global tokens per expert, in `layers` order.
    """
    dropped = 0
    for layer, load in zip(layers, loads, strict=True):
        experts = layer.experts
        first, count = (experts.first, experts.count) if isinstance(experts, LocalExperts) else (0, len(experts))
        for e in (load[first: first + count] == 0).nonzero().flatten().tolist():
            for p in experts[first + e].parameters():
                p.grad = None
            dropped += 1
    return dropped
