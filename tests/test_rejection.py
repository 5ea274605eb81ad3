"""Rejection sampling: the written SFT dataset holds only correct samples, and `r1forge sft` trains on it.

The teacher is a tiny MoE model trained in seconds on a copy task ("Repeat 472." -> "The number is 472."
then `<answer>472</answer>`): easy enough to learn on a CPU in a few hundred steps, hard enough that sampling
at temperature 1 still gets some answers wrong. Held-out numbers (multiples of 7) never occur in its training.
`tiny_teacher` caches it in the session's temporary directory, so test_distill.py reuses the same one.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from r1forge import ModelConfig, build_model
from r1forge.data import SFTDataset, StatefulLoader, load_tokenizer, read_jsonl, train_tokenizer
from r1forge.engine import LLM
from r1forge.rl.examples import read_examples
from r1forge.data.jsonl import write_jsonl
from r1forge.rl.rejection import ScoredSample, assistant_prefix, rejection_sample, select_samples
from r1forge.rl.rewards import accuracy_reward, format_reward
from r1forge.train import LogConfig, Trainer, TrainConfig, latest_checkpoint

TEACHER_STEPS = 300  # one question wording: the copy is learnt in ~200 steps (three wordings need far more)


def copy_examples(n: int, seed: int, held_out: bool) -> list[dict[str, Any]]:
    """n distinct copy problems; held-out ones use numbers divisible by 7, which training never shows."""
    rng = random.Random(seed)
    out: dict[str, dict[str, Any]] = {}
    while len(out) < n:
        v = rng.randint(10, 999)
        if (v % 7 == 0) != held_out:
            continue
        question = f"Repeat {v}."
        out[question] = {"question": question, "answer": str(v)}
    return list(out.values())


def copy_messages(example: dict[str, Any]) -> list[dict[str, str]]:
    answer = example["answer"]
    return [{"role": "user", "content": example["question"]},
            {"role": "assistant", "content": f"<think>\nThe number is {answer}.\n</think>\n<answer>{answer}</answer>"}]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models run as fast on one thread, and do not slow down tenfold when other jobs share the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


def quiet_log() -> LogConfig:
    return LogConfig(log_every=50, eval_every=0, eval_batches=0, save_every=0, keep_last=1, tensorboard=False,
                     progress=False)


def tiny_teacher(base: Path) -> Path:
    """A trained tiny MoE teacher checkpoint (with tokenizer) under `base`, built once per session."""
    run_dir = base / "copy-teacher"
    done = latest_checkpoint(run_dir / "checkpoints")
    if done is not None:
        return done
    train = copy_examples(800, 0, held_out=False)
    train_tokenizer(None, run_dir / "tokenizer", vocab_size=300,
                    texts=[m["content"] for ex in train for m in copy_messages(ex)])
    tok = load_tokenizer(run_dir / "tokenizer")
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=0,
                                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
    assert config.is_moe
    model = build_model(config)
    data = SFTDataset(tok, 64, records=[{"messages": copy_messages(ex)} for ex in train])
    train_cfg = TrainConfig(steps=TEACHER_STEPS, batch_size=16, lr=4e-3, warmup_steps=10, weight_decay=0.0,
                            mtp_lambda=0.0, device="cpu")
    with one_thread():
        result = Trainer(model, StatefulLoader(data, 16, seed=0), train_cfg, quiet_log(), run_dir, tokenizer=tok).fit()
    assert result.status == "completed" and result.checkpoint is not None
    return result.checkpoint


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_teacher(tmp_path_factory.getbasetemp())


def _completion(record: dict[str, Any], prefix: str) -> str:
    content = record["messages"][1]["content"]
    assert content.startswith(prefix)
    return content[len(prefix):]


def test_rejection_sampling_keeps_only_correct_samples(teacher_dir: Path, tmp_path: Path) -> None:
    from r1forge.data import tokenize_chat, validate_chat_record
    from r1forge.rl.templates import render_prompt

    llm = LLM(str(teacher_dir), block_size=16, max_model_len=64)
    tok = llm.tokenizer
    examples = copy_examples(16, 5, held_out=False)
    gold = {ex["question"]: ex["answer"] for ex in examples}
    # Hot sampling (tau 1.5) makes a good teacher slip often enough for both kinds of samples to occur.
    result = rejection_sample(llm, tok, examples, 8, temperature=1.5, max_tokens=32, seed=0)
    stats = result.stats
    samples = [s for group in result.samples for s in group]

    # Samples of both kinds were drawn, the wrong ones were dropped, the right ones kept (repeats aside).
    assert stats.total == len(samples) == 16 * 8
    assert stats.correct == sum(s.correct for s in samples)
    assert 0 < stats.kept == len(result.records) <= stats.correct < stats.total
    wrong = [s for s in samples if not s.correct]
    assert len(wrong) >= 3
    assert stats.pass_at_1 == pytest.approx(stats.correct / stats.total)
    assert stats.pass_at_n == pytest.approx(sum(any(s.correct for s in g) for g in result.samples) / 16)
    assert stats.prompts_with_kept == sum(any(row) for row in result.kept_mask)

    path = tmp_path / "data" / "rs.jsonl"
    assert write_jsonl(path, result.records) == stats.kept
    assert [p.name for p in path.parent.iterdir()] == ["rs.jsonl"]  # no temporary file left behind
    written, skipped = read_jsonl(path, validate_chat_record)
    assert skipped == 0 and written == result.records
    prefix = assistant_prefix(tok, "chat")
    assert prefix == "<think>\n"
    kept_by_question: dict[str, set[str]] = {}
    exact = 0
    for record in written:
        question = record["messages"][0]["content"]
        prompt, prompt_ids = render_prompt(tok, question, "chat")
        completion = _completion(record, prefix)
        # Re-checked against the reference answer of the problem, not the record's own copy of it.
        assert accuracy_reward(prompt, completion, answer=gold[question]) == 1.0
        assert format_reward(prompt, completion) == 1.0
        assert record["answer"] == gold[question]
        assert completion not in kept_by_question.get(question, set())  # deduplicated
        kept_by_question.setdefault(question, set()).add(completion)
        # SFT on the record trains on the sampled text, eos included, after exactly the same prompt tokens.
        sample = next(s for s in samples if s.prompt == prompt and s.completion == completion)
        ids, _ = tokenize_chat(tok, record["messages"])
        assert ids[:len(prompt_ids)] == prompt_ids and sample.token_ids[-1] == tok.eos_token_id
        assert tok.decode(ids[len(prompt_ids):]) == tok.decode(sample.token_ids)
        exact += ids == prompt_ids + sample.token_ids
    assert exact >= len(written) // 2  # most samples come in the canonical tokenization: the very same tokens
    for s in wrong:
        assert s.completion not in kept_by_question.get(examples[s.example_index]["question"], set())
    assert len(SFTDataset(tok, 64, files=[path])) == stats.kept


def test_sample_command_writes_a_dataset_that_sft_trains_on(teacher_dir: Path, tmp_path: Path) -> None:
    from r1forge.cli import main
    from r1forge.train import SFTRunConfig, load_run_config, run_sft

    prompts = tmp_path / "prompts.jsonl"
    examples = copy_examples(6, 11, held_out=False)
    prompts.write_text("".join(json.dumps(ex) + "\n" for ex in examples))
    gold = {ex["question"]: ex["answer"] for ex in examples}
    out = tmp_path / "rs.jsonl"
    common = [str(teacher_dir), "--prompts", str(prompts), "-n", "4", "--max-tokens", "32", "--device", "cpu"]
    assert main(["sample", *common, "--rejection", "-o", str(out)]) == 0
    records, _ = read_jsonl(out)
    stats = json.loads((tmp_path / "rs.stats.json").read_text())
    assert stats["rejection"] and stats["total"] == 24 and stats["kept"] == len(records) > 0
    for record in records:
        question, answer = record["messages"][0]["content"], record["messages"][1]["content"]
        assert accuracy_reward("", answer, answer=gold[question]) == 1.0
    # Without --rejection every sample is written, annotated; the kept ones are the same as above.
    everything = tmp_path / "all.jsonl"
    assert main(["sample", *common, "-o", str(everything)]) == 0
    rows, _ = read_jsonl(everything)
    assert len(rows) == 24 and sum(r["kept"] for r in rows) == len(records)
    assert [r["messages"] for r in rows if r["kept"]] == [r["messages"] for r in records]
    assert all(r["correct"] == (accuracy_reward("", r["messages"][1]["content"],
                                                answer=gold[r["messages"][0]["content"]]) == 1.0) for r in rows)
    # The dataset is what `r1forge sft` reads through data.files.
    cfg = load_run_config(SFTRunConfig, None, [
        "--run_dir", str(tmp_path / "sft"), "--model.init_from", str(teacher_dir), "--data.files", str(out),
        "--data.max_len", "64", "--data.synthetic_eval_problems", "2", "--train.steps", "2", "--train.batch_size",
        "2", "--train.warmup_steps", "1", "--train.device", "cpu", "--log.eval_batches", "0", "--log.progress",
        "false", "--log.tensorboard", "false"])
    assert run_sft(cfg).status == "completed"
    # User errors are one line and exit code 2.
    assert main(["sample", str(tmp_path / "missing"), "-o", str(out)]) == 2
    assert main(["sample", *common, "-n", "0", "-o", str(out)]) == 2


def _sample(completion: str, correct: bool = True, formatted: bool = True, reason: str = "stop") -> ScoredSample:
    return ScoredSample(0, "p", completion, [1, 2, 3], reason, correct, formatted)


def test_select_samples_rules() -> None:
    group = [_sample("a"), _sample("a"), _sample("b", correct=False), _sample("c", formatted=False),
             _sample("d", reason="length"), _sample("e"), _sample("f")]
    keep, stats = select_samples([group, [_sample("x", correct=False)]])
    assert keep[0] == [True, False, False, False, False, True, True] and keep[1] == [False]
    assert (stats.total, stats.correct, stats.kept, stats.duplicates, stats.truncated) == (8, 6, 3, 1, 1)
    assert stats.pass_at_1 == pytest.approx((6 / 7 + 0) / 2) and stats.pass_at_n == 0.5
    assert stats.prompts_with_kept == 1
    keep, stats = select_samples([group], require_format=False, dedupe=False, max_per_prompt=4)
    assert keep[0] == [True, True, False, True, False, True, False] and stats.capped == 1  # a, a, c, e
    keep, _ = select_samples([group], require_correct=False, require_format=False)
    assert keep[0] == [True, False, True, True, False, True, True]
    with pytest.raises(ValueError, match="max_per_prompt"):
        select_samples([group], max_per_prompt=0)


def test_bad_inputs_name_what_is_wrong(tmp_path: Path) -> None:
    from r1forge.data import DataError

    with pytest.raises(ValueError, match=r"examples\[1\].*answer"):
        rejection_sample(None, None, [{"question": "q", "answer": "1"}, {"question": "q"}])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_samples"):
        rejection_sample(None, None, [{"question": "q", "answer": "1"}], 0)  # type: ignore[arg-type]
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"question": "Repeat 12.", "answer": 12}\n\n{"question": "Repeat 13."}\n')
    with pytest.raises(DataError, match=r"prompts.jsonl:3: .*answer"):
        read_examples(bad)
    bad.write_text('{"messages": [{"role": "user", "content": "Repeat 12."}], "answer": 12}\n')
    assert read_examples(bad) == [{"question": "Repeat 12.", "answer": "12"}]
