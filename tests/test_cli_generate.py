"""`r1forge generate` and `r1forge chat`: prompts from flags and files, the engine's own output, a conversation
kept across turns, reasoning shown dimmed and apart from the answer, one-line errors."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import r1forge
from conftest import randomise_
from r1forge.cli import main
from r1forge.commands.chat import DIM, RESET, chat_turn
from r1forge.data import load_tokenizer, make_pretrain_corpus, train_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("model")
    train_tokenizer(None, out, vocab_size=320, texts=make_pretrain_corpus(300, 0))
    tok = load_tokenizer(out)
    torch.manual_seed(0)
    model = r1forge.build_model(r1forge.ModelConfig.from_preset(
        "tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    randomise_(model, std=0.3)  # decisive logits: greedy output does not depend on batching
    model.save_pretrained(out)
    return out


def test_generate_prints_what_the_engine_generates(model_dir: Path, tmp_path: Path, capsys) -> None:
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("The cat sat\n\n" + json.dumps({"prompt": "Five plus two"}) + "\n")
    args = ["generate", str(model_dir), "--prompt", "What is 2 + 3?", "--prompts-file", str(prompts_file),
            "--max-tokens", "6", "--json", "--device", "cpu"]
    assert main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["What is 2 + 3?", "The cat sat", "Five plus two"]
    llm = r1forge.LLM(model_dir, device="cpu")
    expected = llm.generate([r["prompt"] for r in rows], r1forge.SamplingParams(temperature=0.0, max_tokens=6))
    for row, out in zip(rows, expected):
        assert row["text"] == out.outputs[0].text and row["num_tokens"] == len(out.outputs[0].token_ids) <= 6
        assert row["finish_reason"] in ("stop", "length")


def test_generate_errors_are_one_line(model_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    assert "model directory not found" in capsys.readouterr().err
    assert main(["generate", str(model_dir), "--prompt", "hi", "--device", "cpu", "--cuda-graphs"]) == 2
    assert "cuda_graphs needs a CUDA device" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no prompt key"}) + "\n")
    with pytest.raises(SystemExit, match=r"bad\.jsonl:1: expected a JSON object with 'prompt'"):
        main(["generate", str(model_dir), "--prompts-file", str(bad)])


@dataclass
class _Delta:
    text: str


class _ScriptedLLM:
    """Streams a fixed reply and records the conversations it was asked to continue."""

    def __init__(self, tokenizer, replies: list[str]) -> None:
        self.tokenizer = tokenizer
        self.replies = replies
        self.conversations: list[list[dict]] = []
        self._apply = tokenizer.apply_chat_template

    def stream(self, ids, params):
        reply = self.replies[len(self.conversations) - 1]
        for i in range(0, len(reply), 3):  # split across deltas, tags included
            yield _Delta(reply[i:i + 3])


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _recording(llm: _ScriptedLLM):
    def apply_chat_template(messages, **kwargs):
        llm.conversations.append([dict(m) for m in messages])
        return llm._apply(messages, **kwargs)
    return apply_chat_template


def test_chat_turn_dims_reasoning_and_returns_the_answer(model_dir: Path) -> None:
    tok = load_tokenizer(model_dir)
    llm = _ScriptedLLM(tok, ["Two and three make five.</think>\n\nThe answer is 5."])
    tok.apply_chat_template = _recording(llm)
    out = _TTY()
    answer = chat_turn(llm, [{"role": "user", "content": "What is 2 + 3?"}], None, thinking=True, out=out)
    assert answer == "The answer is 5."
    text = out.getvalue()
    assert text.startswith(DIM + "[thinking] Two and three make five.")
    assert RESET + "\n\nThe answer is 5." in text and "</think>" not in text


def test_chat_keeps_the_conversation(model_dir: Path, monkeypatch, capsys) -> None:
    tok = load_tokenizer(model_dir)
    llm = _ScriptedLLM(tok, ["Adding.</think>\n\n5", "Doubling.</think>\n\n10"])
    tok.apply_chat_template = _recording(llm)
    monkeypatch.setattr(r1forge, "LLM", lambda *args, **kwargs: llm)
    turns = iter(["What is 2 + 3?", "And twice that?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(turns))
    assert main(["chat", str(model_dir), "--system", "Be brief."]) == 0
    assert llm.conversations[1] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"}, {"role": "user", "content": "And twice that?"}]
    printed = capsys.readouterr().out
    assert "[thinking] Adding." in printed and "\n\n10" in printed
