"""Datasets and corpora: packing boundaries, SFT masks, malformed input, exact resume, synthetic problems."""

from __future__ import annotations

import itertools
import json
import re

import pytest
import torch

from r1forge.data import (
    IGNORE_INDEX, DataError, PretrainDataset, SFTDataset, StatefulLoader, load_tokenizer, make_pretrain_corpus,
    make_problems, pretrain_text, problem_split, rl_example, sft_messages, train_tokenizer, write_jsonl,
)
from r1forge.data.chat_template import ASSISTANT, BOS, EOS


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(None, out, vocab_size=768, texts=make_pretrain_corpus(800, seed=0))
    return load_tokenizer(out)


# ---------------------------------------------------------------- pretraining


def test_packing_respects_document_boundaries(tok):
    docs = [f"Document {i}: " + "word " * (i % 7 + 1) for i in range(40)]
    ds = PretrainDataset(tok, seq_len=16, texts=docs, seed=None)
    stream = torch.cat([torch.tensor([tok.bos_token_id] + tok.encode(d) + [tok.eos_token_id]) for d in docs])
    assert ds.num_tokens == len(stream) and len(ds) == (len(stream) - 1) // 16
    is_start = stream == tok.bos_token_id
    for i in range(len(ds)):
        row, s = ds[i], i * 16
        assert row["input_ids"].tolist() == stream[s : s + 16].tolist()
        expected = stream[s + 1 : s + 17].masked_fill(is_start[s + 1 : s + 17], IGNORE_INDEX)
        assert row["labels"].tolist() == expected.tolist()
        # Positions count up from 0 at every document start, and from 0 at the row start.
        pos = row["position_ids"].tolist()
        assert pos[0] == 0
        for t in range(1, 16):
            assert pos[t] == (0 if is_start[s + t] else pos[t - 1] + 1)
    # Exactly one label is masked per document boundary, and none elsewhere.
    labels = torch.cat([ds[i]["labels"] for i in range(len(ds))])
    assert int((labels == IGNORE_INDEX).sum()) == int(is_start[1 : len(labels) + 1].sum())


def test_pretrain_reads_files_and_reports_bad_lines(tok, tmp_path):
    good = tmp_path / "docs.jsonl"
    good.write_text('{"text": "one two three"}\n\n{"text": "four five"}\n', encoding="utf-8")
    txt = tmp_path / "plain.txt"
    txt.write_text("first doc\n\nsecond doc\n\n\nthird doc", encoding="utf-8")
    ds = PretrainDataset(tok, seq_len=4, files=[good, txt], text_separator="\n\n", seed=None)
    assert ds.num_documents == 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n{broken\n{"body": "x"}\n["list"]\n{"text": "also fine"}\n',
                   encoding="utf-8")
    with pytest.raises(DataError, match="bad.jsonl:2: 'text' must be a string"):
        PretrainDataset(tok, seq_len=4, files=[bad])
    ds = PretrainDataset(tok, seq_len=4, files=[bad], skip_malformed=True)
    assert ds.num_skipped == 4 and ds.num_documents == 2
    for body, line, message in (("{broken", 1, "invalid JSON"), ('{"body": 1}', 1, "missing key 'text'"),
                                ('{"text": "a"}\n[1]', 2, "expected a JSON object")):
        bad.write_text(body + "\n", encoding="utf-8")
        with pytest.raises(DataError, match=f"bad.jsonl:{line}: {message}") as err:
            PretrainDataset(tok, seq_len=4, files=[bad])
        assert isinstance(err.value, ValueError) and err.value.line == line
    with pytest.raises(ValueError, match="fewer than one row"):
        PretrainDataset(tok, seq_len=10_000, texts=["short"])


def test_pretrain_is_deterministic_in_seed(tok):
    docs = make_pretrain_corpus(60, seed=3)
    a, b = PretrainDataset(tok, 32, texts=docs, seed=1), PretrainDataset(tok, 32, texts=docs, seed=1)
    c = PretrainDataset(tok, 32, texts=docs, seed=2)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)


