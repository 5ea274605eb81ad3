"""The GRPO objective as tensor functions (DeepSeek-R1 eq. 1-3; docs/design.md section 7): group advantages, the
clipped surrogate with a k3 KL penalty, and the aggregation variants of GRPO, BNPO, Dr. GRPO and DAPO. The trainer
owns everything else.

Shapes: N completions (prompts x G, grouped contiguously: rows g*G .. g*G+G-1 share a prompt), L the padded
completion length; `mask` [N, L] is nonzero on real completion tokens. Conventions follow TRL's GRPOTrainer:
  1. the group std is the unbiased one (torch.std, Bessel-corrected), plus eps = 1e-4 in the denominator. TRL
     and verl both do this, so advantages (and logged numbers) match theirs; the paper does not say. For G = 2
     and rewards {0, 1} it gives A = +-0.707 where the biased std would give +-1.
  2. groups whose rewards are all equal get advantage exactly 0 (not 0/eps noise), and no NaN for G = 1.
  3. the ratio is exp(logprobs - old_logprobs) without clamping, as in TRL; padded positions are zeroed
     *before* exp, so garbage (even inf/NaN) in padding cannot reach the loss or the gradient.
  4. "dapo" and "bnpo" both normalise by the number of tokens in the tensors given; across micro-batches the
     caller weights each call by its share of the batch's tokens (TRL's "dapo" does that across processes).
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


def _groups(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if num_generations < 1 or rewards.numel() % num_generations:
        raise ValueError(f"num_generations={num_generations} must be >= 1 and divide the {rewards.numel()} rewards")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")
    return rewards.view(-1, num_generations)  # [groups, G]


def _zero_std(groups: torch.Tensor) -> torch.Tensor:
    """[groups] True where every reward of the group is the same (exactly: no isclose, no noise)."""
    return groups.amax(1) == groups.amin(1)


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean of its group) / (std + eps), the same for every token of completion i.

    Args:
        rewards: [N] total reward of each completion, groups of `num_generations` contiguous.
        scale_rewards: "group" divides by each group's std (the paper); "batch" by the std of all N rewards
            (the mean is still per group); "none" does not divide (Dr. GRPO: no difficulty bias).
        eps: added to the std, as TRL (1e-4).
    Returns:
        [N] advantages in rewards' float dtype; exactly 0 for groups whose rewards are all equal.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    groups = _groups(rewards if rewards.is_floating_point() else rewards.float(), num_generations)
    centered = groups - groups.mean(1, keepdim=True)  # [groups, G]
    if scale_rewards == "group":
        std = groups.std(1, keepdim=True) if num_generations > 1 else torch.zeros_like(groups[:, :1])
        centered = centered / (std + eps)
    elif scale_rewards == "batch":
        std = groups.std() if groups.numel() > 1 else groups.new_zeros(())
        centered = centered / (std + eps)
    return torch.where(_zero_std(groups)[:, None], torch.zeros_like(centered), centered).reshape(-1)


def zero_std_group_fraction(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Share of groups whose rewards are all equal (they teach nothing: zero advantage), as a 0-dim tensor."""
    return _zero_std(_groups(rewards, num_generations)).float().mean()


