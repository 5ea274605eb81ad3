"""Exact resume through the real CLI: 2N steps straight == N steps, SIGKILL, `--resume` for N more, bit for bit.

The killed process dies by SIGKILL (no cleanup, no flush) in the middle of writing its step-6 checkpoint, after
logging steps 5 and 6 past its newest complete checkpoint (step 4 = N). So the test also checks that a kill
mid-save leaves the previous checkpoint whole, that `--resume` takes the newest *complete* one, and that
metrics.jsonl of the resumed run reads exactly like the uninterrupted run's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from r1forge.data import make_pretrain_corpus, train_tokenizer
from r1forge.train import list_checkpoints, read_metrics

ROOT = Path(__file__).resolve().parents[1]
N = 4

# The real CLI, with a SIGKILL of the process itself wired into the checkpoint writer at step 6: the model
# weights and tokenizer of step 6 are in its staging folder and training_state.pt is half written.
KILLER = """
import os, signal, sys
import r1forge.train.checkpointing as ck
_write = ck._write_state
def _write_state(path, state):
    if state["step"] == 6:
        path.write_bytes(b"torn")
        os.kill(os.getpid(), signal.SIGKILL)
    _write(path, state)
ck._write_state = _write_state
from r1forge.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(None, out, vocab_size=320, texts=make_pretrain_corpus(300, 0))
    return out


def _args(config: Path, run_dir: Path, tokenizer_dir: Path) -> list[str]:
    return ["pretrain", str(config), "--run_dir", str(run_dir), "--data.tokenizer", str(tokenizer_dir),
            "--train.steps", str(2 * N), "--log.save_every", "2", "--log.keep_last", "2"]


def _run(code: list[str], args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *code, *args], capture_output=True, text=True, env=env, timeout=240)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def _losses(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    records = read_metrics(run_dir)
    out = {}
    for key in ("loss", "mtp_loss", "aux_loss", "grad_norm", "eval_loss", "load_max_mean"):
        out[key] = [(r["step"], r[key]) for r in records if key in r and r.get("event") is None]
    return out


def test_kill_and_resume_is_bit_exact(tmp_path: Path, tokenizer_dir: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        "data: {synthetic_docs: 150, synthetic_eval_problems: 16, seq_len: 32}\n"
        "train: {batch_size: 4, grad_accum: 2, lr: 3.0e-3, warmup_steps: 2, bias_update_gamma: 0.01,\n"
        "        aux_loss_alpha: 0.001, mtp_lambda: 0.3}\n"
        "log: {log_every: 1, eval_every: 3, eval_batches: 2, progress: false, tensorboard: true}\n")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(["-m", "r1forge.cli"], _args(config, straight, tokenizer_dir))

    proc = _run(["-c", KILLER], _args(config, killed, tokenizer_dir), check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    checkpoints = killed / "checkpoints"
    assert [step for step, _ in list_checkpoints(checkpoints)] == [2, N]
    assert any(p.name.startswith(".step-00000006.tmp-") for p in checkpoints.iterdir()), "the torn save is gone"
    assert max(r["step"] for r in read_metrics(killed)) == 6  # logged past the checkpoint it resumes from

    resumed = _run(["-m", "r1forge.cli"], [*_args(config, killed, tokenizer_dir), "--resume"])
    assert f"step {N}" in resumed.stdout
    assert not any(p.name.startswith(".") for p in checkpoints.iterdir()), "staging leftovers not cleaned"

    a, b = _losses(straight), _losses(killed)
    assert [s for s, _ in a["loss"]] == list(range(1, 2 * N + 1))
    assert a["aux_loss"] and a["mtp_loss"] and a["eval_loss"]
    assert a == b  # every logged number, compared as exact floats

    final = f"checkpoints/step-{2 * N:08d}/model.safetensors"
    wa, wb = load_file(straight / final), load_file(killed / final)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    bias = [k for k in wa if k.endswith("e_score_correction_bias")]
    assert bias and any(wa[k].abs().sum() > 0 for k in bias)  # the bias update ran, and identically
    assert (killed / "tb").is_dir() and any((killed / "tb").iterdir())