# ---------------------------------------------------------------- SFT

TOOL_CONV = {"messages": [
    {"role": "system", "content": "You can look things up."}, {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
    {"role": "tool", "content": "-3C"}, {"role": "assistant", "content": "It is -3C in Oslo."}],
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]}


def _trained_text(tok, sample) -> str:
    labels = sample["labels"]
    return tok.decode(labels[labels != IGNORE_INDEX].tolist())


def test_sft_labels_cover_exactly_the_assistant_tokens(tok):
    problems = make_problems(3, seed=0)
    multi = {"messages": [*sft_messages(problems[0]), *sft_messages(problems[1])]}
    ds = SFTDataset(tok, max_len=1024, records=[{"messages": sft_messages(problems[2])}, multi, TOOL_CONV])
    answer = lambda p: sft_messages(p)[1]["content"] + EOS  # noqa: E731
    assert _trained_text(tok, ds[0]) == answer(problems[2])
    assert _trained_text(tok, ds[1]) == answer(problems[0]) + answer(problems[1])
    calls = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": "
             "\"Oslo\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>")
    assert _trained_text(tok, ds[2]) == calls + EOS + "It is -3C in Oslo." + EOS
    for i in range(len(ds)):
        sample = ds[i]
        ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
        # Shifted: a label is the next input token; the turn opener itself is never a target.
        for t, label in enumerate(labels):
            if label != IGNORE_INDEX:
                assert label == ids[t + 1] and label != tok.token_to_id(ASSISTANT)
        assert ids[0] == tok.bos_token_id and labels[-1] == IGNORE_INDEX
        assert sample["position_ids"].tolist() == list(range(len(ids)))
    # The reasoning is kept in SFT renders (keep_reasoning=True).
    assert "<think>" in tok.decode(ds[1]["input_ids"].tolist()).split(ASSISTANT)[1]


def test_sft_padding_packing_and_truncation(tok):
    records = [{"messages": sft_messages(p)} for p in make_problems(12, seed=1)]
    plain = SFTDataset(tok, max_len=512, records=records)
    batch = plain.collate([plain[0], plain[1], plain[2]])
    lengths = [len(plain[i]["input_ids"]) for i in range(3)]
    assert batch["input_ids"].shape == (3, max(lengths))
    for b, n in enumerate(lengths):
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all() and (batch["input_ids"][b, n:] == tok.pad_token_id).all()
    packed = SFTDataset(tok, max_len=160, records=records, packing=True, seed=None)
    assert len(packed) < len(records)
    trained = []
    for i in range(len(packed)):
        row = packed[i]
        assert row["input_ids"].shape == (160,)
        starts = (row["position_ids"] == 0) & (row["attention_mask"] == 1)
        assert row["input_ids"][starts].tolist() == [tok.bos_token_id] * int(starts.sum())
        # The token before each new conversation trains on nothing: no loss across the boundary.
        assert all(row["labels"][t - 1] == IGNORE_INDEX for t in starts.nonzero().flatten().tolist() if t > 0)
        trained.append(_trained_text(tok, row))
    assert "".join(trained) == "".join(sft_messages(p)[1]["content"] + EOS for p in make_problems(12, seed=1))
    # Cut short: the problems keep part of their answer, a conversation whose answer lies past max_len is dropped.
    max_len = min(lengths) - 2
    cut = SFTDataset(tok, max_len=max_len, records=records[:3] + [{"messages": [
        {"role": "user", "content": "word " * max_len}, {"role": "assistant", "content": "ok"}]}])
    assert cut.num_truncated == 4 and cut.num_dropped == 1 and len(cut) == 3


