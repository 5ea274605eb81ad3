"""Scale-out training (r1forge.parallel) on CPU with gloo, 2 and 4 processes launched by torchrun.

The distributed runs are the tiny MoE model of tests/distributed/pretrain_tiny.yaml for 20 steps of an
8-sequence global batch; each is compared with the same run in one process. Every launch has a timeout, so a
hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from r1forge.data.loader import StatefulLoader
from r1forge.parallel import ParallelConfig
from r1forge.train import PretrainRunConfig, load_run_config, read_metrics, run_pretrain

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests" / "distributed" / "pretrain_tiny.yaml"
TIMEOUT = 240


def torchrun(nproc: int, *args: str, timeout: float = TIMEOUT, wait: bool = True) -> subprocess.Popen | str:
    """Launch `args` under torchrun on CPU (gloo); the combined output, or the process when not waiting."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    if not wait:
        return proc
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"torchrun {' '.join(args)} hung for {timeout}s") from None
    assert proc.returncode == 0, out[-6000:]
    return out


def losses(run_dir: Path) -> list[tuple[int, float, float, float]]:
    return [(r["step"], r["loss"], r["mtp_loss"], r["grad_norm"]) for r in read_metrics(run_dir)
            if "loss" in r and not r.get("event")]


def assert_close_runs(ours: Path, reference: Path, rel: float = 1e-5) -> None:
    a, b = losses(ours), losses(reference)
    assert [x[0] for x in a] == [x[0] for x in b] == list(range(1, 21))
    for x, y in zip(a, b, strict=True):
        for u, v in zip(x[1:], y[1:], strict=True):
            assert abs(u - v) <= rel * abs(v), (x, y)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / "step-00000020" / "model.safetensors")


# ---------------------------------------------------------------------------------------------- no processes
def test_parallel_config_names_the_key() -> None:
    assert ParallelConfig(dp_shard=-1, ep=2).resolve(4) == (2, 2)
    assert ParallelConfig(dp_shard=2, ep=1).resolve(2) == (2, 1)
    with pytest.raises(ValueError, match=r"parallel\.ep=3 does not divide the world size 4"):
        ParallelConfig(ep=3).resolve(4)
    with pytest.raises(ValueError, match=r"parallel\.dp_shard=4 x parallel\.ep=2 = 8 processes"):
        ParallelConfig(dp_shard=4, ep=2).resolve(4)
    with pytest.raises(ValueError, match=r"parallel\.dp_shard must be -1"):
        ParallelConfig(dp_shard=0).validate()
    with pytest.raises(ValueError, match=r"parallel\.ep=3 does not divide the model's n_routed_experts \(8\)"):
        ParallelConfig(ep=3).check_model(8)


def test_run_config_has_a_parallel_section() -> None:
    cfg = load_run_config(PretrainRunConfig, CONFIG, ["--parallel.ep", "2", "--parallel.dp_shard", "2"])
    assert (cfg.parallel.dp_shard, cfg.parallel.ep) == (2, 2)
    with pytest.raises(ValueError, match=r"parallel\.ep must be >= 1"):
        load_run_config(PretrainRunConfig, CONFIG, ["--parallel.ep", "0"])


