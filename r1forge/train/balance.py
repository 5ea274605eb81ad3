"""Auxiliary-loss-free MoE load balancing (DeepSeek-V3 report section 2.1.2; docs/design.md section 4.3) and
expert-load statistics.

After each optimizer step, for every MoE layer and expert i:  b_i += gamma * sign(mean_load - load_i),
where load_i is the number of tokens routed to expert i during the step (summed over its micro-batches) and
b is the router's `e_score_correction_bias`. The bias only steers which experts are selected, never the gate
values, and it is a buffer, so the optimizer never sees it.

    tracker = ExpertLoadTracker(model)
    for micro_batch in step:
        loss(model, micro_batch).backward()
        tracker.collect()                      # after each forward, before the next one
    optimizer.step()
    update_router_biases(model, gamma, tracker.step_loads())
    tracker.end_step()                         # the step's loads join the logging interval

`collect` reads each layer's `tokens_per_expert` (the counts of its last forward) instead of hooking the
forward, so activation checkpointing, which runs the forward again in backward, does not count twice.
"""

from __future__ import annotations

import torch
from torch import nn

from r1forge.model.moe import DeepseekMoE


def moe_layers(model: nn.Module) -> list[DeepseekMoE]:
    """The model's MoE layers in module order (MTP modules' MoE layers last)."""
    if hasattr(model, "moe_layers"):
        return list(model.moe_layers())
    return [m for m in model.modules() if isinstance(m, DeepseekMoE)]


class ExpertLoadTracker:
    """Sums tokens per expert over a step's micro-batches (for the bias update) and over a logging interval.

    Args:
        model: a model with DeepseekMoE layers (none is fine: then there is nothing to track).
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = moe_layers(model)
        self._step: list[torch.Tensor] | None = None
        self._interval: list[torch.Tensor] | None = None

    def collect(self) -> None:
        """Add every layer's `tokens_per_expert` from its most recent forward."""
        counts = []
        for i, layer in enumerate(self.layers):
            if layer.tokens_per_expert is None:
                raise RuntimeError(f"MoE layer {i} has no tokens_per_expert: run a forward with record_load on first")
            counts.append(layer.tokens_per_expert.detach().to(torch.float64))
        if self._step is None:
            self._step = [c.clone() for c in counts]
        else:
            for acc, c in zip(self._step, counts, strict=True):
                acc += c

    def zero_step(self) -> None:
        """Start the step's sums at zero if nothing was collected: a data-parallel rank without tokens of its own
        this step still joins the reduction of the loads."""
        if self._step is None:
            self._step = [torch.zeros(layer.gate.num_experts, dtype=torch.float64) for layer in self.layers]

    def step_loads(self) -> list[torch.Tensor] | None:
        """Tokens per expert [E] for each layer, summed over the micro-batches collected since `end_step`."""
        return self._step

    def end_step(self, applied: bool = True) -> None:
        """Close the step: its loads join the logging interval (when applied) and the step sum restarts."""
        if applied and self._step is not None:
            if self._interval is None:
                self._interval = [c.clone() for c in self._step]
            else:
                for acc, c in zip(self._interval, self._step, strict=True):
                    acc += c
        self._step = None

    def state_dict(self) -> dict[str, list[torch.Tensor] | None]:
        """The logging interval's loads, for a checkpoint taken mid-interval."""
        return {"interval": [t.cpu() for t in self._interval] if self._interval is not None else None}

    def load_state_dict(self, state: dict[str, list[torch.Tensor] | None]) -> None:
        loads = state.get("interval")
        self._interval = [t.to(torch.float64) for t in loads] if loads is not None else None

    def pop_interval(self) -> list[torch.Tensor] | None:
        """Loads summed over the steps since the last call (None when no step was applied), then reset."""
        out, self._interval = self._interval, None
        return out


@torch.no_grad()
def update_router_biases(model: nn.Module, gamma: float,
                         loads: list[torch.Tensor] | None = None) -> int:
    """b_i += gamma * sign(mean_load - load_i) for every MoE layer whose router has a correction bias.

    Args:
        model: the model whose routers to move.
        gamma: the bias update speed (DeepSeek-V3: 1e-3).
        loads: tokens per expert [E] per MoE layer, in `moe_layers(model)` order, summed over the step;
            None uses each layer's last forward (right only when the step was one micro-batch).
    Returns:
        How many layers were updated (routers without `e_score_correction_bias`, e.g. V2's, are skipped).
    """
    layers = moe_layers(model)
    if loads is None:
        loads = [layer.tokens_per_expert for layer in layers]
    if len(loads) != len(layers):
        raise ValueError(f"loads has {len(loads)} entries but the model has {len(layers)} MoE layers")
    updated = 0
    for layer, load in zip(layers, loads, strict=True):
        bias = layer.gate.e_score_correction_bias
        if bias is None or load is None:
            continue
        load = load.to(device=bias.device, dtype=torch.float64)
        bias += (gamma * torch.sign(load.mean() - load)).to(bias.dtype)
        updated += 1
    return updated


def load_ratios(loads: list[torch.Tensor]) -> list[float]:
    """max / mean tokens per expert for each layer: 1.0 is perfect balance, E / K is total collapse."""
    out = []
    for load in loads:
        load = load.double()
        mean = load.mean().item()
        out.append(load.max().item() / mean if mean > 0 else 1.0)
    return out


def load_fractions(loads: list[torch.Tensor], digits: int = 4) -> list[list[float]]:
    """Each expert's load relative to its layer's mean (1.0 = its fair share), rounded for logging."""
    out = []
    for load in loads:
        load = load.double()
        mean = load.mean().clamp_min(1e-12)
        out.append([round(v, digits) for v in (load / mean).tolist()])
    return out


def set_aux_loss_alpha(model: nn.Module, alpha: float) -> None:
    """Turn the optional sequence-wise balance loss on (alpha > 0) or off in every MoE layer."""
    for layer in moe_layers(model):
        layer.aux_loss_alpha = alpha


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the MoE layers' sequence-wise balance losses from the last forward (None when all are off)."""
    losses = [layer.aux_loss for layer in moe_layers(model) if layer.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


def add_aux_loss(model: nn.Module, total: torch.Tensor, metrics: dict[str, torch.Tensor],
                 num_micro_batches: int) -> torch.Tensor:
    """`total` plus the balance loss of the last forward, split over the step's micro-batches (each adds its
    share), recorded as metrics["aux_loss"]; `total` unchanged when the loss is off."""
    balance = aux_loss(model)
    if balance is None:
        return total
    balance = balance / num_micro_batches
    metrics["aux_loss"] = balance.detach()
    return total + balance