def test_sft_malformed_lines(tok, tmp_path):
    good = json.dumps({"messages": sft_messages(make_problems(1, seed=0)[0])})
    cases = [
        ("{not json", "invalid JSON"),
        (json.dumps({"conversation": []}), "missing key 'messages'"),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), r"messages\[0\].role must be one of"),
        (json.dumps({"messages": [{"role": "user", "content": 5}]}), r"messages\[0\].content must be a string"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no assistant message"),
        (json.dumps({"messages": "hello"}), "'messages' must be a non-empty list"),
    ]
    path = tmp_path / "chat.jsonl"
    for body, message in cases:
        path.write_text(good + "\n" + body + "\n", encoding="utf-8")
        with pytest.raises(DataError, match=f"chat.jsonl:2: {message}"):
            SFTDataset(tok, max_len=256, files=[path])
    path.write_text("\n".join([good] + [body for body, _ in cases] + [good]) + "\n", encoding="utf-8")
    ds = SFTDataset(tok, max_len=256, files=[path], skip_malformed=True)
    assert ds.num_skipped == len(cases) and len(ds) == 2
    with pytest.raises(ValueError, match=r"records\[1\]: missing key 'messages'"):
        SFTDataset(tok, max_len=256, records=[json.loads(good), {"text": "x"}])


# ---------------------------------------------------------------- loader


def _ids(batches) -> list[list[int]]:
    return [b["input_ids"][:, 0].tolist() for b in batches]


class _Numbers:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([i, i])}


def test_loader_resume_replays_identical_batches(tok):
    ds = PretrainDataset(tok, 16, texts=make_pretrain_corpus(80, seed=5))
    loader = StatefulLoader(ds, batch_size=4, seed=7)
    steps = loader.batches_per_epoch + 3  # resume across an epoch boundary
    for _ in range(steps):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))  # what a checkpoint stores
    expected = [next(loader) for _ in range(loader.batches_per_epoch + 2)]
    resumed = StatefulLoader(ds, batch_size=4, seed=7)
    resumed.load_state_dict(state)
    got = [next(resumed) for _ in range(len(expected))]
    for a, b in zip(expected, got, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="batch_size=4"):
        StatefulLoader(ds, batch_size=2, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=7"):
        StatefulLoader(ds, batch_size=4, seed=8).load_state_dict(state)


def test_loader_epochs_shards_and_seeds():
    ds = _Numbers(23)
    loader = StatefulLoader(ds, batch_size=5, seed=0)
    epoch0 = _ids(itertools.islice(loader, 4))
    epoch1 = _ids(itertools.islice(loader, 4))
    assert len(set(sum(epoch0, []))) == 20 and epoch0 != epoch1 and loader.epoch == 1
    assert _ids(itertools.islice(StatefulLoader(ds, 5, seed=0), 4)) == epoch0
    assert _ids(itertools.islice(StatefulLoader(ds, 5, seed=1), 4)) != epoch0
    shards = [_ids(itertools.islice(StatefulLoader(ds, 5, seed=0, rank=r, world_size=2), 2)) for r in (0, 1)]
    flat = [sum(s, []) for s in shards]
    assert not set(flat[0]) & set(flat[1]) and len(flat[0]) == len(flat[1]) == 10
    assert _ids(itertools.islice(StatefulLoader(ds, 5, shuffle=False), 2)) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    with pytest.raises(ValueError, match="fewer than one batch"):
        StatefulLoader(_Numbers(3), batch_size=4)


# ---------------------------------------------------------------- synthetic problems

STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)\.")


def _check_solution(problem) -> None:
    for step in problem.steps:
        m = STEP.fullmatch(step)
        assert m, step
        value = eval(f"{m[1]} {m[2]} {m[3]}")  # noqa: S307 - digits and one operator, matched above
        assert value == int(m[4]) and 0 <= value < 1000, step
    assert STEP.fullmatch(problem.steps[-1])[4] == problem.answer
    if problem.kind == "expression":
        assert eval(problem.meta["expression"]) == int(problem.answer)  # noqa: S307
    if problem.kind == "equation":
        lhs, rhs = (re.sub(r"(\d)([x(])", r"\1*\2", side) for side in problem.meta["equation"].split("="))
        x = int(problem.answer)
        assert eval(lhs, {"x": x}) == eval(rhs, {"x": x}), problem  # noqa: S307


