"""`r1forge tokenizer train`: from files or the built-in corpus, loadable by r1forge and transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1forge.cli import main
from r1forge.data import load_tokenizer


def test_tokenizer_from_the_builtin_corpus(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--synthetic", "200", "--vocab-size", "300", "--out", str(out)]) == 0
    assert "300 tokens" in capsys.readouterr().out
    tok = load_tokenizer(out)
    assert tok.vocab_size == 300
    assert tok.encode("12") == [tok.token_to_id("1"), tok.token_to_id("2")]  # digits split by default
    import transformers
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert hf("A shop has 12 pens.", add_special_tokens=False)["input_ids"] == tok.encode("A shop has 12 pens.")


def test_tokenizer_from_files(tmp_path: Path) -> None:
    text = tmp_path / "a.txt"
    text.write_text("the cat sat on the mat\n" * 50)
    chats = tmp_path / "b.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "zebra zebra zebra"}]}) + "\n")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--files", str(text), str(chats), "--vocab-size", "290",
                 "--min-frequency", "1", "--out", str(out)]) == 0
    tok = load_tokenizer(out)
    assert len(tok.encode(" the")) == 1 and len(tok.encode("zebra")) < 5


def test_tokenizer_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["tokenizer", "train", "--out", str(tmp_path / "t")]) == 2
    assert "give --files and/or --synthetic" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--synthetic", "10", "--vocab-size", "100", "--out", str(tmp_path / "t")]) == 2
    assert "vocab_size" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--files", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "t")]) == 2
    assert "missing.txt is not a file" in capsys.readouterr().err
