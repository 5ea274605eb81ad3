"""Data-parallel GRPO and distillation on CPU (gloo), 2 processes under torchrun, against the same run in one process.

GRPO: `r1forge grpo` under torchrun (tests/distributed/grpo_run.py adds per-step checks): the first step's gradient
and every step's rewards equal the 1-process run's, the engine's logprobs equal the trainer's recomputation on every
rank, the replicas stay bitwise identical, the digit-share reward rises, and a rank failing afterwards ends the
run with its own error. Distillation: `r1forge distill` under torchrun gives the 1-process traces, losses and
weights. Every launch has a timeout (a hang fails). About 50 s on one CPU core, most of it process start-up.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file

from r1forge.rl.config import GRPORunConfig
from r1forge.rl.run import run_grpo
from r1forge.train import load_run_config, read_metrics
from test_grpo_trainer import _write_init, tokenizer_dir  # noqa: F401 (module fixture)
from test_parallel import ROOT, TIMEOUT, torchrun

GRPO_CONFIG = ROOT / "tests" / "distributed" / "grpo_tiny.yaml"
REWARD = ROOT / "tests" / "distributed" / "digit_reward.py"  # (absolute: the 1-process run is not in ROOT)
GRPO_STEPS = 6
COMPARED = ("loss", "grad_norm", "entropy", "reward_mean", "reward_std", "completion_length", "ratio_mean", "kl")


def _worker(name: str) -> ModuleType:
    """A tests/distributed worker module, imported here to reuse its checks in this process."""
    spec = importlib.util.spec_from_file_location(f"distributed_{name}", ROOT / "tests" / "distributed" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def grpo_overrides(run_dir: Path, init: Path) -> list[str]:
    return ["--run_dir", str(run_dir), "--model.init_from", str(init), "--rewards", f"{{{REWARD}:digit_share: 1.0}}"]


def step_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r and not r.get("event")]


@pytest.mark.distributed
def test_grpo_data_parallel_equals_one_process(tokenizer_dir: Path, tmp_path: Path,  # noqa: F811
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """2 ranks x 2 prompts vs 1 process x 4 prompts, 6 steps. The first step's gradient is the 1-process one (to
    4e-7 of each tensor's largest entry, measured); every step's completions and rewards are the same. Weights
    and later losses differ by float rounding only (summation order), which Adam amplifies: it divides every
    gradient component by its own magnitude, and the on-policy GRPO gradient cancels within each group, so
    components at noise level still move by up to lr (2e-2; at 3e-2 the run's KL to the reference grew to 1.7 by
    step 6, and the k3 estimator's exp(log-ratio) turned that rounding into a 3% loss difference). Measured at
    2e-2: losses within 6.3e-5 relative over the 6 steps, KL within 1e-5."""
    from r1forge.rl.trainer import GRPOTrainer

    grpo_run = _worker("grpo_run")
    init = _write_init(tokenizer_dir, tmp_path / "init")
    monkeypatch.setattr(GRPOTrainer, "rollout", grpo_run.rollout)  # the worker's checks, in this process too
    monkeypatch.setattr(GRPOTrainer, "step", grpo_run.step)
    monkeypatch.setattr(grpo_run, "GRADIENTS", str(tmp_path / "single-gradients-1.pt"))
    t0 = time.perf_counter()
    single = run_grpo(load_run_config(GRPORunConfig, GRPO_CONFIG, grpo_overrides(tmp_path / "single", init)))
    single_s = time.perf_counter() - t0
    assert single.status == "completed" and all(c["logprob_gap"] < 1e-5 for c in grpo_run.CHECKS)
    t0 = time.perf_counter()
    proc = torchrun(2, "tests/distributed/grpo_run.py", str(tmp_path), "--fail-rank", "1", "grpo", str(GRPO_CONFIG),
                    "--parallel.dp_shard", "2", *grpo_overrides(tmp_path / "dp2", init), wait=False)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the data-parallel GRPO run hung") from None
    dp_s = time.perf_counter() - t0
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    # after the run, rank 1 raised while rank 0 waited in a gradient all-reduce: the launcher ended the run within
    # seconds (not parallel.timeout_s, 300 s) and names rank 1's own error as the root cause
    ended = time.time() - (tmp_path / "rank-1.json").stat().st_mtime
    assert proc.returncode != 0 and ended < 60, (proc.returncode, ended, out[-3000:])
    assert "RuntimeError: injected failure on rank 1" in out and "rank      : 1" in out, out[-3000:]

    # each rank rolled out its own share; its engine's logprobs = the training forward's; replicas bitwise equal
    for rank in ranks:
        assert rank["code"] == 0 and [c["step"] for c in rank["checks"]] == list(range(1, GRPO_STEPS + 1))
        for check in rank["checks"]:
            assert 0 < check["tokens"] <= 2 * 4 * 12, check  # its 2 prompts x 4 completions of <= 12 tokens
            assert check["logprob_gap"] < 1e-5, check
            assert check["mismatched_tensors"] == 0, check
    assert "2 data-parallel ranks" in out
    # the first step: the global batch's gradient (clipped: the clip coefficient is the global norm's)
    ours_grad, their_grad = torch.load(tmp_path / "gradients-1.pt"), torch.load(tmp_path / "single-gradients-1.pt")
    assert ours_grad.keys() == their_grad.keys()
    for key, value in their_grad.items():
        assert (ours_grad[key] - value).abs().max() <= 1e-5 * value.abs().max(), key
    first = load_file(tmp_path / "single" / "checkpoints" / "step-00000001" / "model.safetensors")
    for key, value in load_file(tmp_path / "dp2" / "checkpoints" / "step-00000001" / "model.safetensors").items():
        torch.testing.assert_close(value, first[key], rtol=0, atol=3e-4, msg=key)  # 1.5% of lr: see the docstring
    # every step: the same completions and rewards, the global batch's loss and gradient norm
    ours, reference = step_records(tmp_path / "dp2"), step_records(tmp_path / "single")
    assert [r["step"] for r in ours] == [r["step"] for r in reference] == list(range(1, GRPO_STEPS + 1))
    for a, b in zip(ours, reference, strict=True):
        for key in ("reward_mean", "reward_std", "completion_length", f"reward/{REWARD}:digit_share"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), (key, a, b)
        rel = 1e-5 if a["step"] == 1 else 1e-4
        for key in ("loss", "grad_norm", "entropy", "ratio_mean", "kl"):
            assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-7), (key, a, b)
        assert a["weight_sync_s"] < 0.05  # the engine reads the replica it wraps: only the prefix cache is reset
    # the reward is learnt: the digit share of the completions rises within the 6 steps
    rewards = [r["reward_mean"] for r in ours]
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.05, rewards  # measured: 0.026 -> 0.093
    evals = [r for r in read_metrics(tmp_path / "dp2") if r.get("event") == "eval"]
    single_evals = [r for r in read_metrics(tmp_path / "single") if r.get("event") == "eval"]
    assert [e["eval/accuracy"] for e in evals] == [e["eval/accuracy"] for e in single_evals]
    assert [e["eval/problems"] for e in evals] == [4, 4]  # before and after, 2 problems per rank
    print(f"\n1 process {single_s:.1f}s, 2 ranks {dp_s:.1f}s (failure to exit {ended:.1f}s); reward {rewards}; "
          "loss single / dp2: "
          + ", ".join(f"{b['loss']:.7g} / {a['loss']:.7g}" for a, b in zip(ours, reference)))


# ---------------------------------------------------------------------------------------------- distillation
@pytest.fixture(scope="module")
def short_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MoE teacher trained 30 steps on copy problems: enough to end its samples by itself (eos), which the
    traces need (a truncated sample is never kept); 3 s."""
    from r1forge import ModelConfig, build_model
    from r1forge.data import SFTDataset, StatefulLoader, load_tokenizer, train_tokenizer
    from r1forge.train import TrainConfig, Trainer
    from test_rejection import copy_examples, copy_messages, one_thread, quiet_log

    run_dir = tmp_path_factory.mktemp("short-teacher")
    train = copy_examples(64, 0, held_out=False)
    train_tokenizer(None, run_dir / "tokenizer", vocab_size=300,
                    texts=[m["content"] for ex in train for m in copy_messages(ex)])
    tok = load_tokenizer(run_dir / "tokenizer")
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=0,
                                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
    data = SFTDataset(tok, 64, records=[{"messages": copy_messages(ex)} for ex in train])
    cfg = TrainConfig(steps=30, batch_size=16, lr=1e-2, warmup_steps=2, weight_decay=0.0, mtp_lambda=0.0,
                      device="cpu")
    with one_thread():
        result = Trainer(build_model(config), StatefulLoader(data, 16, seed=0), cfg, quiet_log(), run_dir,
                         tokenizer=tok).fit()
    return result.checkpoint


def distill_overrides(run_dir: Path, teacher: Path, prompts: Path, held_out: Path) -> list[str]:
    """Forward KL (the teacher's forward on every rank's share), 2 sampled traces per prompt at temperature 1 (the
    seeds follow the global prompt index), a global batch of 4 split 2 + 2, every step logged."""
    return ["--teacher", str(teacher), "--run_dir", str(run_dir), "--mode", "kl", "--data.files", str(prompts),
            "--data.eval_files", str(held_out), "--data.samples_per_prompt", "2", "--data.temperature", "1.0",
            "--data.only_correct", "false", "--data.max_tokens", "24", "--data.max_len", "64",
            "--train.steps", "6", "--train.batch_size", "4", "--train.lr", "4e-3", "--train.warmup_steps", "1",
            "--train.device", "cpu", "--log.log_every", "1", "--log.save_every", "0", "--log.progress", "false",
            "--log.tensorboard", "false"]


@pytest.mark.distributed
def test_distill_data_parallel_equals_one_process(short_teacher: Path, tmp_path: Path) -> None:
    """2 ranks vs 1 process: the same teacher traces (each rank sampled half the prompts), the same evaluations
    (each rank decoded half the problems), every step's loss within 1e-5 and the same distilled weights."""
    from r1forge.data.jsonl import write_jsonl
    from r1forge.distill import DistillRunConfig, run_distill
    from test_rejection import copy_examples

    prompts, held_out = tmp_path / "prompts.jsonl", tmp_path / "held_out.jsonl"
    write_jsonl(prompts, copy_examples(10, 3, held_out=False))
    write_jsonl(held_out, copy_examples(5, 1, held_out=True))  # 5: the ranks' shares differ in size (3 + 2)
    args = (short_teacher, prompts, held_out)
    config = tmp_path / "distill.yaml"  # the defaults and the overrides, in both runs
    config.write_text("seed: 0\n")
    t0 = time.perf_counter()
    single = run_distill(load_run_config(DistillRunConfig, config, distill_overrides(tmp_path / "single", *args)))
    single_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = torchrun(2, "-m", "r1forge", "distill", str(config), "--parallel.dp_shard", "2", *distill_overrides(tmp_path / "dp2", *args))
    dp_s = time.perf_counter() - t0
    assert single.status == "completed" and "2 data-parallel ranks" in out

    traces = [(tmp_path / run / "traces.jsonl").read_text() for run in ("single", "dp2")]
    assert traces[0] == traces[1] and single.num_sequences > 10
    ours, reference = step_records(tmp_path / "dp2"), step_records(tmp_path / "single")
    assert [r["step"] for r in ours] == [r["step"] for r in reference] == list(range(1, 7))
    for a, b in zip(ours, reference, strict=True):
        for key in ("loss", "kl", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a, b)
    report = json.loads((tmp_path / "dp2" / "report.json").read_text())
    for key in ("teacher", "student_before", "student_after", "traces"):
        assert report[key] == single.report[key], key
    assert report["world_size"] == 2 and report["weight_sync_s"] > 0
    mine = load_file(tmp_path / "dp2" / "checkpoints" / "step-00000006" / "model.safetensors")  # exported
    for key, value in load_file(tmp_path / "single" / "checkpoints" / "step-00000006" / "model.safetensors").items():
        torch.testing.assert_close(mine[key], value, rtol=1e-5, atol=1e-5, msg=key)  # measured: 1.5e-6
    print(f"\n1 process {single_s:.1f}s, 2 ranks {dp_s:.1f}s, weight sync {report['weight_sync_s'] * 1e3:.1f} ms; "
          "loss single / dp2: " + ", ".join(f"{b['loss']:.7g} / {a['loss']:.7g}" for a, b in zip(ours, reference)))