def test_synthetic_answers_are_correct_and_splits_disjoint():
    train = make_problems(10_000, seed=0, split="train")
    test = make_problems(2_000, seed=0, split="test")
    test_other_seed = make_problems(1_000, seed=123, split="test", min_steps=2, max_steps=3)
    for p in train + test + test_other_seed:
        _check_solution(p)
    train_keys = {p.key for p in train}
    train_questions = {p.question for p in train}
    for p in test + test_other_seed:
        assert problem_split(p) == "test" and p.key not in train_keys and p.question not in train_questions
    assert all(problem_split(p) == "train" for p in train)
    assert len(train_keys) == len(train)  # distinct within a call
    assert {p.kind for p in train} == {"word", "expression", "equation"}
    assert {len(p.steps) for p in train} == {1, 2, 3}
    assert len({p.question.split()[0] for p in train if p.kind == "word"}) > 10  # names and subjects vary


def test_synthetic_difficulty_determinism_and_renderers():
    hard = make_problems(300, seed=1, min_steps=4, max_steps=6)
    assert {len(p.steps) for p in hard} == {4, 5, 6} and all(p.kind != "equation" for p in hard)
    for p in hard:
        _check_solution(p)
    small = make_problems(300, seed=1, max_operand=9, kinds=("expression",))
    assert all(int(n) <= 12 for p in small for n in re.findall(r"\d+", p.question))
    assert make_problems(50, seed=4) == make_problems(50, seed=4) != make_problems(50, seed=5)
    p = make_problems(1, seed=0)[0]
    assert pretrain_text(p) == "\n".join([p.question, *p.steps, f"The answer is {p.answer}."])
    user, assistant = sft_messages(p)
    assert user == {"role": "user", "content": p.question}
    assert assistant["content"] == "<think>\n" + "\n".join(p.steps) + f"\n</think>\n<answer>{p.answer}</answer>"
    ex = rl_example(p)
    assert ex["answer"] == p.answer and p.question in ex["prompt"] and ex["prompt"].endswith("Assistant:")
    assert "<think> </think>" in ex["prompt"] and "<answer> </answer>" in ex["prompt"]
    assert ex["prompt"].endswith(f"User: {p.question} Assistant:")

    class _Chars:  # render_prompt's r1-zero text does not depend on the tokenizer
        bos_token_id = None

        def encode(self, text):
            return [ord(c) for c in text]

    from r1forge.rl.templates import render_prompt
    assert render_prompt(_Chars(), p.question, "r1-zero")[0] == ex["prompt"]  # RL renders what the data holds
    with pytest.raises(ValueError, match="split"):
        make_problems(1, seed=0, split="dev")
    with pytest.raises(ValueError, match="min_steps"):
        make_problems(1, seed=0, min_steps=3, max_steps=2)


def test_pretrain_corpus_mixes_text_and_holds_no_test_problem():
    corpus = make_pretrain_corpus(400, seed=2)
    assert corpus == make_pretrain_corpus(400, seed=2)
    worked = [d for d in corpus if "The answer is" in d]
    assert 0.5 < len(worked) / len(corpus) < 0.9 and len(corpus) - len(worked) > 50
    test_questions = {p.question for p in make_problems(3_000, seed=2, split="test")}
    assert not any(line in test_questions for doc in worked for line in doc.split("\n"))


def test_write_jsonl_round_trips_through_sft(tok, tmp_path):
    path = tmp_path / "sft.jsonl"
    write_jsonl(path, [{"messages": sft_messages(p)} for p in make_problems(5, seed=9)])
    ds = SFTDataset(tok, max_len=256, files=[path])
    assert len(ds) == 5 and tok.decode(ds[0]["input_ids"].tolist()).startswith(BOS)


