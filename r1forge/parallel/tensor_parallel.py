"""Tensor parallelism for inference (Megatron's column/row split), applied from outside the single-device model.

Every rank holds the same hidden state h [N, D]. Each block's two sublayers are split so that one all-reduce
of their output restores it:

- **MLA**: heads are split. `q_b_proj` / `q_proj` and `kv_b_proj` are column-parallel: rank r keeps the rows of
  its H / tp heads (so W_UK and W_UV of the absorbed path are its heads' too); `o_proj` is row-parallel: the
  columns of its heads, and the partial sums are all-reduced. The latent projection `kv_a_proj_with_mqa` and
  the query down-projection are *replicated*: the latent is per token, shared by every head, so every rank
  computes and caches all of it (the cache is replicated tp times; see docs/design.md).
- **Dense MLP and shared experts**: `gate_proj` / `up_proj` column-parallel, `down_proj` row-parallel.
- **Routed experts**: without expert parallelism each expert's width is split like the MLP's; with it, the
  experts are split over the ranks (`shard_experts`, the all-to-all dispatcher of r1forge.parallel) and each
  rank dispatches only its contiguous slice of the (replicated) tokens, so every token copy is computed once;
  its slice's results land in an otherwise zero [T, D] tensor.
- The router is replicated (same input, same weights, same experts on every rank). A DeepseekMoE's output
  (routed + shared, both partial) is all-reduced once per layer.

The model's modules are unchanged: weights are replaced by their slices, `num_heads` set to the local head
count and forward hooks all-reduce the outputs. `apply_tensor_parallel` returns the `ShardLayout` (which
slice of which checkpoint tensor each rank holds) that `r1forge.parallel.sharded_load` reads with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from r1forge.model.mla import MultiHeadLatentAttention
from r1forge.model.moe import MLP, DeepseekMoE
from r1forge.parallel.expert_parallel import AllToAllDispatch, LocalExperts


@dataclass(frozen=True)
class TensorShard:
    """Rank `index` of `count` holds the `index`-th equal part of a tensor along `dim`."""

    dim: int
    index: int
    count: int

    def bounds(self, size: int) -> tuple[int, int]:
        if size % self.count:
            raise ValueError(f"a dimension of {size} does not split into {self.count} equal parts")
        part = size // self.count
        return self.index * part, (self.index + 1) * part

    def shape_of(self, full: tuple[int, ...]) -> tuple[int, ...]:
        start, stop = self.bounds(full[self.dim])
        return full[: self.dim] + (stop - start,) + full[self.dim + 1:]

    def take(self, t: torch.Tensor) -> torch.Tensor:
        start, stop = self.bounds(t.shape[self.dim])
        return t.narrow(self.dim, start, stop - start)


@dataclass
class ShardLayout:
    """What one rank holds of the single-device model's state dict.

    shards: state-dict name -> the slice this rank keeps (every other present name is replicated whole).
    absent: names other ranks hold and this one does not (routed experts of other EP ranks, the LM head on
        workers); a loader skips them instead of calling them unexpected.
    """

    rank: int
    size: int
    shards: dict[str, TensorShard] = field(default_factory=dict)
    absent_prefixes: list[str] = field(default_factory=list)

    def shard_of(self, name: str) -> TensorShard | None:
        return self.shards.get(name)

    def owns(self, name: str) -> bool:
        return not any(name.startswith(p) for p in self.absent_prefixes)


def _slice_param_(module: nn.Module, attr: str, shard: TensorShard, layout: ShardLayout, prefix: str) -> None:
    """Replace module.attr by its slice (a copy, so the full tensor can be freed) and record it."""
    p = getattr(module, attr)
    if p is None:
        return
    part = shard.take(p.detach()).clone()
    setattr(module, attr, nn.Parameter(part, requires_grad=p.requires_grad))
    layout.shards[f"{prefix}.{attr}"] = shard


def _column_parallel_(linear: nn.Linear, rank: int, tp: int, layout: ShardLayout, prefix: str) -> None:
    """Keep rank's block of output rows (weight [out, in] rows, and the bias)."""
    _slice_param_(linear, "weight", TensorShard(0, rank, tp), layout, prefix)
    _slice_param_(linear, "bias", TensorShard(0, rank, tp), layout, prefix)
    linear.out_features //= tp


def _row_parallel_(linear: nn.Linear, rank: int, tp: int, layout: ShardLayout, prefix: str) -> None:
    """Keep rank's block of input columns; the bias is added once (rank 0) since the outputs are summed."""
    _slice_param_(linear, "weight", TensorShard(1, rank, tp), layout, prefix)
    linear.in_features //= tp
    if linear.bias is not None and rank != 0:
        linear.bias = None
        layout.absent_prefixes.append(f"{prefix}.bias")  # held by rank 0 only


def _mlp_parallel_(mlp: MLP, rank: int, tp: int, layout: ShardLayout, prefix: str) -> None:
    _column_parallel_(mlp.gate_proj, rank, tp, layout, f"{prefix}.gate_proj")
    _column_parallel_(mlp.up_proj, rank, tp, layout, f"{prefix}.up_proj")
    _row_parallel_(mlp.down_proj, rank, tp, layout, f"{prefix}.down_proj")


def _all_reduce_hook(group: dist.ProcessGroup):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(output, group=group)
        return output
    return hook


