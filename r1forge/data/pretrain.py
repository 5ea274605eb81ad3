"""Pretraining data: documents tokenised, joined with eos and packed into rows of `seq_len` tokens.

Every sample is `input_ids`, `labels` and `position_ids`, each [seq_len]. Labels are already shifted, as
`causal_lm_loss` expects: labels[t] is the token after input_ids[t]. The loss never crosses a document:
where the next token starts a new document its label is -100, and position ids restart at 0 at every
document start (and at the start of each row, for the tail of a document cut by the previous row).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from pathlib import Path

import torch

from r1forge.data.jsonl import JsonlReader, validate_text_record
from r1forge.data.tokenizer import Tokenizer

IGNORE_INDEX = -100


class PretrainDataset:
    """Packed pretraining rows from text files, JSONL files (`{"text": ...}`) and/or in-memory texts.

    Args:
        tokenizer: r1forge `Tokenizer`.
        seq_len: tokens per row.
        files: `.jsonl` files (one document per record) or plain text files (one document per file, or
            several split on `text_separator`).
        texts: more documents.
        add_bos: start every document with bos, as the chat template starts every conversation.
        text_key: the JSONL key holding a document.
        text_separator: split plain text files into documents on this string (e.g. "\\n\\n").
        seed: shuffle the documents before packing (None keeps file order); the rows are a function of it.
        skip_malformed: skip and count bad JSONL lines (`num_skipped`) instead of raising `DataError`.
    """

    def __init__(self, tokenizer: Tokenizer, seq_len: int, files: list[str | os.PathLike] | None = None,
                 texts: Iterable[str] | None = None, add_bos: bool = True, text_key: str = "text",
                 text_separator: str | None = None, seed: int | None = 0, skip_malformed: bool = False) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if tokenizer.eos_token_id is None:
            raise ValueError("pretraining needs a tokenizer with an eos_token to join documents")
        self.seq_len = seq_len
        self.num_skipped = 0
        docs = self._read(files or [], text_key, text_separator, skip_malformed) + [t for t in texts or () if t]
        if seed is not None:
            random.Random(f"r1forge-pretrain:{seed}").shuffle(docs)
        if not docs:
            raise ValueError("no documents: pass files or texts with some text in them")
        head = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
        encoded = [head + ids + [tokenizer.eos_token_id] for ids in tokenizer.encode_batch(docs)]
        lengths = torch.tensor([len(ids) for ids in encoded])
        self.tokens = torch.tensor([t for ids in encoded for t in ids], dtype=torch.int32)
        starts = torch.cumsum(lengths, 0) - lengths
        # Position of every token inside its document: 0 at each document start.
        self.positions = (torch.arange(len(self.tokens)) - torch.repeat_interleave(starts, lengths)).to(torch.int32)
        self.num_documents = len(docs)
        if len(self.tokens) < seq_len + 1:
            raise ValueError(f"only {len(self.tokens)} tokens, fewer than one row of seq_len {seq_len} + 1")

    def _read(self, files: list[str | os.PathLike], key: str, separator: str | None, skip: bool) -> list[str]:
        docs: list[str] = []
        for file in files:
            path = Path(file)
            if path.suffix == ".jsonl":
                reader = JsonlReader(path, lambda r: validate_text_record(r, key), skip_malformed=skip)
                docs.extend(record[key] for _, record in reader if record[key])
                self.num_skipped += reader.num_skipped
            else:
                if not path.is_file():
                    raise ValueError(f"data file not found: {path}")
                text = path.read_text(encoding="utf-8")
                docs.extend(d for d in (text.split(separator) if separator else [text]) if d.strip())
        return docs

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def __len__(self) -> int:
        # Row i reads tokens [i*L, (i+1)*L] inclusive: the extra one is the last label.
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        s, n = index * self.seq_len, self.seq_len
        input_ids = self.tokens[s : s + n].long()
        next_starts_doc = self.positions[s + 1 : s + n + 1] == 0
        labels = self.tokens[s + 1 : s + n + 1].long().masked_fill(next_starts_doc, IGNORE_INDEX)
        position_ids = self.positions[s : s + n].long()
        if position_ids[0] != 0:  # a document continued from the previous row restarts at 0
            zeros = (position_ids == 0).nonzero()
            head = int(zeros[0]) if len(zeros) else n
            position_ids[:head] -= position_ids[0].clone()
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