def test_cold_start_shows_steps_for_a_share_of_problems_whatever_their_difficulty() -> None:
    from r1forge.data.synthetic import shows_steps
    from r1forge.rl.rewards import accuracy_reward, format_reward

    problems = make_problems(2000, seed=3, min_steps=1, max_steps=5)
    for level in range(1, 6):  # the coin does not depend on the number of steps
        at_level = [p for p in problems if len(p.steps) == level]
        share = sum(shows_steps(p, 0.5, seed=0) for p in at_level) / len(at_level)
        assert 0.4 < share < 0.6, (level, share)
    assert all(shows_steps(p, 1.0, seed=0) for p in problems[:50])
    assert not any(shows_steps(p, 0.0, seed=0) for p in problems[:50])
    assert [shows_steps(p, 0.5, seed=0) for p in problems[:50]] == [shows_steps(p, 0.5, seed=0) for p in problems[:50]]
    p = problems[0]
    terse = sft_messages(p, show_steps=False)[1]["content"]
    full = sft_messages(p)[1]["content"]
    assert all(step not in terse for step in p.steps) and all(step in full for step in p.steps)
    prompt = "<｜User｜>q<｜Assistant｜><think>\n"
    for text in (terse, full):  # both well-formed and correct (the prompt opened <think>)
        completion = text.removeprefix("<think>\n")
        assert format_reward(prompt, completion) == 1.0 and accuracy_reward(prompt, completion, answer=p.answer) == 1.0
    assert rl_example(p)["steps"] == len(p.steps)


def test_sft_config_shown_steps_fraction() -> None:
    from r1forge.train.config import SFTDataConfig
    from r1forge.train.data import sft_records

    cfg = SFTDataConfig(synthetic_problems=400, max_steps=5, shown_steps_fraction=0.5)
    train, _ = sft_records(cfg, seed=0)
    shown = sum("=" in r["messages"][1]["content"] for r in train) / len(train)
    assert 0.4 < shown < 0.6
    with pytest.raises(ValueError, match="data.shown_steps_fraction"):
        SFTDataConfig(shown_steps_fraction=1.5).validate()



def test_max_result_bounds_every_number_in_the_steps() -> None:
    from r1forge.train.config import SFTDataConfig

    problems = make_problems(500, seed=2, min_steps=1, max_steps=4, max_operand=12, max_result=99)
    numbers = [int(t) for p in problems for s in p.steps for t in s.rstrip(".").split() if t.isdigit()]
    assert max(numbers) <= 99 and {len(p.steps) for p in problems} == {1, 2, 3, 4}
    assert all(int(p.answer) <= 99 for p in problems)
    with pytest.raises(ValueError, match="max_result"):
        make_problems(5, seed=0, max_operand=50, max_result=20)
    with pytest.raises(ValueError, match="data.max_result"):
        SFTDataConfig(max_operand=12, max_result=1000).validate()


def test_tagged_fraction_writes_some_worked_problems_in_the_r1_format() -> None:
    plain = make_pretrain_corpus(300, seed=1, problem_fraction=1.0)
    assert plain == make_pretrain_corpus(300, seed=1, problem_fraction=1.0, tagged_fraction=0.0)
    tagged = make_pretrain_corpus(300, seed=1, problem_fraction=1.0, tagged_fraction=0.3)
    n_plain = sum(d.count("The answer is") for d in tagged)
    n_tagged = sum(d.count("<answer>") for d in tagged)
    assert 0.2 < n_tagged / (n_plain + n_tagged) < 0.4
    # the same problems in the same order: only their form changed
    assert [d.split("\n")[0] for d in tagged] == [d.split("\n")[0] for d in plain]
    doc = next(d for d in tagged if "<answer>" in d)
    assert "<think>\n" in doc and "</think>\n<answer>" in doc