def dynamic_sampling_filter(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """DAPO dynamic sampling: [num_groups] bool, True for the groups to keep (rewards not all equal)."""
    return ~_zero_std(_groups(rewards, num_generations))


def per_token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi_theta || pi_ref) per token: exp(ref - lp) - (ref - lp) - 1 (>= 0, unbiased)."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (torch.where(mask, x, torch.zeros_like(x)).sum() / mask.sum().clamp(min=1)).detach()


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, *, ref_logprobs: torch.Tensor | None = None, beta: float = 0.0,
              epsilon_low: float = 0.2, epsilon_high: float = 0.2, loss_type: str = "grpo",
              max_completion_length: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped GRPO surrogate plus beta * k3 KL, to be minimised.

    Per token: -min(rho * A, clip(rho, 1 - epsilon_low, 1 + epsilon_high) * A) + beta * KL_t with
    rho = exp(logprobs - old_logprobs). Aggregation by `loss_type`:
      "grpo": mean over each sequence's tokens, then over sequences (the paper; longer outputs weigh less);
      "bnpo" / "dapo": sum over all tokens / number of tokens (token-level mean);
      "dr_grpo": sum over all tokens / (N * max_completion_length) (a constant; L when not given).

    Args:
        logprobs: [N, L] log pi_theta of the sampled tokens (with grad).
        old_logprobs: [N, L] of the sampling policy (no grad is taken through them); None = on-policy (the
            ratio is 1 and only its gradient matters).
        advantages: [N] (or [N, 1], or per token [N, L]).
        mask: [N, L] bool/float, nonzero on real completion tokens.
        ref_logprobs: [N, L] of the frozen reference; needed when beta > 0.
        epsilon_low, epsilon_high: clip range, any size >= 0 (R1 stage 1 used 10).
    Returns:
        (loss scalar, metrics of 0-dim detached tensors over masked tokens: clip_ratio/low (rho < 1 - eps_low
        with A < 0), clip_ratio/high (rho > 1 + eps_high with A > 0), clip_ratio/region (either), ratio_mean,
        and kl when ref_logprobs is given). No host sync.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logprobs (the frozen reference's log-probabilities)")
    if epsilon_low < 0 or epsilon_high < 0:
        raise ValueError(f"epsilon_low and epsilon_high must be >= 0, got {epsilon_low} and {epsilon_high}")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [N, L], got shape {tuple(logprobs.shape)}")
    N, L = logprobs.shape
    old = logprobs.detach() if old_logprobs is None else old_logprobs.detach()
    for name, t in (("old_logprobs", old), ("mask", mask), ("ref_logprobs", ref_logprobs)):
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"{name} must have the shape of logprobs {(N, L)}, got {tuple(t.shape)}")
    if advantages.shape in ((N,), (N, 1)):
        adv = advantages.reshape(N, 1)
    elif advantages.shape == (N, L):
        adv = advantages
    else:
        raise ValueError(f"advantages must be [N], [N, 1] or [N, L] with N={N}, L={L}, got {tuple(advantages.shape)}")
    adv = adv.detach().to(logprobs.dtype)
    m = mask != 0  # [N, L] bool
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)

    log_ratio = torch.where(m, logprobs - old.to(logprobs.dtype), zero)  # padding -> ratio 1, no gradient
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)  # [N, L]
    metrics: dict[str, torch.Tensor] = {}
    if ref_logprobs is not None:
        ref = torch.where(m, ref_logprobs.detach().to(logprobs.dtype), zero)
        kl = per_token_kl(torch.where(m, logprobs, zero), ref)  # exactly 0, without gradient, on padding
        if beta > 0:
            per_token = per_token + beta * kl
        metrics["kl"] = _masked_mean(kl, m)
    per_token = torch.where(m, per_token, zero)

    if loss_type == "grpo":
        loss = (per_token.sum(1) / m.sum(1).clamp(min=1)).mean()
    elif loss_type in ("bnpo", "dapo"):
        loss = per_token.sum() / m.sum().clamp(min=1)
    else:
        length = L if max_completion_length is None else max_completion_length
        if length <= 0:
            raise ValueError(f"max_completion_length must be > 0, got {length}")
        loss = per_token.sum() / (N * length)

    with torch.no_grad():
        low = (ratio < 1 - epsilon_low) & (adv < 0)
        high = (ratio > 1 + epsilon_high) & (adv > 0)
        metrics["clip_ratio/low"] = _masked_mean(low.to(logprobs.dtype), m)
        metrics["clip_ratio/high"] = _masked_mean(high.to(logprobs.dtype), m)
        metrics["clip_ratio/region"] = _masked_mean((low | high).to(logprobs.dtype), m)
        metrics["ratio_mean"] = _masked_mean(ratio, m)
    return loss, metrics
