"""Sequence: one completion's tokens, cache blocks and progress (nano-vllm's vocabulary)."""

from __future__ import annotations

import enum
import itertools

import torch

from r1forge.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_ids = itertools.count()


class Sequence:
    """Prompt + generated tokens of one completion.

    `num_computed_tokens` counts tokens whose latents are in the cache: prefill, chunked prefill, decode and
    recompute after preemption are all "compute tokens[num_computed:]", which keeps the scheduler uniform.
    """

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 arrival: float, generator: torch.Generator | None = None) -> None:
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.index = index  # which of the request's n completions
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.arrival = arrival
        self.generator = generator
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_prompt_tokens = 0  # prompt tokens found in the prefix cache at admission
        self.pending_forks = 0  # completions still to fork from this one after its prefill (n > 1)
        self.logprobs: list[float] = []
        self.top_logprobs: list[dict[int, float]] = []
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.output_text = ""
        self.detokenizer = None  # set by the engine when a tokenizer is present
        self.eos_token_id: int | None = None  # set by the engine from the tokenizer / model config
        self.num_preemptions = 0
        self.first_token_time: float | None = None
        # Speculative decoding: tokens the MTP drafter proposed after token_ids, verified by the next step's
        # forward (they are computed like tokens but are not the sequence's until accepted), and the draft
        # distributions q they were sampled from ([k, vocab]; None when greedy).
        self.draft_token_ids: list[int] = []
        self.draft_probs: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        """Tokens (drafts included) whose latents are not in the cache yet: what a step computes."""
        return len(self.token_ids) + len(self.draft_token_ids) - self.num_computed_tokens

    def drop_drafts(self) -> None:
        """Forget unverified drafts (preempted, cut short by the token budget, or finished)."""
        self.draft_token_ids = []
        self.draft_probs = None

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def fork(self, index: int, generator: torch.Generator | None) -> "Sequence":
        """A sibling completion sharing this one's prompt (its blocks are shared by the block manager)."""
        child = Sequence(self.request_id, index, self.token_ids, self.params, self.arrival, generator)
        child.num_prompt_tokens = self.num_prompt_tokens
        child.num_computed_tokens = self.num_computed_tokens
        child.num_cached_prompt_tokens = self.num_cached_prompt_tokens
        child.status = self.status
        child.eos_token_id = self.eos_token_id
        return child
