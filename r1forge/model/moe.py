"""DeepSeekMoE (DeepSeek-V3 report, section 2.1.2; docs/design.md section 4): fine-grained routed experts, shared
experts, group-limited top-k routing.

y = sum_shared E_s(x) + sum_{i in topk} g_i E_i(x), g already scaled by routed_scaling_factor.

Routing and expert compute are separate seams: `Router` decides (ids, weights); a dispatcher runs the chosen
experts. `SortedDispatch` sorts token copies by expert and runs each expert over one contiguous slice (the
reference); `GroupedDispatch`, the default, runs all the slices with `torch._grouped_mm` where it can; an
expert-parallel all-to-all dispatcher implements the same `__call__` and replaces it.
Letters: T tokens, D width, E experts, K top-k, F expert FFN width.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from r1forge.config import ModelConfig
from r1forge.model.moe_static import fused_gate_up, grouped_gemm_supported, stack_expert_weights


class MLP(nn.Module):
    """SwiGLU FFN: down(silu(gate(x)) * up(x)). Used for dense layers, each expert and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the engine (eager): gate and up as one matmul over one fused weight; a compiled step traces the two
        # Linears (moving parameters is not traceable) and leaves the fusing to the compiler
        if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
            gate_up = fused_gate_up(self.gate_proj, self.up_proj)
            if gate_up is not None:
                gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
                return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Scores experts and picks top-k per token.

    `weight` [E, D] is the checkpoint's `mlp.gate.weight`; `e_score_correction_bias` [E] is a float32 buffer
    (not a parameter: the auxiliary-loss-free balancer moves it, the optimizer never does). The bias only
    steers *selection*; gate values come from the unbiased scores.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_experts = E = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group or 1
        self.topk_group = config.topk_group or 1
        self.scoring_func = config.scoring_func
        self.topk_method = config.topk_method
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size, dtype=torch.float32))
        bias = torch.zeros(E, dtype=torch.float32) if self.topk_method == "noaux_tc" else None
        self.register_buffer("e_score_correction_bias", bias, persistent=bias is not None)

    def scores(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Router scores s [T, E] in float32, also under autocast (which would run the matmul in bf16/fp16)."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
            return logits_TE.sigmoid() if self.scoring_func == "sigmoid" else logits_TE.softmax(dim=-1)

    def _group_mask(self, choice_TE: torch.Tensor, group_score: str) -> torch.Tensor:
        """Keep the topk_group best groups per token; mask the others' experts to -inf."""
        T = choice_TE.shape[0]
        grouped = choice_TE.view(T, self.n_group, -1)  # [T, G, E/G]
        if group_score == "top2":
            g_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)  # [T, G]
        else:
            g_scores = grouped.amax(dim=-1)
        keep = torch.zeros_like(g_scores, dtype=torch.bool)
        keep.scatter_(1, g_scores.topk(self.topk_group, dim=-1).indices, True)
        keep_TE = keep[:, :, None].expand(-1, -1, grouped.shape[-1]).reshape(T, -1)  # a group's verdict per expert
        return choice_TE.masked_fill(~keep_TE, float("-inf"))

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, D] -> (topk_ids [T, K] long, topk_weights [T, K] float32, scores [T, E] float32)."""
        s_TE = self.scores(x_TD)
        if self.topk_method == "noaux_tc":
            choice_TE = s_TE + self.e_score_correction_bias
            if self.n_group > 1:
                choice_TE = self._group_mask(choice_TE, "top2")
        elif self.topk_method == "group_limited_greedy" and self.n_group > 1:
            choice_TE = self._group_mask(s_TE, "max")
        else:
            choice_TE = s_TE
        topk_ids_TK = choice_TE.topk(self.top_k, dim=-1).indices
        topk_weights_TK = s_TE.gather(1, topk_ids_TK)
        if self.norm_topk_prob:
            topk_weights_TK = topk_weights_TK / (topk_weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_ids_TK, topk_weights_TK * self.routed_scaling_factor, s_TE


class ExpertDispatch(Protocol):
    """Runs the chosen experts and combines their outputs with the gate weights."""

    def __call__(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                 experts: nn.ModuleList) -> torch.Tensor: ...


def sort_copies(topk_ids_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order the T*K token copies by expert: (order [T*K], token_of_copy [T*K], counts [E] long).

    The sort is stable, so within an expert the copies keep token order (what makes dispatchers agree).
    """
    K = topk_ids_TK.shape[1]
    flat_ids = topk_ids_TK.reshape(-1)  # [T*K]
    order = flat_ids.argsort(stable=True)  # copies grouped by expert
    return order, order // K, torch.bincount(flat_ids, minlength=num_experts)


