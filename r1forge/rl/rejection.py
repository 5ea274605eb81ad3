"""Rejection sampling (DeepSeek-R1's third stage): N samples per prompt, keep only the correct ones as SFT data.

    model, tokenizer, _ = load_policy("runs/grpo-tiny")                     # r1forge.rl.policy: a run or checkpoint
    llm = sampling_engine(model, tokenizer, examples, "chat", max_tokens=256, max_num_seqs=256)
    result = rejection_sample(llm, tokenizer, examples, num_samples=8)      # examples: {"question", "answer"}
    write_jsonl("data/rs.jsonl", result.records)                            # then `r1forge sft --data.files ...`

Why the filters: R1 kept only samples whose final answer checks out against the reference *and* that read well,
because SFT on them teaches whatever they contain. Here a sample is kept when
  1. the accuracy reward is 1 (the answer equals the reference as a number or a math expression), unless
     `require_correct=False` (distillation on a teacher's raw traces);
  2. the format reward is 1 (`<think>...</think><answer>...</answer>`, nothing after) unless `require_format=False`;
  3. it ended by itself (eos or a stop string), not by running into `max_tokens`;
  4. it is not a verbatim repeat of a sample already kept for the same prompt (`dedupe`), and at most
     `max_per_prompt` are kept per prompt (R1 kept several per prompt; a cap keeps easy prompts from dominating).

Records are chat records `{"messages": [user, assistant], "answer": ...}` that `r1forge.data.SFTDataset` reads
(and `r1forge sft` via `data.files`). The assistant content is exactly what the model saw and wrote: whatever the
prompt template opened (R1's chat template opens `<think>\\n`) followed by the completion, so SFT on a record trains
on the sampled text after the same prompt tokens. (Text, re-tokenized: a sample drawn in a non-canonical
tokenization, which hot sampling produces now and then, is learnt in the canonical one.)
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from r1forge.engine import LLM, SamplingParams
from r1forge.rl.rewards import accuracy_reward, format_reward
from r1forge.rl.templates import render_prompt


@dataclass
class ScoredSample:
    """One completion of one prompt and what the rule-based checks said about it."""

    example_index: int  # index into the examples given
    prompt: str  # the rendered prompt text
    completion: str  # the generated text (special tokens such as eos removed)
    token_ids: list[int]  # the generated tokens (eos included when it ended the sample)
    finish_reason: str | None  # "stop" (eos / stop string) or "length"
    correct: bool  # accuracy reward == 1
    formatted: bool  # format reward == 1

    @property
    def finished(self) -> bool:
        return self.finish_reason == "stop"

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class RejectionStats:
    """Counts and rates of one rejection-sampling pass.

    pass@1 is the mean fraction of correct samples per prompt (the sampling policy's accuracy); pass@N the
    fraction of prompts with at least one correct sample: the gap between them is what rejection sampling buys.
    """

    num_prompts: int = 0
    num_samples: int = 0  # N, samples per prompt
    total: int = 0  # num_prompts * N
    correct: int = 0  # accuracy reward 1
    formatted: int = 0  # format reward 1
    truncated: int = 0  # hit max_tokens
    duplicates: int = 0  # passed the checks but repeats a sample already kept for the same prompt
    capped: int = 0  # dropped by max_per_prompt
    kept: int = 0  # records written
    prompts_with_kept: int = 0  # prompts that contributed at least one record
    pass_at_1: float = 0.0  # mean over prompts of (correct samples / N): the sampling policy's accuracy
    pass_at_n: float = 0.0  # fraction of prompts with at least one correct sample
    mean_length: float = 0.0  # mean completion tokens over all samples

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (f"kept {self.kept}/{self.total} samples ({self.prompts_with_kept}/{self.num_prompts} prompts); "
                f"pass@1 {self.pass_at_1:.3f}, pass@{self.num_samples} {self.pass_at_n:.3f}; "
                f"correct {self.correct}, formatted {self.formatted}, truncated {self.truncated}, "
                f"duplicates {self.duplicates}, capped {self.capped}; mean length {self.mean_length:.1f} tokens")


@dataclass
class RejectionResult:
    records: list[dict[str, Any]]  # the kept chat records, in prompt order
    samples: list[list[ScoredSample]]  # every sample, grouped by prompt
    stats: RejectionStats
    assistant_prefix: str = ""  # what the prompt template opened for the assistant (e.g. "<think>\n")
    kept_mask: list[list[bool]] = field(default_factory=list)  # which samples became records


def assistant_prefix(tokenizer: Any, template: str) -> str:
    """The text the prompt template already wrote into the assistant turn (R1's chat template: "<think>\\n").

    Found by rendering the generation prompt with and without thinking, so it follows any chat template.
    The plain-text "r1-zero" template opens nothing: the completion holds the whole answer.
    """
    if template != "chat":
        return ""
    messages = [{"role": "user", "content": "?"}]
    opened = tokenizer.apply_chat_template(messages, add_generation_prompt=True, thinking=True, tokenize=False)
    closed = tokenizer.apply_chat_template(messages, add_generation_prompt=True, thinking=False, tokenize=False)
    return opened[len(closed):] if opened.startswith(closed) else ""


def chat_record(example: dict[str, Any], completion: str, prefix: str = "") -> dict[str, Any]:
    """An SFT chat record for one sample: the question as the user turn, prefix + completion as the answer."""
    content = prefix + (completion.lstrip() if not prefix else completion)
    record: dict[str, Any] = {"messages": [{"role": "user", "content": example["question"]},
                                           {"role": "assistant", "content": content}]}
    if "answer" in example:
        record["answer"] = str(example["answer"])
    return record


def _check_examples(examples: list[dict[str, Any]]) -> None:
    if not examples:
        raise ValueError("no prompts to sample from")
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or not isinstance(ex.get("question"), str):
            raise ValueError(f"examples[{i}]: needs a string 'question'")
        if ex.get("answer") is None:
            raise ValueError(f"examples[{i}]: needs an 'answer' to check samples against")


def _reward_kwargs(example: dict[str, Any]) -> dict[str, Any]:
    """Rewards take the prompt and completion positionally, the rest of the example by keyword."""
    return {k: v for k, v in example.items() if k not in ("prompt", "completion")}


def sample_and_score(llm: LLM, tokenizer: Any, examples: list[dict[str, Any]], num_samples: int = 8, *,
                     template: str = "chat", temperature: float = 1.0, top_p: float = 1.0, max_tokens: int = 256,
                     seed: int | None = 0) -> list[list[ScoredSample]]:
    """`num_samples` completions per example from `llm` (prefix-shared), each checked by accuracy and format.

    Example i is sampled with seed `seed + i`, so a run is reproducible whatever the batch composition.
    """
    _check_examples(examples)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    prompts, ids = [], []
    for ex in examples:
        text, tok = render_prompt(tokenizer, ex["question"], template)
        prompts.append(text)
        ids.append(list(tok))
    params = [SamplingParams(n=num_samples, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                             seed=None if seed is None else seed + i) for i in range(len(examples))]
    llm.model.eval()
    outputs = llm.generate(ids, params)
    groups = []
    for i, (prompt, ex, out) in enumerate(zip(prompts, examples, outputs, strict=True)):
        kwargs = _reward_kwargs(ex)
        groups.append([ScoredSample(i, prompt, c.text, list(c.token_ids), c.finish_reason,
                                    accuracy_reward(prompt, c.text, **kwargs) >= 1.0,
                                    format_reward(prompt, c.text, **kwargs) >= 1.0) for c in out.outputs])
    return groups


def select_samples(groups: list[list[ScoredSample]], *, require_correct: bool = True, require_format: bool = True,
                   dedupe: bool = True, max_per_prompt: int | None = None) -> tuple[list[list[bool]], RejectionStats]:
    """Which samples to keep (the rules in the module docstring) and the pass's statistics."""
    if max_per_prompt is not None and max_per_prompt < 1:
        raise ValueError(f"max_per_prompt must be >= 1 (or None for no cap), got {max_per_prompt}")
    stats = RejectionStats(num_prompts=len(groups), num_samples=max((len(g) for g in groups), default=0))
    keep: list[list[bool]] = []
    pass1, lengths = 0.0, 0
    for group in groups:
        seen: set[str] = set()
        flags = []
        n_correct = sum(s.correct for s in group)
        pass1 += n_correct / max(len(group), 1)
        stats.pass_at_n += n_correct > 0
        for s in group:
            stats.total += 1
            stats.correct += s.correct
            stats.formatted += s.formatted
            stats.truncated += not s.finished
            lengths += s.num_tokens
            ok = s.finished and (s.correct or not require_correct) and (s.formatted or not require_format)
            if ok and dedupe and s.completion in seen:
                stats.duplicates += 1
                ok = False
            if ok and max_per_prompt is not None and sum(flags) >= max_per_prompt:
                stats.capped += 1
                ok = False
            if ok:
                seen.add(s.completion)
            flags.append(ok)
        kept = sum(flags)
        stats.kept += kept
        stats.prompts_with_kept += kept > 0
        keep.append(flags)
    if groups:
        stats.pass_at_1 = pass1 / len(groups)
        stats.pass_at_n = stats.pass_at_n / len(groups)
    stats.mean_length = lengths / max(stats.total, 1)
    return keep, stats


def rejection_sample(llm: LLM, tokenizer: Any, examples: list[dict[str, Any]], num_samples: int = 8, *,
                     template: str = "chat", temperature: float = 1.0, top_p: float = 1.0, max_tokens: int = 256,
                     seed: int | None = 0, require_correct: bool = True, require_format: bool = True,
                     dedupe: bool = True, max_per_prompt: int | None = None) -> RejectionResult:
    """Sample N per prompt, keep the correct ones (see the module docstring), return records and statistics.

    Args:
        llm: the engine around the model to sample from (its prefix cache must match the current weights).
        tokenizer: the model's tokenizer (renders prompts).
        examples: dicts with "question" and "answer" (and whatever else the rewards read).
        num_samples: N.
        template: "chat" (R1's chat template, opens `<think>`) or "r1-zero" (plain-text R1-Zero template).
        temperature, top_p, max_tokens, seed: sampling; example i uses seed + i.
        require_correct: keep only correct samples (False keeps every finished one: a teacher's raw traces).
        require_format: also require the strict `<think>`/`<answer>` format (R1's "readable" filter).
        dedupe: drop verbatim repeats within a prompt's kept samples.
        max_per_prompt: keep at most this many per prompt (None: all correct ones).
    """
    groups = sample_and_score(llm, tokenizer, examples, num_samples, template=template, temperature=temperature,
                              top_p=top_p, max_tokens=max_tokens, seed=seed)
    keep, stats = select_samples(groups, require_correct=require_correct, require_format=require_format,
                                 dedupe=dedupe, max_per_prompt=max_per_prompt)
    prefix = assistant_prefix(tokenizer, template)
    records = [chat_record(examples[s.example_index], s.completion, prefix)
               for group, flags in zip(groups, keep) for s, k in zip(group, flags) if k]
    return RejectionResult(records, groups, stats, prefix, keep)


def sample_records(result: RejectionResult, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every sample (not only the kept ones) as a chat record annotated with its checks, for inspection."""
    out = []
    for group, flags in zip(result.samples, result.kept_mask or [[False] * len(g) for g in result.samples]):
        for s, kept in zip(group, flags):
            record = chat_record(examples[s.example_index], s.completion, result.assistant_prefix)
            record.update(correct=s.correct, formatted=s.formatted, finish_reason=s.finish_reason, kept=kept)
            out.append(record)
    return out


def sample_to_file(model: str | os.PathLike, output: str | os.PathLike, examples: list[dict[str, Any]],
                   num_samples: int = 8, *, rejection: bool = True, device: Any = "cpu", template: str = "chat",
                   temperature: float = 1.0, top_p: float = 1.0, max_tokens: int = 256, seed: int | None = 0,
                   require_format: bool = True, dedupe: bool = True,
                   max_per_prompt: int | None = None) -> tuple[int, RejectionStats, dict[str, Any]]:
    """`r1forge sample` as a call: load the policy at `model` (a checkpoint or run directory), sample N per prompt,
    write `output` (the kept records, or with `rejection=False` every sample annotated with its checks) and
    OUTPUT.stats.json beside it. Returns (records written, the pass's statistics, what the stats file holds)."""
    from r1forge.data.jsonl import write_json, write_jsonl
    from r1forge.rl.policy import load_policy, sampling_engine

    policy, tokenizer, model_dir = load_policy(model, device, key="MODEL")
    llm = sampling_engine(policy, tokenizer, examples, template, max_tokens, len(examples) * num_samples)
    result = rejection_sample(llm, tokenizer, examples, num_samples, template=template, temperature=temperature,
                              top_p=top_p, max_tokens=max_tokens, seed=seed, require_format=require_format,
                              dedupe=dedupe, max_per_prompt=max_per_prompt)
    output = Path(output)
    count = write_jsonl(output, result.records if rejection else sample_records(result, examples))
    stats = {"model": str(model_dir), "rejection": rejection, **result.stats.to_dict()}
    write_json(output.with_name(output.stem + ".stats.json"), stats)
    return count, result.stats, stats