def test_loader_position_carries_to_another_world_size() -> None:
    """The position counts global batches: 2 ranks x 4 continue where 4 ranks x 2 stopped, on the same rows."""
    data = [{"x": torch.tensor([i])} for i in range(64)]
    four = [StatefulLoader(data, 2, seed=3, rank=r, world_size=4) for r in range(4)]
    for loader in four:
        for _ in range(5):
            next(loader)
    two = [StatefulLoader(data, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for loader in two:
        loader.load_state_dict(four[0].state_dict())
    after_four = torch.cat([next(loader)["x"] for loader in four]).flatten().tolist()
    after_two = torch.cat([next(loader)["x"] for loader in two]).flatten().tolist()
    assert after_two == after_four
    with pytest.raises(ValueError, match="global batch of 8"):
        StatefulLoader(data, 3, seed=3, rank=0, world_size=2).load_state_dict(four[0].state_dict())


# ---------------------------------------------------------------------------------------------- MoE under EP
@pytest.mark.distributed
def test_moe_under_ep2_equals_single_device_and_exports(tmp_path: Path) -> None:
    """Logits and every gradient of FSDP + EP(2) equal one device's; router biases after a bias update are the
    single-device ones on both ranks; the sharded checkpoint exports to transformers with the same logits."""
    import transformers

    from r1forge.parallel.checkpoint import export_checkpoint

    torchrun(2, "tests/distributed/moe_parity.py", str(tmp_path), "-1", "2")
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for result in ranks:
        assert result["checked"] > 20  # dense parameters, shared experts and this rank's 4 of 8 routed experts
        worst = max(result["errors"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-5, worst
        assert result["bias_error"] < 1e-7
    assert ranks[0]["biases"] == ranks[1]["biases"]
    assert any(v != 0 for layer in ranks[0]["biases"] for v in layer)  # the update did move them

    out = export_checkpoint(tmp_path / "checkpoints" / "step-00000001", tmp_path / "hf")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(out).eval()
    for r in (0, 1):
        saved = torch.load(tmp_path / f"logits-{r}.pt")
        with torch.no_grad():
            torch.testing.assert_close(hf(saved["ids"]).logits, saved["logits"], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- pretraining
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 1-process reference run (in this process); its tokenizer is every distributed run's."""
    root = tmp_path_factory.mktemp("parallel-runs")
    cfg = load_run_config(PretrainRunConfig, CONFIG, ["--run_dir", str(root / "single")])
    torch.set_num_threads(1)
    assert run_pretrain(cfg).status == "completed"
    return root


def launch_pretrain(runs: Path, name: str, nproc: int, *overrides: str, resume: bool = False,
                    wait: bool = True) -> subprocess.Popen | str:
    args = ["-m", "r1forge", "pretrain", str(CONFIG), "--run_dir", str(runs / name),
            "--data.tokenizer", str(runs / "single" / "tokenizer"), *overrides]
    return torchrun(nproc, *args, *(["--resume"] if resume else []), wait=wait)


@pytest.mark.distributed
@pytest.mark.parametrize(("name", "nproc", "overrides"), [
    # dp2 also recomputes activations and splits the step into 2 micro-batches of 4 (the same 8 sequences)
    ("dp2", 2, ("--parallel.dp_shard", "2", "--train.activation_checkpointing", "true", "--train.batch_size", "4",
                "--train.grad_accum", "2")),
    ("ep2", 2, ("--parallel.ep", "2")),
    ("dp2xep2", 4, ("--parallel.dp_shard", "2", "--parallel.ep", "2")),
])
def test_pretraining_equals_single_process(runs: Path, name: str, nproc: int, overrides: tuple[str, ...]) -> None:
    """20 steps: losses, MTP losses and gradient norms within 1e-5 of one process's; the same final weights
    (the aux loss and the bias update are on, so the global loads and the global sequence count are tested)."""
    launch_pretrain(runs, name, nproc, *overrides)
    assert_close_runs(runs / name, runs / "single")
    ours, reference = final_weights(runs / name), final_weights(runs / "single")
    assert ours.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-5, msg=key)
    start = read_metrics(runs / name)[0]
    assert (start["world_size"], start["event"]) == (nproc, "start")


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.distributed
def test_killed_rank_stops_the_run_and_resume_is_exact(runs: Path) -> None:
    """SIGKILL rank 1 after the step-10 checkpoint: torchrun ends the run; --resume gives the uninterrupted
    ep=2 run's losses bit for bit."""
    if not (runs / "ep2" / "metrics.jsonl").is_file():
        launch_pretrain(runs, "ep2", 2, "--parallel.ep", "2")
    proc = launch_pretrain(runs, "killed", 2, "--parallel.ep", "2", wait=False)
    checkpoint = runs / "killed" / "checkpoints" / "step-00000010" / "trainer_state.json"
    deadline = time.monotonic() + TIMEOUT
    while not checkpoint.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its step-10 checkpoint"
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert len(workers) == 2
    os.kill(max(workers), signal.SIGKILL)  # the second worker started: rank 1
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the launcher did not stop after a rank was killed") from None
    assert proc.returncode != 0, out[-3000:]
    assert "SIGKILL" in out or "Signal 9" in out, out[-3000:]
    assert not (runs / "killed" / "checkpoints" / "step-00000020").exists()

    launch_pretrain(runs, "killed", 2, "--parallel.ep", "2", resume=True)
    assert losses(runs / "killed") == losses(runs / "ep2")  # bit for bit, steps 1..20
    ours, reference = final_weights(runs / "killed"), final_weights(runs / "ep2")
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


@pytest.mark.distributed
def test_resume_on_another_world_size_loads_weights_and_optimizer(runs: Path) -> None:
    """The 4-process (dp2 x ep2) sharded checkpoint resumed in one process: weights are the exported ones,
    every parameter has its AdamW moments, and the notes say the per-rank RNGs were not carried."""
    from r1forge.model import build_model
    from r1forge.config import ModelConfig
    from r1forge.parallel import ParallelMesh
    from r1forge.parallel.checkpoint import load_sharded_checkpoint
    from r1forge.train import build_optimizer, build_scheduler

    if not (runs / "dp2xep2" / "metrics.jsonl").is_file():
        launch_pretrain(runs, "dp2xep2", 4, "--parallel.dp_shard", "2", "--parallel.ep", "2")
    path = runs / "dp2xep2" / "checkpoints" / "step-00000020"
    model = build_model(ModelConfig.from_pretrained(path), with_mtp=True)
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    scheduler = build_scheduler(optimizer, 4, 20, 0.1)
    state = load_sharded_checkpoint(path, model, ParallelMesh.single(), optimizer=optimizer, scheduler=scheduler)
    assert state["step"] == 20 and scheduler.last_epoch == 20
    assert any("RNG" in note and "'world_size': 4" in note for note in state["notes"])
    exported = final_weights(runs / "dp2xep2")
    from r1forge.checkpoint.save import checkpoint_tensors

    for key, value in checkpoint_tensors(model).items():
        assert torch.equal(value, exported[key]), key
    moments = [optimizer.state[p]["exp_avg"] for p in model.parameters()]
    assert all(m.abs().sum() > 0 for m in moments)  # every parameter's AdamW moment came back
