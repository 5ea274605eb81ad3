"""The training objective: next-token cross-entropy, the MTP loss, the optional MoE balance loss.

Labels arrive shifted (labels[t] is the target after input_ids[t], -100 where nothing is trained), as the
datasets of `r1forge.data` produce them. With gradient accumulation every micro-batch's summed cross-entropy
is divided by the target count of the *whole step*, so the step's loss is the exact token mean whatever the
micro-batch split (a padded SFT micro-batch with few assistant tokens weighs only what its tokens weigh).

MTP (DeepSeek-V3 eq. 24-25; docs/design.md section 5): depth k predicts token i + k + 1 from position i, i.e. target
labels[i + k]; a target counts only where labels[i .. i + k] are all trained, so no prediction reaches across a
document boundary or out of an assistant span. L_MTP = lambda / D * sum_k L_k.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from r1forge.train.balance import add_aux_loss

IGNORE_INDEX = -100
Batch = dict[str, torch.Tensor]


def mtp_labels(labels: torch.Tensor, depth: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Targets of MTP depth `depth`: labels [B, T] -> [B, T - depth], ignore_index where not trainable."""
    T = labels.shape[1]
    valid = torch.ones_like(labels[:, : T - depth], dtype=torch.bool)
    for j in range(depth + 1):
        valid &= labels[:, j : T - depth + j] != ignore_index
    return labels[:, depth:].masked_fill(~valid, ignore_index)


@dataclass
class LossOutput:
    """`loss` is what backward() sees; `metrics` are detached parts, each normalised for the whole step
    (so summing them over the step's micro-batches gives the step's value)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class TrainingLoss(Protocol):
    """What the Trainer calls: step-wide normalisers first, then one call per micro-batch (distillation and
    other objectives implement the same two methods)."""

    def normalizers(self, model: nn.Module, batches: list[Batch]) -> dict[str, float]: ...

    def __call__(self, model: nn.Module, batch: Batch, norms: dict[str, float],
                 num_micro_batches: int = 1) -> LossOutput: ...


class CausalLMLoss:
    """Next-token CE (+ lambda * MTP) (+ the MoE layers' sequence-wise aux loss when enabled).

    Args:
        mtp_lambda: weight of the MTP loss; 0 skips the MTP forward entirely.
        ignore_index: the label of untrained positions.
    """

    def __init__(self, mtp_lambda: float = 0.0, ignore_index: int = IGNORE_INDEX) -> None:
        self.mtp_lambda = mtp_lambda
        self.ignore_index = ignore_index

    def _mtp_depths(self, model: nn.Module) -> int:
        return int(getattr(model, "num_mtp", 0)) if self.mtp_lambda > 0 else 0

    def normalizers(self, model: nn.Module, batches: list[Batch]) -> dict[str, float]:
        """Target counts of the whole step: "lm" and, per MTP depth k, "mtp_k"."""
        out = {"lm": float(sum(int((b["labels"] != self.ignore_index).sum()) for b in batches))}
        for k in range(1, self._mtp_depths(model) + 1):
            out[f"mtp_{k}"] = float(sum(int((mtp_labels(b["labels"], k, self.ignore_index)
                                             != self.ignore_index).sum()) for b in batches))
        return out

    def _ce_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=self.ignore_index,
                               reduction="sum")

    def __call__(self, model: nn.Module, batch: Batch, norms: dict[str, float],
                 num_micro_batches: int = 1) -> LossOutput:
        """Loss of one micro-batch; `norms` from `normalizers` over the whole step's micro-batches."""
        input_ids, labels = batch["input_ids"], batch["labels"]
        positions = batch.get("position_ids")
        hidden = model.hidden_states(input_ids, positions)  # [B, T, D]
        lm = self._ce_sum(model.lm_head(hidden), labels) / max(norms["lm"], 1.0)
        total = lm
        metrics = {"loss": lm.detach()}
        depths = self._mtp_depths(model)
        if depths:
            per_depth = []
            for k, logits in enumerate(model.mtp_logits(hidden, input_ids, positions), start=1):  # [B, T-k, V]
                target = mtp_labels(labels, k, self.ignore_index)
                per_depth.append(self._ce_sum(logits, target) / max(norms[f"mtp_{k}"], 1.0))
            mtp = torch.stack(per_depth).sum() / depths
            total = total + self.mtp_lambda * mtp
            metrics["mtp_loss"] = mtp.detach()
        return LossOutput(add_aux_loss(model, total, metrics, num_micro_batches), metrics)


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: list[Batch],
                  autocast: Callable[[], AbstractContextManager] = nullcontext,
                  ignore_index: int = IGNORE_INDEX) -> float:
    """Token-mean next-token cross-entropy over `batches` (eval mode, no gradient), in nats.

    `autocast` makes a fresh context per forward (e.g. bf16 autocast on CUDA).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                logits = model(batch["input_ids"], batch.get("position_ids"))
            total += F.cross_entropy(logits.flatten(0, -2).float(), batch["labels"].flatten(),
                                     ignore_index=ignore_index, reduction="sum").item()
            count += int((batch["labels"] != ignore_index).sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)
