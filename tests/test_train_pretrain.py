"""A short pretraining run of the tiny MLA+MoE model on the built-in corpus, and what it leaves behind:
a held-out loss below the unigram baseline, a checkpoint that transformers and r1forge load with the same
logits, a tokenizer AutoTokenizer reads, TensorBoard events, PNG plots."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import r1forge
from r1forge.cli import main
from r1forge.data import load_tokenizer
from r1forge.train import PretrainRunConfig, TrainResult, load_run_config, read_metrics, run_pretrain

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--data.synthetic_docs", "600", "--data.seq_len", "64", "--data.synthetic_eval_problems", "50",
         "--data.vocab_size", "384", "--train.steps", "80", "--train.batch_size", "8", "--train.warmup_steps", "10",
         "--log.eval_every", "40", "--log.log_every", "10", "--log.progress", "false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainResult]:
    run_dir = tmp_path_factory.mktemp("pretrain")
    config = ROOT / "configs" / "pretrain_tiny.yaml"
    cfg = load_run_config(PretrainRunConfig, config, [*SHORT, "--run_dir", str(run_dir)])
    return run_dir, run_pretrain(cfg)


def test_held_out_loss_beats_unigram(run: tuple[Path, TrainResult]) -> None:
    run_dir, result = run
    start = read_metrics(run_dir)[0]
    assert start["event"] == "start" and start["kind"] == "pretrain"
    entropy = start["unigram_entropy"]
    assert 3.0 < entropy < 6.0
    assert result.status == "completed" and result.step == 80
    assert result.eval_loss < entropy - 1.0, (result.eval_loss, entropy)
    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r and not r.get("event")]
    assert losses[-1] < losses[0] - 1.5
    assert any(r.get("load_max_mean", 0) >= 1.0 for r in read_metrics(run_dir))
    assert any((run_dir / "tb").iterdir())


def test_checkpoint_loads_in_transformers_and_r1forge(run: tuple[Path, TrainResult]) -> None:
    import transformers
    _, result = run
    ckpt = result.checkpoint
    assert ckpt.name == "step-00000080"
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(ckpt).eval()
    ours = r1forge.load_model(ckpt)
    with_mtp = r1forge.load_model(ckpt, with_mtp=True)
    assert with_mtp.num_mtp == 1
    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits
        torch.testing.assert_close(ours(ids), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(with_mtp(ids), expected, rtol=1e-4, atol=1e-4)


def test_saved_tokenizer_loads_in_autotokenizer(run: tuple[Path, TrainResult]) -> None:
    import transformers
    ckpt = run[1].checkpoint
    hf_tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    tok = load_tokenizer(ckpt)
    text = "Compute (12 + 7) * 3.\n12 + 7 = 19.\n19 * 3 = 57."
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_plot_command_writes_pngs(run: tuple[Path, TrainResult], tmp_path: Path) -> None:
    assert main(["plot", str(run[0]), "--out", str(tmp_path)]) == 0
    for name in ("loss.png", "expert_load.png", "load_balance.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_existing_run_needs_resume_and_bad_keys_are_named(run: tuple[Path, TrainResult],
                                                          capsys: pytest.CaptureFixture) -> None:
    config = str(ROOT / "configs" / "pretrain_tiny.yaml")
    assert main(["pretrain", config, "--run_dir", str(run[0])]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(["pretrain", config, "--train.lrr", "1"]) == 2
    assert "unknown config key 'train.lrr'" in capsys.readouterr().err
    # Resuming a finished run loads its last checkpoint and has nothing left to do.
    assert main(["pretrain", config, *SHORT, "--run_dir", str(run[0]), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