class TokenSliceDispatch:
    """Expert parallelism when every rank holds all the tokens (tensor-parallel attention before the MoE).

    Rank r hands only its contiguous slice of the T tokens to the all-to-all dispatcher (so each token copy is
    computed once, by its expert's rank) and returns [T, D] zeros outside that slice: the MoE's all-reduce,
    which also sums the tensor-parallel shared experts, completes every row.
    """

    def __init__(self, inner: AllToAllDispatch, rank: int, size: int) -> None:
        self.inner, self.rank, self.size = inner, rank, size

    def __call__(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                 experts: LocalExperts) -> torch.Tensor:
        T = x_TD.shape[0]
        lo, hi = T * self.rank // self.size, T * (self.rank + 1) // self.size
        y_TD = torch.zeros_like(x_TD)
        y_TD[lo:hi] = self.inner(x_TD[lo:hi], topk_ids_TK[lo:hi], topk_weights_TK[lo:hi], experts)
        return y_TD


def apply_tensor_parallel(model: nn.Module, rank: int, size: int, group: dist.ProcessGroup | None = None,
                          expert_parallel: bool = False, ep_group: dist.ProcessGroup | None = None,
                          keep_lm_head: bool = True) -> ShardLayout:
    """Shard `model` (a DeepseekForCausalLM, possibly on the meta device) in place for rank `rank` of `size`.

    Args:
        group: the tensor-parallel process group (None: the default group).
        expert_parallel: split the routed experts over the ranks instead of their width.
        ep_group: the group of the all-to-all (the mesh's EP group; by default `group`).
        keep_lm_head: False on ranks that never compute logits (the head is then dropped).
    Returns:
        The layout: which slice of which tensor this rank holds.
    """
    layout = ShardLayout(rank, size)
    if size == 1:
        return layout
    for name, module in list(model.named_modules()):
        if isinstance(module, MultiHeadLatentAttention):
            H = module.num_heads
            if H % size:
                raise ValueError(f"tensor_parallel_size={size} does not divide num_attention_heads ({H})")
            q = "q_proj" if module.q_lora_rank is None else "q_b_proj"
            for proj in (q, "kv_b_proj"):
                _column_parallel_(getattr(module, proj), rank, size, layout, f"{name}.{proj}")
            _row_parallel_(module.o_proj, rank, size, layout, f"{name}.o_proj")
            module.num_heads = H // size
            module.register_forward_hook(_all_reduce_hook(group))
        elif isinstance(module, DeepseekMoE):
            if module.shared_experts is not None:
                _mlp_parallel_(module.shared_experts, rank, size, layout, f"{name}.shared_experts")
            if expert_parallel:
                E = len(module.experts)
                if E % size:
                    raise ValueError(f"tensor_parallel_size={size} with expert parallelism does not divide "
                                     f"n_routed_experts ({E})")
                count = E // size
                module.experts = LocalExperts(module.experts, rank * count, count)
                module.dispatch = TokenSliceDispatch(AllToAllDispatch(ep_group or group or dist.group.WORLD,
                                                                      size), rank, size)
                layout.absent_prefixes += [f"{name}.experts.{e}." for e in range(E)
                                           if not rank * count <= e < (rank + 1) * count]
            else:
                for e, expert in enumerate(module.experts):
                    _mlp_parallel_(expert, rank, size, layout, f"{name}.experts.{e}")
            module.register_forward_hook(_all_reduce_hook(group))
        elif isinstance(module, MLP) and name.endswith(".mlp"):  # a dense layer's FFN
            _mlp_parallel_(module, rank, size, layout, name)
            module.register_forward_hook(_all_reduce_hook(group))
    if not keep_lm_head and not model.config.tie_word_embeddings:
        model.lm_head = None
        layout.absent_prefixes.append("lm_head.")
    return layout


@torch.no_grad()
def copy_into_shard_(targets: dict[str, torch.Tensor], layout: ShardLayout, name: str, full: torch.Tensor) -> bool:
    """Copy this rank's part of the single-device tensor `full` into the shard's tensor `name` (from
    `state_dict(keep_vars=True)`); False when the rank does not hold it."""
    dest = targets.get(name)
    if dest is None or not layout.owns(name):
        return False
    spec = layout.shard_of(name)
    dest.copy_(spec.take(full) if spec is not None else full)
    return True


_HEAD_PROJECTIONS = (".q_proj.", ".q_b_proj.", ".kv_b_proj.", ".o_proj.")


def resident_bytes(model: nn.Module) -> dict[str, int]:
    """Parameter bytes this rank holds, by kind.

    attention_heads: the per-head projections (q_proj / q_b_proj, kv_b_proj, o_proj), split over the ranks;
    attention_latent: the latent and query down-projections and their norms, replicated on every rank;
    routed_experts: split by width or, with expert parallelism, by expert; other: embeddings, norms, routers,
    dense and shared MLPs (split), the LM head (rank 0).
    """
    out = dict.fromkeys(("attention_heads", "attention_latent", "routed_experts", "other"), 0)
    for name, p in model.named_parameters():
        if ".self_attn." in name:
            kind = "attention_heads" if any(h in name for h in _HEAD_PROJECTIONS) else "attention_latent"
        else:
            kind = "routed_experts" if ".experts." in name else "other"
        out[kind] += p.numel() * p.element_size()
    return out


__all__ = ["TensorShard", "ShardLayout", "TokenSliceDispatch", "apply_tensor_parallel", "copy_into_shard_",
           "resident_bytes"]
