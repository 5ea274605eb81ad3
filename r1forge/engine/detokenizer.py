"""Incremental detokenisation for streaming, with any tokenizer that has `decode(ids, skip_special_tokens=)`.

Byte-level BPE splits characters across tokens, so decoding token by token would emit broken UTF-8.
vLLM's prefix-offset method: decode a short window of recent tokens twice (with and without the new ones)
and emit the difference only once it no longer ends in an incomplete character (U+FFFD).
"""

from __future__ import annotations

from typing import Any

_WINDOW = 6  # tokens of left context so that merges and leading-space handling match a full decode


class Detokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-_WINDOW:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Feed one token; return the newly completed text (possibly empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if full.endswith("\ufffd") or len(full) < len(prefix) or not full.startswith(prefix):
            if not full.endswith("\ufffd") and not full.startswith(prefix):
                # Special-token skipping or normalisation changed the prefix: fall back to the raw tail.
                new = full[len(prefix):] if len(full) > len(prefix) else ""
                self._advance()
                return new
            return ""
        new = full[len(prefix) :]
        self._advance()
        return new

    def _advance(self) -> None:
        self.prefix_offset = max(self.read_offset, len(self.ids) - _WINDOW)
        self.read_offset = len(self.ids)
        if self.prefix_offset > self.read_offset:
            self.prefix_offset = self.read_offset
        # Keep the window bounded.
        if self.prefix_offset > 4 * _WINDOW:
            drop = self.prefix_offset - _WINDOW
            self.ids = self.ids[drop:]
            self.prefix_offset -= drop
            self.read_offset -= drop
