"""Continuous batching: which sequences run this step, and how many of their tokens.

Every step, running sequences go first (decodes, then unfinished prefill chunks), in arrival order, then
waiting sequences are admitted FIFO while the token budget, the sequence limit and free blocks allow.
Prefill and decode mix in one batch; a long prompt is prefilled in chunks. When a running sequence needs a
block and none is free, the newest running sequence is preempted (its blocks freed, recomputed later),
so the oldest requests always progress: nothing deadlocks and nothing is dropped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from r1forge.engine.block_manager import BlockManager
from r1forge.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_tokens: list[int]  # new tokens computed for each sequence this step
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write block copies (src, dst)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks; it goes back to the head of the queue and recomputes what it had."""
        self.running.remove(seq)
        self.blocks.free_sequence(seq)
        seq.drop_drafts()
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch([], [])
        budget = self.max_num_batched_tokens
        # Decodes first (one token each, or 1 + k with drafts: latency-critical), then unfinished prefill
        # chunks; oldest first.
        order = sorted(self.running, key=lambda s: (s.num_uncomputed - len(s.draft_token_ids) > 1, s.arrival,
                                                    s.seq_id))
        for seq in order:
            if seq not in self.running or budget <= 0:
                continue
            if seq.draft_token_ids and seq.num_uncomputed > budget:
                seq.drop_drafts()  # drafts are verified in one piece or not at all
            if seq.draft_token_ids and not self.blocks.can_grow(seq, seq.num_uncomputed):
                seq.drop_drafts()  # a full pool drops drafts before it preempts anyone
            n = min(seq.num_uncomputed, budget)
            while not self.blocks.can_grow(seq, n):
                victim = max(self.running, key=lambda s: (s.arrival, s.seq_id))
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq not in self.running:
                continue
            batch.copies += self.blocks.grow(seq, n)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        # Admit waiting sequences while there is room; the newest wait when the pool is full.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self.blocks.admit(seq)
            n = min(seq.num_uncomputed, budget)
            if not self.blocks.can_grow(seq, n):
                self.blocks.prefix_hit_tokens -= seq.num_computed_tokens
                self.blocks.free_sequence(seq)
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            batch.copies += self.blocks.grow(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        return batch

    def finish(self, seq: Sequence) -> None:
        """Retire a sequence (finished or aborted) and return its blocks to the pool at once."""
        seq.status = SequenceStatus.FINISHED
        seq.drop_drafts()
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_sequence(seq)