def run_sorted(experts: nn.Module, x_sorted: torch.Tensor, counts: list[int], first: int = 0,
               run_empty: bool = False) -> torch.Tensor:
    """Expert first + e over its contiguous slice of `x_sorted` [N, D] (counts[e] rows each) -> [N, D].

    `run_empty` also runs experts with no rows, so their parameters get (zero) gradients: a sharded expert
    must take part in every gradient reduction whether or not its tokens came this step.
    """
    # split + cat: autograd's backward of each is one pass over [N, D] (slice assignment into one buffer would
    # give every expert's backward a zero-filled [N, D] of its own)
    pieces = x_sorted.split(counts)
    outs = [experts[first + e](piece) if n or run_empty else piece for e, (piece, n) in enumerate(zip(pieces, counts))]
    return torch.cat(outs).to(x_sorted.dtype) if outs else x_sorted  # x's dtype, as under autocast before


def combine_copies(x_TD: torch.Tensor, out_sorted: torch.Tensor, order: torch.Tensor, token_of_copy: torch.Tensor,
                   topk_weights_TK: torch.Tensor) -> torch.Tensor:
    """y_t = sum over t's copies of g * E(x_t), summed in float32 -> [T, D] in x's dtype."""
    weights = topk_weights_TK.reshape(-1).index_select(0, order).unsqueeze(-1)  # [T*K, 1] float32
    y_TD = torch.zeros_like(x_TD, dtype=torch.float32)
    y_TD.index_add_(0, token_of_copy, out_sorted.float() * weights)
    return y_TD.to(x_TD.dtype)


class SortedDispatch:
    """Sort the T*K token copies by expert; each expert runs once over its contiguous slice.

    One host sync per layer (the per-expert counts) and no compute for unchosen experts.
    """

    def __call__(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                 experts: nn.ModuleList) -> torch.Tensor:
        order, token_of_copy, counts = sort_copies(topk_ids_TK, len(experts))
        out_sorted = run_sorted(experts, x_TD.index_select(0, token_of_copy), counts.tolist())  # [T*K, D]
        return combine_copies(x_TD, out_sorted, order, token_of_copy, topk_weights_TK)


def grouped_dispatch_supported(x_TD: torch.Tensor, experts: nn.ModuleList) -> bool:
    """Whether `GroupedDispatch` runs `torch._grouped_mm` for this call: plain SwiGLU experts in x's dtype, no
    autocast, and a device / dtype / width the kernel takes (`grouped_gemm_supported`); with gradients, the CPU
    only (the backward below is written for its kernel's layouts)."""
    first = experts[0] if len(experts) else None
    if not isinstance(first, MLP):
        return False
    w = first.gate_proj.weight
    if w.dtype != x_TD.dtype or w.device != x_TD.device or torch.is_autocast_enabled(x_TD.device.type):
        return False
    if torch.is_grad_enabled() and x_TD.device.type != "cpu":
        return False
    return grouped_gemm_supported(x_TD.device, x_TD.dtype, w.shape[1], w.shape[0])


class _GroupedExperts(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)) per expert slice of x_sorted [N, D], with two grouped GEMMs over weights stacked
    for the call. The stack is a temporary: the backward saves the experts' own weights and stacks them again, so
    a layer keeps no second copy of its experts alive between forward and backward. Experts with no rows get no
    gradient (None, as SortedDispatch leaves them), so AdamW skips them as before."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, offs: torch.Tensor, counts: list[int],  # noqa: ANN001, ANN205
                *weights: torch.Tensor) -> torch.Tensor:
        w13, w2 = _stack(weights)
        h = torch._grouped_mm(x, w13.transpose(1, 2), offs=offs)  # [N, 2F]
        gate, up = h.chunk(2, dim=-1)
        ctx.save_for_backward(x, offs, h, *weights)
        ctx.counts = counts
        return torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)  # [N, D]

    @staticmethod
    def backward(ctx, d_out: torch.Tensor):  # noqa: ANN001, ANN205
        x, offs, h, *weights = ctx.saved_tensors
        w13, w2 = _stack(weights)
        gate, up = h.chunk(2, dim=-1)
        silu = F.silu(gate)
        d_out = d_out.contiguous()
        d_act = torch._grouped_mm(d_out, w2, offs=offs)  # [N, F]
        d_w2 = torch._grouped_mm(d_out.t(), silu * up, offs=offs)  # [E, D, F]
        d_h = torch.cat([torch.ops.aten.silu_backward(d_act * up, gate), d_act * silu], dim=-1)  # [N, 2F]
        d_x = torch._grouped_mm(d_h, w13, offs=offs)  # [N, D]
        d_w13 = torch._grouped_mm(d_h.t(), x, offs=offs)  # [E, 2F, D]
        ffn = weights[0].shape[0]
        grads: list[torch.Tensor | None] = []
        for e, n in enumerate(ctx.counts):
            grads += [d_w13[e, :ffn], d_w13[e, ffn:], d_w2[e]] if n else [None, None, None]
        return d_x, None, None, *grads


