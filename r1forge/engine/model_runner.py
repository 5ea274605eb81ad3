"""Owns the model and the paged KV cache; turns a scheduled batch into one forward and a sample.

The pool is one tensor per layer [num_blocks, block_size, *token_shape], the layout the model asks for in its
`cache_spec()`: MLA's latent [kv_lora_rank + qk_rope_head_dim] (what FlashMLA-style kernels read,
block-major) or GQA's keys and values [2, num_key_value_heads, head_dim]. Nothing here depends on which.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1forge.engine.config import EngineConfig
from r1forge.engine.scheduler import ScheduledBatch
from r1forge.engine.static_decode import StaticDecoder
from r1forge.engine.sequence import Sequence
from r1forge.model import AttentionMetadata, CausalLM


def cache_bytes_per_token(model: CausalLM, dtype: torch.dtype) -> int:
    """The model's cached numbers per token (all layers) * element size: for MLA (C + R) * L, for GQA
    2 * H_kv * D_h * L."""
    return model.cache_spec().bytes_per_token(dtype)


@dataclass
class StepInput:
    """One forward's inputs as plain lists: what a tensor-parallel rank 0 sends its workers each step."""

    copies: list[tuple[int, int]]  # copy-on-write (src block, dst block) pairs, applied before the forward
    input_ids: list[int]
    positions: list[int]
    block_tables: list[list[int]]
    context_lens: list[int]
    num_tokens: list[int]


class ModelRunner:
    """Args:
        config: a resolved `EngineConfig`. The pool holds `config.pool_blocks` blocks: the `num_blocks`
            sequences may own and, with fixed-shape decoding, the null block its padding rows write to.
    """

    def __init__(self, model: CausalLM, config: EngineConfig) -> None:
        self.model = model
        self.config = config
        self.block_size = config.block_size
        self.absorbed = config.absorbed
        param = next(model.parameters())
        self.device = param.device
        self.cache_dtype = model.model.embed_tokens.weight.dtype
        self.cache_bytes_per_token = cache_bytes_per_token(model, self.cache_dtype)
        self.cache_spec = model.cache_spec()
        self.kv_caches = self.cache_spec.allocate(config.pool_blocks, config.block_size, self.cache_dtype, self.device)
        self.num_forward_tokens = 0  # tokens pushed through the model, for prefix-sharing tests and stats
        self.num_prefill_tokens = 0  # of those, tokens that were not a decode step
        self.last_hidden: torch.Tensor | None = None  # [N, D] of the last step, when asked to keep it
        self.static: StaticDecoder | None = StaticDecoder(model, self.kv_caches, config) \
            if config.uses_static_decode else None

    @property
    def pool_bytes(self) -> int:
        """Bytes the KV pool holds, all layers (the null block of static decoding included)."""
        return sum(c.numel() * c.element_size() for c in self.kv_caches)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, keep_hidden: bool = False) -> tuple[list[Sequence], torch.Tensor | None]:
        """Run the batch's new tokens (a sequence's unverified drafts included) through the model.

        Returns the sequences whose every token is now computed (they get a next token) and their last-position
        logits [len, vocab] in float32. `keep_hidden` keeps every token's final hidden state in `last_hidden`
        (what speculative decoding verifies and drafts from); such a step runs eagerly.
        """
        input_ids, positions, context_lens = [], [], []
        for seq, n in zip(batch.seqs, batch.num_tokens):
            start = seq.num_computed_tokens
            tokens = seq.token_ids + seq.draft_token_ids if seq.draft_token_ids else seq.token_ids
            input_ids.extend(tokens[start : start + n])
            positions.extend(range(start, start + n))
            context_lens.append(start + n)
            if n - len(seq.draft_token_ids) > 1 or seq.num_output_tokens == 0:
                self.num_prefill_tokens += n
        self.num_forward_tokens += len(input_ids)
        self.last_hidden = None
        step = StepInput(list(batch.copies), input_ids, positions, [list(s.block_table) for s in batch.seqs],
                         context_lens, list(batch.num_tokens))
        if not keep_hidden and self._is_static_decode(batch):
            self.copy_blocks(step.copies)
            logits = self.static.run(input_ids, positions, [s.block_table for s in batch.seqs])
            for seq in batch.seqs:
                seq.num_computed_tokens += 1
            return list(batch.seqs), logits
        hidden = self.run_model(step)  # [N, D]
        if keep_hidden:
            self.last_hidden = hidden
        # Only sequences whose every token is now computed produce a next token.
        last_rows, sampling = [], []
        offset = 0
        for seq, n in zip(batch.seqs, batch.num_tokens):
            offset += n
            seq.num_computed_tokens += n
            if seq.num_uncomputed == 0:
                last_rows.append(offset - 1)
                sampling.append(seq)
        if not sampling:
            return [], None
        logits = self.model.lm_head(hidden[torch.tensor(last_rows, device=self.device)])
        return sampling, logits.float()

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write of partial last blocks, all of this step's at once per layer."""
        if copies:
            src, dst = (torch.tensor(x, device=self.device) for x in zip(*copies))
            for cache in self.kv_caches:
                cache[dst] = cache[src]

    @torch.inference_mode()
    def run_model(self, step: StepInput) -> torch.Tensor:
        """The cache copies and the forward of one step -> final hidden states [N, D] (what every
        tensor-parallel rank runs on its shard; `r1forge.engine.executor` sends the step to the workers)."""
        self.copy_blocks(step.copies)
        metadata = AttentionMetadata.build(
            self.kv_caches, step.block_tables, step.context_lens, step.num_tokens,
            self.block_size, self.device, absorbed=self.absorbed,
        )
        ids = torch.tensor(step.input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(step.positions, dtype=torch.long, device=self.device)
        return self.model.model(ids, pos, metadata)

    def check_health(self) -> None:
        """Raise if the runner can no longer step (a multi-process runner whose worker died); no-op here."""

    def shutdown(self) -> None:
        """Release what the runner started (worker processes); no-op for a single device."""

    def _is_static_decode(self, batch: ScheduledBatch) -> bool:
        """One new token per sequence, each completing its sequence, within the static buckets."""
        if self.static is None or any(n != 1 for n in batch.num_tokens):
            return False
        if any(seq.num_computed_tokens + 1 != len(seq) for seq in batch.seqs):
            return False
        return self.static.fits(len(batch.seqs), max(len(s.block_table) for s in batch.seqs))
