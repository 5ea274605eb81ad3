"""SFT: the labels the trainer actually feeds the loss train assistant tokens only; init from a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from r1forge import ModelConfig, build_model
from r1forge.data import IGNORE_INDEX, load_tokenizer, make_pretrain_corpus, train_tokenizer
from r1forge.data.chat_template import ASSISTANT, EOS
from r1forge.loading import load_model
from r1forge.train import SFTRunConfig, load_run_config, read_metrics, run_sft
from r1forge.train.loss import CausalLMLoss

CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 3 + 4?"},
                  {"role": "assistant", "content": "<think>\n3 + 4 = 7.\n</think>\n<answer>7</answer>"},
                  {"role": "user", "content": "And times 2?"},
                  {"role": "assistant", "content": "<think>\n7 * 2 = 14.\n</think>\n<answer>14</answer>"}]},
    {"messages": [{"role": "user", "content": "Say hello to Tom."},
                  {"role": "assistant", "content": "Hello, Tom."}]},
    {"messages": [{"role": "user", "content": "Compute 12 - 5."},
                  {"role": "assistant", "content": "<think>\n12 - 5 = 7.\n</think>\n<answer>7</answer>"}]},
]


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 'pretrained' checkpoint: a random tiny model with an MTP module, and its tokenizer."""
    out = tmp_path_factory.mktemp("init")
    train_tokenizer(None, out, vocab_size=320, texts=make_pretrain_corpus(300, 0))
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("tiny", vocab_size=load_tokenizer(out).vocab_size), with_mtp=True)
    model.save_pretrained(out)
    return out


def _assistant_targets(ids: list[int], assistant_id: int, eos_id: int) -> set[int]:
    """Positions t whose target (token t + 1) belongs to an assistant turn: its text and closing eos."""
    out, inside = set(), False
    for j, token in enumerate(ids):
        if inside and j > 0:
            out.add(j - 1)
        if token == assistant_id:
            inside = True
        elif token == eos_id:
            inside = False
    return out


def test_sft_feeds_labels_on_assistant_tokens_only(init_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS * 4))
    fed: list[dict[str, torch.Tensor]] = []
    original = CausalLMLoss.__call__

    def recording(self: CausalLMLoss, model: torch.nn.Module, batch: dict, norms: dict, n: int = 1):
        fed.append({k: v.clone() for k, v in batch.items()})
        return original(self, model, batch, norms, n)

    monkeypatch.setattr(CausalLMLoss, "__call__", recording)
    cfg = load_run_config(SFTRunConfig, None, [
        "--run_dir", str(tmp_path / "run"), "--model.init_from", str(init_dir), "--data.files", str(data),
        "--data.max_len", "96", "--train.steps", "4", "--train.batch_size", "3", "--train.warmup_steps", "1",
        "--log.log_every", "1", "--log.eval_every", "0", "--log.progress", "false", "--log.tensorboard", "false"])
    result = run_sft(cfg)
    assert result.status == "completed"
    tok = load_tokenizer(init_dir)
    assistant_id, eos_id = tok.token_to_id(ASSISTANT), tok.token_to_id(EOS)
    train_batches = [b for b in fed if b["input_ids"].shape[0] == 3]
    assert len(train_batches) == 4
    seen_texts = set()
    for batch in train_batches:
        for ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                     batch["attention_mask"].tolist(), strict=True):
            length = sum(mask)
            expected = _assistant_targets(ids[:length], assistant_id, eos_id)
            trained = {t for t, label in enumerate(labels) if label != IGNORE_INDEX}
            assert trained == expected
            assert all(labels[t] == ids[t + 1] for t in trained)
            targets = tok.decode([labels[t] for t in sorted(trained)])
            assert "User" not in targets and "Answer briefly" not in targets and "Say hello" not in targets
            seen_texts.add(targets)
    assert "Hello, Tom.<｜end▁of▁sentence｜>" in seen_texts
    assert any("<answer>14</answer>" in t and "<answer>7</answer>" in t for t in seen_texts)  # both turns
    # Started from the checkpoint's weights and tokenizer; the MTP module trained too (on assistant tokens:
    # mtp_labels keeps a depth-k target only where every label it spans is trained) and was saved.
    rows = read_metrics(tmp_path / "run")
    assert rows[0]["kind"] == "sft" and any("mtp_loss" in r for r in rows)
    saved = ModelConfig.from_pretrained(result.checkpoint)
    assert saved.num_nextn_predict_layers == 1 and saved.vocab_size == tok.vocab_size
    trained = load_model(result.checkpoint, with_mtp=True).model.mtp[0].eh_proj.weight
    assert not torch.equal(trained, load_model(init_dir, with_mtp=True).model.mtp[0].eh_proj.weight)
    assert (result.checkpoint / "tokenizer.json").read_text() == (init_dir / "tokenizer.json").read_text()


def test_sft_starts_from_the_init_weights(init_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from r1forge.loading import load_model
    from r1forge.train import run as runs

    cfg = load_run_config(SFTRunConfig, None, ["--model.init_from", str(init_dir), "--model.mtp", "false"])
    model = runs.build_run_model(cfg.model, load_tokenizer(init_dir), torch.device("cpu"))
    reference = load_model(init_dir)
    assert model.num_mtp == 0 and model.config.num_nextn_predict_layers == 0  # model.mtp false drops it
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="model.overrides"):
        bad = load_run_config(SFTRunConfig, None, ["--model.init_from", str(init_dir),
                                                   "--model.overrides.hidden_size", "32"])
        runs.build_run_model(bad.model, load_tokenizer(init_dir), torch.device("cpu"))
