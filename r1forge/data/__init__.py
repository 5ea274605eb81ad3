"""Data for r1forge: the tokenizer, pretraining and SFT datasets, a resumable loader, synthetic corpora."""

from r1forge.data.chat_template import DEFAULT_CHAT_TEMPLATE, render_chat
from r1forge.data.jsonl import (
    DataError, JsonlReader, iter_jsonl, read_jsonl, validate_chat_record, validate_text_record, write_jsonl,
)
from r1forge.data.loader import StatefulLoader, epoch_order, stack_collate
from r1forge.data.pretrain import IGNORE_INDEX, PretrainDataset
from r1forge.data.sft import SFTDataset, assistant_spans, tokenize_chat
from r1forge.data.synthetic import (
    R1_ZERO_TEMPLATE, Problem, make_pretrain_corpus, make_problems, pretrain_text, problem_split, rl_example,
    sft_messages,
)
from r1forge.data.tokenizer import IncrementalDecoder, Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "Tokenizer", "IncrementalDecoder", "load_tokenizer", "train_tokenizer", "DEFAULT_CHAT_TEMPLATE", "render_chat",
    "DataError", "JsonlReader", "iter_jsonl", "read_jsonl", "write_jsonl", "validate_text_record",
    "validate_chat_record", "StatefulLoader", "epoch_order", "stack_collate", "IGNORE_INDEX", "PretrainDataset",
    "SFTDataset", "assistant_spans", "tokenize_chat", "Problem", "make_problems", "problem_split", "pretrain_text",
    "sft_messages", "rl_example", "make_pretrain_corpus", "R1_ZERO_TEMPLATE",
]