def _stack(weights: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_0, up_0, down_0, gate_1, ...) -> w13 [E, 2F, D], w2 [E, D, F]."""
    return torch.cat([torch.stack(weights[0::3]), torch.stack(weights[1::3])], dim=1), torch.stack(weights[2::3])


class GroupedDispatch:
    """SortedDispatch's order (copies sorted by expert, combined in float32 by `combine_copies`), with every
    expert's slice run by one `torch._grouped_mm` per projection instead of a Python loop of three Linears each.

    Under inference mode (the engine) the experts' weights are stacked once, in place (`stack_expert_weights`:
    the parameters become views of the stack); otherwise they are stacked for the call and not kept
    (`_GroupedExperts`), which is safe for sharded or wrapped parameters. When gradients are recorded the
    reference loop runs unless `with_grad`: on the CPU the grouped forward + backward measured no faster than the
    loop's (1.0-1.3x its time at 1024-6400 tokens of the `small` preset), while the forward alone is about 20%
    faster at decode sizes (bench/moe_dispatch.py). Calls the kernel does not take
    (`grouped_dispatch_supported`) go to SortedDispatch, the readable reference the tests hold this to.
    """

    def __init__(self, with_grad: bool = False) -> None:
        self.with_grad = with_grad
        self.reference = SortedDispatch()

    def __call__(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                 experts: nn.ModuleList) -> torch.Tensor:
        if not grouped_dispatch_supported(x_TD, experts):
            return self.reference(x_TD, topk_ids_TK, topk_weights_TK, experts)
        if not self.with_grad and torch.is_grad_enabled() and (
                x_TD.requires_grad or experts[0].gate_proj.weight.requires_grad):
            return self.reference(x_TD, topk_ids_TK, topk_weights_TK, experts)
        order, token_of_copy, counts = sort_copies(topk_ids_TK, len(experts))
        offs = counts.cumsum(0, dtype=torch.int32)  # end of each expert's slice
        x_sorted = x_TD.index_select(0, token_of_copy)  # [T*K, D]
        if torch.is_inference_mode_enabled():
            w13, w2 = stack_expert_weights(experts)
            gate, up = torch._grouped_mm(x_sorted, w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)
            out_sorted = torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)
        else:
            weights = [w for e in experts for w in (e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight)]
            out_sorted = _GroupedExperts.apply(x_sorted, offs, counts.tolist(), *weights)
        return combine_copies(x_TD, out_sorted, order, token_of_copy, topk_weights_TK)


class DeepseekMoE(nn.Module):
    """Shared experts + routed experts. Records per-expert token counts for load balancing and stats."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.gate = Router(config)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.n_routed_experts)
        )
        n_shared = config.n_shared_experts or 0
        self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * n_shared) if n_shared else None
        self.dispatch: ExpertDispatch = GroupedDispatch()  # SortedDispatch() is the reference loop
        self.aux_loss_alpha = 0.0  # sequence-wise balance loss weight (DeepSeek-V3 eq. 17); 0 disables it
        self.record_load = True
        self.tokens_per_expert: torch.Tensor | None = None  # [E] of the last forward, for the bias update
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., D]. With a leading batch axis ([B, T, D]) the aux loss is sequence-wise."""
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        topk_ids_TK, topk_weights_TK, s_TE = self.gate(x_TD)
        y = self.dispatch(x_TD, topk_ids_TK, topk_weights_TK, self.experts).view(shape)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        if self.record_load:
            self.tokens_per_expert = torch.bincount(topk_ids_TK.reshape(-1), minlength=self.gate.num_experts).detach()
        if self.training and self.aux_loss_alpha > 0:
            self.aux_loss = self._sequence_aux_loss(topk_ids_TK, s_TE, shape)
        else:
            self.aux_loss = None
        return y

    def _sequence_aux_loss(self, topk_ids_TK: torch.Tensor, s_TE: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """alpha * sum_i f_i P_i per sequence, averaged (DeepSeek-V3 eq. 17-20).

        f_i = E / (K T) * (tokens of the sequence routed to i); P_i = mean over the sequence of s_i / sum_j s_j.
        """
        E, K = self.gate.num_experts, self.gate.top_k
        B = shape[0] if len(shape) == 3 else 1
        T = topk_ids_TK.shape[0] // B
        chosen = torch.zeros(B * T, E, device=s_TE.device).scatter_(1, topk_ids_TK, 1.0).view(B, T, E)
        f_BE = chosen.sum(1) * (E / (K * T))
        p_BE = (s_TE / s_TE.sum(-1, keepdim=True)).view(B, T, E).mean(1)
        return self.aux_loss_alpha * (f_BE * p_BE).sum(-1).mean()
