"""Speculative decoding with the model's own MTP module: draft k tokens, verify them in one forward, losslessly.

DeepSeek-V3 (section 5.4.3) serves with its multi-token-prediction module as the drafter. Per engine step:

1. **Verify** (`verify`): a sequence carrying drafts d_1..d_k was scheduled for k + 1 tokens [t, d_1..d_k]
   and the main model computed them in the step's one batched forward, beside ordinary decodes and prefills.
   The target distributions at those k + 1 positions accept a prefix of the drafts and give one more token
   (`rejection_sampler`); the accepted latents stay in the paged cache, the rejected positions are rolled
   back (`num_computed_tokens` rewound, trailing blocks freed) and only accepted tokens are hashed for reuse.
2. **Draft** (`draft`): the MTP module's attention has its own latent cache (one pool tensor, the main
   model's block tables). For every position i whose main hidden state h_i this step produced, and whose
   next token t_{i+1} is now known, MTP computes h'_i = Block(W_eh [RMSNorm(Emb(t_{i+1})); RMSNorm(h_i)])
   (V3 eq. 21-23), writing its latent; the newest position's h' predicts d_1 through the shared head. For
   k > 1 the module is applied again to (h', Emb(d_1)) at the next position, and so on (vLLM's recursion for
   V3's single MTP layer; a checkpoint's further MTP modules are not used). Drafts are sampled from q (the
   draft logits under the request's temperature / top-k / top-p / min-p), argmax when greedy.

Where speculation is not exact or does not pay, a sequence decodes plainly, decided per step: penalties
(they depend on the tokens being verified), a pending `min_tokens`, no room left under `max_tokens` or the
context, and steps with more than `disable_by_batch_size` running sequences. The MTP cache of a block reused
from the prefix cache or skipped by such a step keeps what was there; that can only lower acceptance, since
every emitted token is the target's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1forge.engine.block_manager import BlockManager
from r1forge.engine.config import EngineConfig
from r1forge.engine.model_runner import ModelRunner
from r1forge.engine.rejection_sampler import draw, greedy_accept, rejection_sample
from r1forge.engine.sampler import filter_logits
from r1forge.engine.sampling_params import SamplingParams
from r1forge.engine.sequence import Sequence
from r1forge.model import AttentionMetadata, DeepseekForCausalLM


def mtp_cache_bytes_per_token(model: DeepseekForCausalLM, dtype: torch.dtype) -> int:
    """The drafter's latent row per token: one MTP layer's kv_lora_rank + qk_rope_head_dim."""
    return model.config.latent_dim * torch.empty((), dtype=dtype).element_size()


def check_speculative_model(model: DeepseekForCausalLM, source: str = "the model") -> None:
    """A clear error when the model cannot draft: it was built or loaded without its MTP module."""
    if model.num_mtp == 0:
        raise ValueError(
            f"speculative_config method 'mtp' needs the model's MTP module, but {source} has none "
            f"(num_nextn_predict_layers={model.config.num_nextn_predict_layers}; train or load it with MTP)")


def sampling_distributions(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row: the logprobs the engine reports (temperature-scaled, unfiltered, as `sample`) and the
    distribution it samples from (temperature, then top-k / top-p / min-p). logits [M, V] -> two [M, V];
    the second is None when every row is greedy (nothing is sampled)."""
    temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=logits.device)
    scaled = logits.float() / temps[:, None]
    logprobs = scaled.log_softmax(dim=-1)
    if all(p.greedy for p in params):
        return logprobs, None
    if not any(p.top_k or p.top_p < 1 or p.min_p > 0 for p in params):
        return logprobs, logprobs.exp()  # no filter: the sort in filter_logits would change nothing
    filtered = filter_logits(
        scaled,
        torch.tensor([p.top_k for p in params], device=logits.device),
        torch.tensor([p.top_p for p in params], device=logits.device),
        torch.tensor([p.min_p for p in params], device=logits.device),
    )
    return logprobs, filtered.softmax(dim=-1)


