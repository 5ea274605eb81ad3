"""The acceptance rule of speculative sampling (Leviathan et al. 2023; Chen et al. 2023), one sequence at a time.

Drafts d_1..d_k were sampled from the drafter's distributions q_1..q_k; the target model's distributions
p_1..p_{k+1} come from one forward over the k + 1 positions. Draft j is accepted with probability
min(1, p_j(d_j) / q_j(d_j)); at the first rejection the replacement is drawn from norm(max(0, p_j - q_j)),
and when every draft is accepted a bonus token is drawn from p_{k+1}. Each emitted token is then distributed
exactly as the target model alone would have sampled it: speculation changes the speed, never the output
distribution. Greedy decoding is the limit where p and q are one-hot: accept iff the draft is the argmax.
"""

from __future__ import annotations

import torch

from r1forge.engine.sampler import draw_tokens


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from probs [V] (need not be normalised), drawn as the sampler draws: one uniform from the
    request's generator, then the inverse of the cumulative distribution."""
    return int(draw_tokens(probs[None], [generator])[0])


def greedy_accept(draft_token_ids: list[int], target_argmax: list[int]) -> list[int]:
    """Accepted drafts then the target's own token: drafts agree with the argmax up to the first miss.

    target_argmax has k + 1 entries (one per verified position, the last after every draft).
    """
    out = []
    for draft, target in zip(draft_token_ids, target_argmax):
        if draft != target:
            break
        out.append(draft)
    out.append(target_argmax[len(out)])
    return out


def rejection_sample(draft_token_ids: list[int], draft_probs: torch.Tensor, target_probs: torch.Tensor,
                     generator: torch.Generator | None = None) -> list[int]:
    """Accepted drafts, then the correction (at a rejection) or the bonus token: 1 to k + 1 tokens.

    Args:
        draft_token_ids: the k drafts, d_j sampled from draft_probs[j].
        draft_probs: q [k, V], the distributions the drafts were sampled from.
        target_probs: p [k + 1, V], the target's sampling distributions at the k + 1 verified positions.
        generator: the request's seeded generator (or None: torch's global one); k uniforms are drawn first,
            then one token, so a seed gives the same result however many drafts are accepted.
    """
    k = len(draft_token_ids)
    idx = torch.tensor(draft_token_ids, device=target_probs.device)
    rows = torch.arange(k, device=target_probs.device)
    p_d = target_probs[rows, idx]  # [k]
    q_d = draft_probs[rows, idx]  # [k], > 0: each draft was sampled from q
    u = torch.rand(k, generator=generator, device=target_probs.device)
    accepted = (u * q_d < p_d).tolist()  # u < p/q without dividing by a tiny q
    out = []
    for j in range(k):
        if not accepted[j]:
            residual = (target_probs[j] - draft_probs[j]).clamp_min(0)  # norm(max(0, p - q))
            # p <= q everywhere only if p == q, where nothing is ever rejected; guard against rounding.
            out.append(draw(residual if float(residual.sum()) > 0 else target_probs[j], generator))
            return out
        out.append(draft_token_ids[j])
    out.append(draw(target_probs[k], generator))
    return out
