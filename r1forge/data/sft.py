"""Supervised fine-tuning data: chat JSONL rendered with the chat template, loss on assistant tokens only.

A record is `{"messages": [...], "tools": [...]?}`. It is rendered with `keep_reasoning=True` (the reasoning is
what cold-start SFT teaches), and a token is trained on when it belongs to an assistant turn: its content,
reasoning, tool calls and the closing `<｜end▁of▁sentence｜>`, never the `<｜Assistant｜>` opener or anything
the user, system or tools wrote. Assistant spans are found by rendering each turn's prefix with and without
the turn (the template-agnostic way: it works with any checkpoint's template, no `{% generation %}` needed).

Samples carry shifted labels (labels[t] is the target after input_ids[t], -100 where not trained),
`position_ids` and `attention_mask`; `collate` right-pads a batch. With `packing=True` conversations are packed
greedily into rows of exactly `max_len`, position ids restarting per conversation, as pretraining rows are.
"""

from __future__ import annotations

import os
import random
from typing import Any

import torch

from r1forge.data.jsonl import JsonlReader, validate_chat_record
from r1forge.data.pretrain import IGNORE_INDEX
from r1forge.data.tokenizer import Tokenizer


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def assistant_spans(tokenizer: Tokenizer, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The SFT render of a conversation and the character spans written for its assistant turns."""
    def render(msgs: list[dict[str, Any]], prompt: bool = False) -> str:
        return tokenizer.render_chat(msgs, add_generation_prompt=prompt, tools=tools, thinking=False,
                                     keep_reasoning=True)

    full = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        upto = render(messages[: i + 1])
        start = _common_prefix_len(render(messages[:i], prompt=True), upto)
        end = _common_prefix_len(upto, full)
        if end > start:
            spans.append((start, end))
    return full, spans


def tokenize_chat(tokenizer: Tokenizer, messages: list[dict[str, Any]],
                  tools: list[dict[str, Any]] | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the SFT render and shifted labels (labels[t] = ids[t+1] on assistant tokens, else -100)."""
    text, spans = assistant_spans(tokenizer, messages, tools)
    ids, offsets = tokenizer.encode_with_offsets(text)
    trained = [any(s < end and e > start for start, end in spans) for s, e in offsets]
    labels = [ids[t + 1] if trained[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
    return ids, labels


class SFTDataset:
    """Chat conversations from JSONL files and/or in-memory records, tokenised once.

    Args:
        tokenizer: r1forge `Tokenizer` with a chat template.
        max_len: longest sample (or packed row) in tokens; longer conversations are cut (`num_truncated`)
            and dropped when nothing trainable is left (`num_dropped`).
        files: JSONL files of `{"messages": [...]}` records.
        records: more records.
        packing: pack conversations into rows of max_len instead of one per sample.
        seed: shuffle conversations before packing (None keeps their order).
        skip_malformed: skip and count bad records (`num_skipped`) instead of raising `DataError`.
    """

    def __init__(self, tokenizer: Tokenizer, max_len: int, files: list[str | os.PathLike] | None = None,
                 records: list[dict[str, Any]] | None = None, packing: bool = False, seed: int | None = 0,
                 skip_malformed: bool = False) -> None:
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        self.max_len = max_len
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.num_skipped = self.num_truncated = self.num_dropped = 0
        conversations = self._read(files or [], records or [], skip_malformed)
        if seed is not None and packing:
            random.Random(f"r1forge-sft:{seed}").shuffle(conversations)
        self.examples: list[tuple[list[int], list[int]]] = []
        for record in conversations:
            ids, labels = tokenize_chat(tokenizer, record["messages"], record.get("tools"))
            if len(ids) > max_len:
                ids, labels = ids[:max_len], labels[:max_len]
                self.num_truncated += 1
            if all(label == IGNORE_INDEX for label in labels):
                self.num_dropped += 1
                continue
            self.examples.append((ids, labels))
        if not self.examples:
            raise ValueError("no trainable conversations (each needs assistant tokens within max_len)")
        self.rows = self._pack() if packing else [[i] for i in range(len(self.examples))]
        self.packing = packing

    def _read(self, files: list[str | os.PathLike], records: list[dict[str, Any]],
              skip: bool) -> list[dict[str, Any]]:
        out = []
        for file in files:
            reader = JsonlReader(file, validate_chat_record, skip_malformed=skip)
            out.extend(record for _, record in reader)
            self.num_skipped += reader.num_skipped
        for i, record in enumerate(records):
            try:
                if not isinstance(record, dict):
                    raise ValueError(f"expected a dict, got {type(record).__name__}")
                validate_chat_record(record)
            except ValueError as e:
                if not skip:
                    raise ValueError(f"records[{i}]: {e}") from None
                self.num_skipped += 1
                continue
            out.append(record)
        return out

    def _pack(self) -> list[list[int]]:
        """Greedy, in order: a conversation goes into the current row if it fits, else opens the next one."""
        rows: list[list[int]] = []
        used = self.max_len
        for i, (ids, _) in enumerate(self.examples):
            if used + len(ids) > self.max_len:
                rows.append([])
                used = 0
            rows[-1].append(i)
            used += len(ids)
        return rows

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids, _ in self.examples)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in self.rows[index]:
            ex_ids, ex_labels = self.examples[i]
            ids += ex_ids
            labels += ex_labels
            positions += range(len(ex_ids))
        sample = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                  "position_ids": torch.tensor(positions), "attention_mask": torch.ones(len(ids), dtype=torch.long)}
        return _pad(sample, self.max_len, self.pad_token_id) if self.packing else sample

    def collate(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Right-pad [T] samples to the longest and stack to [B, T] (pad id, labels -100, position 0, mask 0)."""
        length = max(s["input_ids"].shape[0] for s in samples)
        padded = [_pad(s, length, self.pad_token_id) for s in samples]
        return {key: torch.stack([p[key] for p in padded]) for key in padded[0]}


def _pad(sample: dict[str, torch.Tensor], length: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    fill = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "position_ids": 0, "attention_mask": 0}
    return {key: torch.nn.functional.pad(value, (0, length - value.shape[0]), value=fill[key])
            for key, value in sample.items()}
