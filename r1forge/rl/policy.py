"""The policy to sample from: a trained model and its own tokenizer loaded from a run or checkpoint directory,
and an engine around it sized to the sampling job. Used by rejection sampling (`r1forge sample`) and
distillation (the teacher, the student's evaluations).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from r1forge.engine import LLM
from r1forge.rl.templates import render_prompt


def load_policy(path: str | os.PathLike, device: Any = "cpu", key: str = "model") -> tuple[Any, Any, Path]:
    """(model, its tokenizer, its directory) from a checkpoint or run directory (its newest checkpoint).

    `key` names the path in errors (the config key or argument it came from).
    """
    from r1forge.data import load_tokenizer
    from r1forge.loading import load_model
    from r1forge.train.checkpointing import resolve_model_dir

    directory = resolve_model_dir(path)
    if not (directory / "tokenizer.json").is_file():
        raise ValueError(f"{key} {str(path)!r}: {directory} has no tokenizer.json (prompts are rendered, and a "
                         "student trained, with the model's own tokenizer)")
    return load_model(directory, device=device), load_tokenizer(directory), directory


def sampling_engine(model: Any, tokenizer: Any, examples: list[dict[str, Any]], template: str, max_tokens: int,
                    max_num_seqs: int) -> LLM:
    """An engine sized to the job: its cache holds max_num_seqs sequences of the longest prompt + max_tokens,
    not the model's whole context, so that it fits beside training (and a second engine) in memory."""
    longest = max(len(render_prompt(tokenizer, ex["question"], template)[1]) for ex in examples)
    max_len = min(longest + max_tokens + 1, model.config.max_position_embeddings)
    return LLM(model, tokenizer=tokenizer, max_num_seqs=max(1, min(max_num_seqs, 256)), block_size=16,
               max_model_len=max_len)