@dataclass
class Verified:
    """What verification emits for one sequence: tokens (accepted drafts, then one more) and their logprobs."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float] | None]
    num_accepted: int


@dataclass
class MTPRow:
    """Positions [start, start + count) of `seq` whose main hidden states are rows [row, row + count)."""

    seq: Sequence
    start: int
    count: int
    row: int
    fork: bool = False  # a sibling forked this step: only the prompt's last position, its own first token


class SpeculativeDecoder:
    """Owns the MTP layer's latent cache, drafts, verifies, and counts acceptance per draft position."""

    def __init__(self, model: DeepseekForCausalLM, config: EngineConfig, runner: ModelRunner,
                 block_manager: BlockManager) -> None:
        check_speculative_model(model)
        assert config.speculative_config is not None
        self.model = model
        self.config = config
        self.k = config.speculative_config.num_speculative_tokens
        self.disable_by_batch_size = config.speculative_config.disable_by_batch_size
        self.runner = runner
        self.blocks = block_manager
        self.module = model.model.mtp[0]
        cache = torch.zeros(config.pool_blocks, config.block_size, model.config.latent_dim,
                            dtype=runner.cache_dtype, device=runner.device)
        self.cache = cache
        # Attention reads kv_caches[layer_idx]; the MTP layer's index is num_hidden_layers. The main layers'
        # entries are never read by the MTP module.
        self.layer_caches: list[torch.Tensor] = [cache] * (model.config.num_hidden_layers + 1)
        self.num_draft_tokens = [0] * self.k  # drafts proposed at position j (1-based j = index + 1)
        self.num_accepted_tokens = [0] * self.k  # of those, accepted
        self.num_verify_steps = 0  # sequence-steps that verified drafts
        self.num_emitted_tokens = 0  # tokens those steps emitted (accepted + 1 each, before stop cuts)

    # ------------------------------------------------------------------ policy
    def active(self, num_running: int) -> bool:
        """Whether this step drafts: speculation pays at small batches (decode there is bound by weight reads)."""
        return self.disable_by_batch_size is None or num_running <= self.disable_by_batch_size

    def can_draft(self, seq: Sequence) -> bool:
        """Speculation is exact for this sequence now: no penalties, no min_tokens still pending; and its
        prefill is done (siblings of n > 1 fork from a plain first token)."""
        p = seq.params
        return not p.uses_penalties and seq.num_output_tokens >= p.min_tokens and not seq.pending_forks

    def num_drafts(self, seq: Sequence, max_model_len: int) -> int:
        """k, or fewer so that accepted drafts + 1 never pass max_tokens or the context."""
        room = min(seq.params.max_tokens - seq.num_output_tokens, max_model_len - len(seq)) - 1
        return max(0, min(self.k, room))

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """The scheduler's copy-on-write copies, applied to the MTP cache (the runner does the main layers)."""
        if copies:
            src, dst = (torch.tensor(x, device=self.cache.device) for x in zip(*copies))
            self.cache[dst] = self.cache[src]

    # ------------------------------------------------------------------ verification
    @torch.inference_mode()
    def verify(self, seqs: list[Sequence], rows: list[int], hidden: torch.Tensor) -> dict[int, Verified]:
        """Accept or reject the drafts of `seqs`, whose k + 1 verified positions are hidden rows
        [rows[i], rows[i] + k_i + 1); roll back the rejected positions. Keyed by seq_id."""
        index = torch.cat([torch.arange(r, r + len(s.draft_token_ids) + 1) for s, r in zip(seqs, rows)])
        logits = self.model.lm_head(hidden[index.to(hidden.device)]).float()  # [M, V]
        row_params = [s.params for s in seqs for _ in range(len(s.draft_token_ids) + 1)]
        logprobs, probs = sampling_distributions(logits, row_params)
        argmax = logprobs.argmax(dim=-1).tolist()
        want_top = max(s.params.logprobs or 0 for s in seqs)
        top_values, top_idx = logprobs.topk(want_top, dim=-1) if want_top else (None, None)
        out: dict[int, Verified] = {}
        offset = 0
        for seq in seqs:
            k = len(seq.draft_token_ids)
            window = slice(offset, offset + k + 1)
            if seq.params.greedy:
                tokens = greedy_accept(seq.draft_token_ids, argmax[window])
            else:
                tokens = rejection_sample(seq.draft_token_ids, seq.draft_probs, probs[window], seq.generator)
            a = len(tokens) - 1
            at = torch.arange(offset, offset + a + 1, device=logprobs.device)
            chosen = logprobs[at, torch.tensor(tokens, device=logprobs.device)].tolist()
            tops: list[dict[int, float] | None] = [None] * (a + 1)
            if seq.params.logprobs:
                n = seq.params.logprobs
                tops = [dict(zip(top_idx[offset + j, :n].tolist(), top_values[offset + j, :n].tolist()))
                        for j in range(a + 1)]
            out[seq.seq_id] = Verified(tokens, chosen, tops, a)
            for j in range(k):
                self.num_draft_tokens[j] += 1
                self.num_accepted_tokens[j] += j < a
            self.num_verify_steps += 1
            self.num_emitted_tokens += a + 1
            # Roll back: t and the accepted drafts are computed; the rejected drafts' slots are not.
            seq.num_computed_tokens = len(seq.token_ids) + a
            seq.drop_drafts()
            self.blocks.truncate(seq, seq.num_computed_tokens + 1)
            offset += k + 1
        return out

    # ------------------------------------------------------------------ drafting
    @torch.inference_mode()
    def draft(self, rows: list[MTPRow], hidden: torch.Tensor, max_model_len: int) -> None:
        """Run the MTP layer over this step's newly known positions and draft for the sequences at their end.

        Rows of forked siblings (`fork`) come after the others: a sibling's latent at the prompt's last
        position depends on its own first token, so it copies the shared block the parent has just written
        and overwrites that one position in its copy.
        """
        newest: dict[int, torch.Tensor] = {}  # seq_id -> h' at the sequence's newest known position
        for group in ([r for r in rows if not r.fork], [r for r in rows if r.fork]):
            copies, kept = [], []
            for r in group:
                private = self.blocks.make_private(r.seq, r.start) if r.fork else []
                if private is not None:  # a pool too full to copy a shared block: this sibling writes nothing
                    copies += private
                    kept.append(r)
            if copies:  # the sibling reads its main latents from the copy too
                src, dst = (torch.tensor(x, device=self.cache.device) for x in zip(*copies))
                for cache in self.runner.kv_caches + [self.cache]:
                    cache[dst] = cache[src]
            if kept:
                h = self._catch_up(kept, hidden)
                end = 0
                for r in kept:
                    end += r.count
                    newest[r.seq.seq_id] = h[end - 1]
        drafting, budget = [], []
        for r in rows:
            seq = r.seq
            if seq.seq_id not in newest or r.start + r.count != len(seq) - 1 or not self.can_draft(seq):
                continue
            k = self.num_drafts(seq, max_model_len)
            # The recursion writes MTP latents up to position C + k - 2 (C computed tokens): room for k - 1 more.
            while k > 1 and not self.blocks.can_grow(seq, k - 1):
                k -= 1
            if k == 0:
                continue
            if k > 1:
                self.blocks.grow(seq, k - 1)  # fresh blocks: the partial tail is this sequence's own
            drafting.append(seq)
            budget.append(k)
        if not drafting:
            return
        device = hidden.device
        h = torch.stack([newest[s.seq_id] for s in drafting])  # [B, D]
        probs: list[list[torch.Tensor]] = [[] for _ in drafting]
        active = list(range(len(drafting)))
        for j in range(max(budget)):
            if j > 0:  # d_{j+1} from (h', Emb(d_j)) at position C - 1 + j
                keep = [n for n, i in enumerate(active) if budget[i] > j]
                active = [active[n] for n in keep]
                seqs = [drafting[i] for i in active]
                pos = [len(s) - 2 + j for s in seqs]
                metadata = AttentionMetadata.build(
                    self.layer_caches, [s.block_table for s in seqs], [p + 1 for p in pos], [1] * len(seqs),
                    self.config.block_size, device, absorbed=self.config.absorbed)
                ids = torch.tensor([s.draft_token_ids[-1] for s in seqs], device=device)
                h = self._mtp(h[torch.tensor(keep, device=device)], ids, torch.tensor(pos, device=device), metadata)
            seqs = [drafting[i] for i in active]
            logits = self.model.lm_head(self.module.shared_head.norm(h)).float()  # [B, V]
            _, q = sampling_distributions(logits, [s.params for s in seqs])  # q None: every row greedy
            for row, (i, seq) in enumerate(zip(active, seqs)):
                if seq.params.greedy:
                    seq.draft_token_ids.append(int(logits[row].argmax()))
                else:
                    seq.draft_token_ids.append(draw(q[row], seq.generator))
                    probs[i].append(q[row])
        for seq, q_rows in zip(drafting, probs):
            seq.draft_probs = torch.stack(q_rows) if q_rows else None

    def _catch_up(self, rows: list[MTPRow], hidden: torch.Tensor) -> torch.Tensor:
        """MTP over each row's positions i (main hidden h_i, next token t_{i+1}), latents into the MTP cache.
        Returns h' [N, D], the rows' positions concatenated."""
        device = hidden.device
        positions = torch.cat([torch.arange(r.start, r.start + r.count) for r in rows]).to(device)
        h_rows = torch.cat([torch.arange(r.row, r.row + r.count) for r in rows]).to(device)
        next_ids = [t for r in rows for t in r.seq.token_ids[r.start + 1 : r.start + r.count + 1]]
        metadata = AttentionMetadata.build(
            self.layer_caches, [r.seq.block_table for r in rows], [r.start + r.count for r in rows],
            [r.count for r in rows], self.config.block_size, device, absorbed=self.config.absorbed)
        return self._mtp(hidden[h_rows], torch.tensor(next_ids, device=device), positions, metadata)

    def _mtp(self, h: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
             metadata: AttentionMetadata) -> torch.Tensor:
        """One MTP layer over flattened tokens: h [N, D] at `positions` with the next tokens' ids -> h' [N, D]."""
        cos, sin = self.model.model.rotary(positions)
        return self.module(h, self.model.model.embed_tokens(next_ids), cos, sin, metadata)

    # ------------------------------------------------------------------ metrics
    def stats(self) -> dict[str, float]:
        """Acceptance per draft position and the mean tokens a verifying step emits (1 + accepted drafts)."""
        drafted, accepted = sum(self.num_draft_tokens), sum(self.num_accepted_tokens)
        out = {
            "spec_draft_tokens": drafted,
            "spec_accepted_tokens": accepted,
            "spec_verify_steps": self.num_verify_steps,
            "spec_acceptance_rate": accepted / drafted if drafted else 0.0,
            "spec_mean_accepted_length": self.num_emitted_tokens / self.num_verify_steps
            if self.num_verify_steps else 0.0,
        }
        for j, (d, a) in enumerate(zip(self.num_draft_tokens, self.num_accepted_tokens), start=1):
            out[f"spec_acceptance_rate_pos{j}"] = a / d if d else 0.0
            out[f"spec_draft_tokens_pos{j}"] = d
            out[f"spec_accepted_tokens_pos{j}"] = a
        return out
