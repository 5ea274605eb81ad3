"""Paged allocation of the latent cache: fixed-size blocks, reference counts, prefix caching, copy-on-write.

A sequence's tokens live in the blocks of its `block_table`. Blocks are shared two ways:
- forks: the n completions of one request share the prompt's blocks after a single prefill;
- prefix caching: a full, computed block is registered under a hash of its tokens and everything before
  them, so a later sequence with the same prefix reuses it (vLLM's automatic prefix caching). A freed block
  keeps its hash until it is reallocated, least recently freed first.
A shared partial block is copied before a sequence writes into it (copy-on-write); the copy itself is done
by the model runner, which owns the cache tensors.
"""

from __future__ import annotations

from collections import OrderedDict

from r1forge.engine.sequence import Sequence


class PoolExhausted(RuntimeError):
    """Raised when not enough free blocks exist; the scheduler answers by waiting or preempting."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU order
        self.prefix_hit_tokens = 0  # tokens whose prefill was skipped thanks to the cache, for stats and tests

    # ------------------------------------------------------------------ accounting
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ allocation
    def _allocate(self) -> int:
        if not self.free:
            raise PoolExhausted("no free cache blocks")
        block, _ = self.free.popitem(last=False)
        old_hash = self.block_hash[block]
        if old_hash is not None and self.hash_to_block.get(old_hash) == block:
            del self.hash_to_block[old_hash]
        self.block_hash[block] = None
        self.block_tokens[block] = None
        self.ref_count[block] = 1
        return block

    def _take(self, block: int) -> None:
        if self.ref_count[block] == 0:
            del self.free[block]
        self.ref_count[block] += 1

    def _release(self, block: int) -> None:
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            self.free[block] = None  # most recently freed: reallocated last, so its cached prefix lives longest

    def _chain_hashes(self, token_ids: list[int], num_blocks: int) -> list[int]:
        hashes, prev = [], 0
        for i in range(num_blocks):
            prev = hash((prev, tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])))
            hashes.append(prev)
        return hashes

    def admit(self, seq: Sequence) -> None:
        """Give a waiting sequence its cached prefix blocks (at least one token is always left to compute)."""
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id} already holds blocks")
        if self.enable_prefix_caching:
            n_full = (len(seq) - 1) // self.block_size
            for i, h in enumerate(self._chain_hashes(seq.token_ids, n_full)):
                block = self.hash_to_block.get(h)
                tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
                if block is None or self.block_tokens[block] != tokens:
                    break
                self._take(block)
                seq.block_table.append(block)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        seq.num_cached_prompt_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
        self.prefix_hit_tokens += seq.num_computed_tokens

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `num_tokens` more tokens fit, counting a copy-on-write of a shared partial block."""
        need = self.blocks_needed(seq.num_computed_tokens + num_tokens) - len(seq.block_table)
        if seq.num_computed_tokens % self.block_size and self.ref_count[seq.block_table[-1]] > 1:
            need += 1
        return need <= len(self.free)

    def grow(self, seq: Sequence, num_tokens: int) -> list[tuple[int, int]]:
        """Make room for the next `num_tokens` tokens; returns (src, dst) block copies to do before writing."""
        copies = []
        if seq.num_computed_tokens % self.block_size and self.ref_count[seq.block_table[-1]] > 1:
            src = seq.block_table[-1]
            dst = self._allocate()
            self._release(src)
            seq.block_table[-1] = dst
            copies.append((src, dst))
        while len(seq.block_table) < self.blocks_needed(seq.num_computed_tokens + num_tokens):
            seq.block_table.append(self._allocate())
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        for block in parent.block_table:
            self._take(block)
        child.block_table = list(parent.block_table)

    def free_sequence(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table = []

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix: after a weight update the cached latents belong to the old weights."""
        self.hash_to_block.clear()
        self.block_hash = [None] * self.num_blocks
        self.block_tokens = [None] * self.num_blocks

    def register_computed(self, seq: Sequence, token_ids: list[int] | None = None) -> None:
        """Publish the sequence's full, computed blocks for prefix reuse.

        `token_ids` (default: the sequence's) are the tokens the computed latents belong to: speculative
        decoding passes the accepted drafts here before they are appended, and never a rejected one.
        """
        if not self.enable_prefix_caching:
            return
        token_ids = seq.token_ids if token_ids is None else token_ids
        n_full = seq.num_computed_tokens // self.block_size
        hashes = None
        for i in range(n_full):
            block = seq.block_table[i]
            if self.block_hash[block] is not None:
                continue
            hashes = hashes or self._chain_hashes(token_ids, n_full)
            self.block_hash[block] = hashes[i]
            self.block_tokens[block] = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
            self.hash_to_block.setdefault(hashes[i], block)

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Return the blocks past the first `num_tokens` tokens (rejected drafts' slots) to the pool."""
        keep = self.blocks_needed(num_tokens)
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())

    def make_private(self, seq: Sequence, from_position: int) -> list[tuple[int, int]] | None:
        """Copy-on-write every shared block holding positions >= `from_position`; returns the (src, dst) copies,
        or None (nothing changed) when the pool has too few free blocks.

        The MTP drafter writes a latent that depends on the sequence's own next token, so siblings that
        share a block after a fork must each write into their own copy.
        """
        first = from_position // self.block_size
        shared = [i for i in range(first, len(seq.block_table)) if self.ref_count[seq.block_table[i]] > 1]
        if len(shared) > len(self.free):
            return None
        copies = []
        for i in shared:
            src = seq.block_table[i]
            dst = self._allocate()
            self._release(src)
            seq.block_table[i] = dst
            copies.append((src, dst))
        return copies
