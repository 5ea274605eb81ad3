"""Forward-KL distillation: train the student on the teacher's whole next-token distribution, not one sample.

At every trained position t (labels[t] != -100: the target is an assistant token, as in SFT)

    KL_t(p_T || p_S) = sum_v p_T(v | x_<=t) * (log p_T(v | x_<=t) - log p_S(v | x_<=t)),

with both distributions softened by a temperature tau (Hinton et al.'s distillation; the loss is multiplied by
tau^2 so its gradient scale does not depend on tau). "Forward" KL puts the teacher's distribution first: the
student is pushed to cover every token the teacher gives mass to (mean-seeking), which is what imitating a
teacher on its own traces needs. The step's loss is the token mean over all trained positions of the step
(the same exact normalisation as `CausalLMLoss`), optionally plus `ce_weight` times the ordinary cross-entropy
on the sequence's own tokens, and `mtp_lambda` times the MTP loss on them when the student has an MTP module
(so that it drafts for speculative decoding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from r1forge.train.balance import add_aux_loss
from r1forge.train.loss import IGNORE_INDEX, Batch, CausalLMLoss, LossOutput


def forward_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor | None = None,
               temperature: float = 1.0) -> torch.Tensor:
    """Summed KL(p_teacher || p_student) over the positions where `mask` is true.

    Args:
        teacher_logits, student_logits: [..., V] logits at the same positions (float32 math inside).
        mask: [...] bool, True where the position counts (None: all).
        temperature: tau > 0; both distributions are softmax(logits / tau).

    Returns:
        a scalar: sum over counted positions of sum_v p_T (log p_T - log p_S). Not scaled by tau^2.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} differ: teacher and student need the same vocabulary")
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # [..., V]
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # [..., V]
    p_t = log_p_t.exp()
    # 0 * log 0 = 0: a token the teacher gives exactly zero mass (underflow) contributes nothing, not nan.
    per_position = torch.where(p_t > 0, p_t * (log_p_t - log_p_s), 0.0).sum(-1)  # [...]
    if mask is not None:
        per_position = per_position * mask.to(per_position.dtype)
    return per_position.sum()


class ForwardKLLoss:
    """A `TrainingLoss` for `r1forge.train.Trainer`: token-mean forward KL to a frozen teacher on trained positions.

    Args:
        teacher: the teacher (same vocabulary as the student), frozen and in eval mode here.
        temperature: tau (see the module docstring).
        ce_weight: weight of the next-token cross-entropy on the batch's own labels (0: pure distillation).
        mtp_lambda: weight of the student's MTP loss on the batch's labels (0, or no MTP module: none).
        ignore_index: the label of untrained positions.
    """

    def __init__(self, teacher: nn.Module, temperature: float = 1.0, ce_weight: float = 0.0,
                 ignore_index: int = IGNORE_INDEX, mtp_lambda: float = 0.0) -> None:
        if temperature <= 0:
            raise ValueError(f"kl.temperature must be > 0, got {temperature}")
        if ce_weight < 0:
            raise ValueError(f"kl.ce_weight must be >= 0, got {ce_weight}")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.ignore_index = ignore_index
        self.mtp = CausalLMLoss(mtp_lambda, ignore_index)  # its normalisers and MTP term, not its LM loss

    def normalizers(self, model: nn.Module, batches: list[Batch]) -> dict[str, float]:
        """Trained positions over the whole step (the token mean's denominator), and per MTP depth."""
        return self.mtp.normalizers(model, batches)

    def __call__(self, model: nn.Module, batch: Batch, norms: dict[str, float],
                 num_micro_batches: int = 1) -> LossOutput:
        input_ids, labels = batch["input_ids"], batch["labels"]
        positions = batch.get("position_ids")
        mask = labels != self.ignore_index  # [B, T]
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids, positions)[mask]  # [N, V] trained positions only
        hidden = model.hidden_states(input_ids, positions)  # [B, T, D] (through the root: FSDP sees the call)
        student_logits = model.lm_head(hidden)  # [B, T, V]
        picked = student_logits[mask]  # [N, V]
        denom = max(norms["lm"], 1.0)
        kl = forward_kl(teacher_logits, picked, temperature=self.temperature) * self.temperature**2 / denom
        total = kl
        metrics = {"loss": kl.detach(), "kl": kl.detach()}
        if self.ce_weight > 0:
            ce = F.cross_entropy(picked.float(), labels[mask], reduction="sum") / denom
            total = total + self.ce_weight * ce
            metrics["ce"] = ce.detach()
        if self.mtp.mtp_lambda > 0 and getattr(model, "num_mtp", 0):
            mtp = self.mtp.mtp_loss(model, hidden, input_ids, positions, labels, norms)
            total = total + self.mtp.mtp_lambda * mtp
            metrics["mtp_loss"] = mtp.detach()
        return LossOutput(add_aux_loss(model, total, metrics, num_micro_batches), metrics)
