"""Graph-safe MoE dispatch: no host sync and shapes fixed by the token count, so a decode step can be captured
as a CUDA graph or compiled whole.

`SortedDispatch` (moe.py) reads the per-expert counts on the host to slice the sorted tokens; a CUDA graph
cannot replay that. The two dispatchers here keep the counts on the device:

- `GroupedGemmDispatch`: tokens sorted by expert, one `torch._grouped_mm` per projection over every expert's
  slice, with the slice boundaries (`offs`) a device tensor. Reads each chosen expert's weights once.
- `DenseDispatch`: every expert over every token, gates zero where not chosen. Reads all experts' weights,
  which is what a decode batch of more than E/K tokens does anyway; it needs nothing but `bmm`, so it serves
  where grouped GEMM does not (dtypes and GPUs the grouped kernel lacks).

Both need the experts' weights stacked ([E, 2F, D] gate+up, [E, D, F] down). `stack_expert_weights` moves
each expert's parameters into views of one stacked tensor (same Parameter objects, so optimizers and
state_dict see no change) instead of holding a second copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def stack_expert_weights(experts: nn.ModuleList) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13 [E, 2F, D], w2 [E, D, F]) whose slices *are* the experts' gate/up/down weights.

    Stacks once and re-points every expert parameter's storage at its slice; later calls return the stack as
    long as the parameters still live there (a `.to()` or a load that replaced them triggers a re-stack).
    """
    stacked = getattr(experts, "_stacked", None)
    first = experts[0]
    if stacked is not None and (torch.compiler.is_compiling()  # compiled steps are built after stacking
                                or (first.gate_proj.weight.data_ptr() == stacked[0].data_ptr()
                                    and experts[-1].down_proj.weight.data_ptr() == stacked[1][-1].data_ptr())):
        return stacked
    # Stacking must not create inference tensors (a trainer sharing the model backpropagates through them).
    with torch.inference_mode(False), torch.no_grad():
        w13 = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in experts])  # [E, 2F, D]
        w2 = torch.stack([e.down_proj.weight for e in experts])  # [E, D, F]
        ffn = first.gate_proj.weight.shape[0]
        for i, e in enumerate(experts):
            e.gate_proj.weight.data = w13[i, :ffn]
            e.up_proj.weight.data = w13[i, ffn:]
            e.down_proj.weight.data = w2[i]
    experts._stacked = (w13, w2)
    return w13, w2


def fused_gate_up(gate: nn.Linear, up: nn.Linear) -> torch.Tensor | None:
    """One [2F, D] weight whose rows *are* `gate`'s then `up`'s (so gate and up run as one matmul), or None for
    weights that cannot share one buffer (sharded DTensors, differing dtypes or devices).

    Free when the two already lie end to end in one buffer (an expert after `stack_expert_weights`, or a second
    call); otherwise both parameters are moved, once, into views of a new buffer, as `stack_expert_weights`
    does (the same Parameter objects: optimizers and state_dict see no change).
    """
    g, u = gate.weight, up.weight
    if type(g) is not nn.Parameter or type(u) is not nn.Parameter or g.dtype != u.dtype or g.device != u.device \
            or g.shape[1:] != u.shape[1:] or not (g.is_contiguous() and u.is_contiguous()):
        return None
    rows = g.shape[0] + u.shape[0]
    if g.untyped_storage().data_ptr() == u.untyped_storage().data_ptr() \
            and u.data_ptr() == g.data_ptr() + g.numel() * g.element_size():
        return g.detach().as_strided((rows, *g.shape[1:]), g.stride())
    with torch.inference_mode(False), torch.no_grad():  # no inference tensors: a trainer may share the model
        both = torch.cat([g, u])
        g.data, u.data = both[: g.shape[0]], both[g.shape[0] :]
    return both


class GroupedGemmDispatch:
    """Sort the T*K token copies by expert; run all experts with one grouped GEMM per projection."""

    def __call__(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                 experts: nn.ModuleList) -> torch.Tensor:
        w13, w2 = stack_expert_weights(experts)
        T, K = topk_ids_TK.shape
        flat_ids = topk_ids_TK.reshape(-1)
        order = flat_ids.argsort(stable=True)
        counts = torch.zeros(len(experts), dtype=torch.int32, device=x_TD.device)
        counts.index_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int32))
        offs = counts.cumsum(0, dtype=torch.int32)  # end of each expert's slice, on the device
        x_sorted = x_TD[order // K]  # [T*K, D]
        gate_up = torch._grouped_mm(x_sorted, w13.transpose(1, 2), offs=offs)  # [T*K, 2F]
        gate, up = gate_up.chunk(2, dim=-1)
        out_sorted = torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)  # [T*K, D]
        out = torch.empty_like(out_sorted)
        out[order] = out_sorted  # back to (token, k) order
        # sum_k g_k E_k(x), accumulated in float32 as SortedDispatch does
        return (out.view(T, K, -1).float() * topk_weights_TK.unsqueeze(-1)).sum(dim=1).to(x_TD.dtype)


class DenseDispatch:
    """Every expert over every token; the gate is zero for experts a token did not choose."""

    def __call__(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                 experts: nn.ModuleList) -> torch.Tensor:
        w13, w2 = stack_expert_weights(experts)
        E, T = len(experts), x_TD.shape[0]
        gate_up = torch.bmm(x_TD.expand(E, -1, -1), w13.transpose(1, 2))  # [E, T, 2F]
        gate, up = gate_up.chunk(2, dim=-1)
        out_ETD = torch.bmm(F.silu(gate) * up, w2.transpose(1, 2))  # [E, T, D]
        gates_TE = torch.zeros(T, E, dtype=torch.float32, device=x_TD.device).scatter(1, topk_ids_TK, topk_weights_TK)
        return torch.einsum("te,etd->td", gates_TE, out_ETD.float()).to(x_TD.dtype)


def grouped_gemm_supported(device: torch.device, dtype: torch.dtype, hidden_size: int, ffn_size: int) -> bool:
    """Whether `torch._grouped_mm` runs here without a host sync: its CPU fallback (any float dtype), or the
    CUDA kernel (bfloat16 on compute capability 9.x / 10.x). Row strides must be multiples of 16 bytes. (Under
    torch.compile it traces for bfloat16 only, which is why the compiled decode step leaves the MoE eager.)"""
    if not hasattr(torch, "_grouped_mm"):
        return False
    element = torch.empty((), dtype=dtype).element_size()
    if (hidden_size * element) % 16 or (ffn_size * element) % 16:
        return False
    if device.type == "cpu":
        return True
    # The CUTLASS kernel is built for sm90 / sm100; elsewhere _grouped_mm falls back to a loop that reads offs
    # on the host.
    return device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] in (9, 10)


def graph_safe_dispatch(device: torch.device, dtype: torch.dtype, hidden_size: int,
                        ffn_size: int) -> GroupedGemmDispatch | DenseDispatch:
    """The best dispatcher that a captured graph can replay on this device and dtype."""
    if grouped_gemm_supported(device, dtype, hidden_size, ffn_size):
        return GroupedGemmDispatch()
    return DenseDispatch()
