"""A user's reward never stops a GRPO step: a finite value too large for float32 is clipped (not inf), a call past
`grpo.reward_timeout_s` scores 0, `sys.exit()` in a reward is an error (not an exit 0); each counted under the
reward's name in the run's logs."""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_policy
from r1forge.rl.config import GRPORunConfig
from r1forge.rl.run import run_grpo
from r1forge.rl.rewards import REWARD_STATS, RewardStats, combine_rewards, register_reward
from r1forge.rl.rewards.stats import MAX_ABS_REWARD, call_with_timeout, guarded
from r1forge.train import load_run_config

USER_REWARDS = '''
import sys, time

def huge(prompt, completion, **example):
    return 1e39  # finite in Python, inf in the float32 reward tensor

def sleepy(prompt, completion, **example):
    time.sleep(2.0)
    return 1.0

def leave(prompt, completion, **example):
    sys.exit()

def fine(prompt, completion, **example):
    return float(len(completion) % 3)
'''


@pytest.fixture(autouse=True)
def _fresh_stats() -> None:
    REWARD_STATS.reset()
    yield
    REWARD_STATS.reset()


@pytest.mark.parametrize("value, expected", [(1e39, MAX_ABS_REWARD), (-1e39, -MAX_ABS_REWARD), (3e8, MAX_ABS_REWARD),
                                             (2.5, 2.5), (-MAX_ABS_REWARD, -MAX_ABS_REWARD)])
def test_huge_rewards_are_clipped_and_counted(value: float, expected: float) -> None:
    stats = RewardStats()
    reward = guarded("big", stats)(lambda p, c, **e: value)
    got = reward("p", "c")
    assert got == expected and torch.isfinite(torch.tensor([got], dtype=torch.float32)).all()
    assert stats.count("big", "clipped") == (abs(value) > MAX_ABS_REWARD)


def test_system_exit_is_an_error_and_keyboard_interrupt_passes() -> None:
    stats = RewardStats()
    assert guarded("exits", stats)(lambda p, c, **e: sys.exit(0))("p", "c") == 0.0
    assert guarded("exits", stats)(lambda p, c, **e: sys.exit("bye"))("p", "c") == 0.0
    assert stats.count("exits", "error") == 2

    def interrupt(p: str, c: str, **e: object) -> float:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        guarded("interrupt", stats)(interrupt)("p", "c")
    with pytest.raises(KeyboardInterrupt):  # also from the timeout's thread
        call_with_timeout("interrupt", interrupt, 5.0, "p", "c", stats=stats)


def test_a_reward_past_its_timeout_scores_zero_and_the_next_call_runs() -> None:
    stats = RewardStats()
    release = threading.Event()
    slow = guarded("slow", stats)(lambda p, c, **e: 1.0 if release.wait(5.0) else 2.0)
    t0 = time.perf_counter()
    assert call_with_timeout("slow", slow, 0.05, "p", "c", stats=stats) == 0.0
    assert time.perf_counter() - t0 < 2.0  # did not wait for the reward
    assert stats.count("slow", "timeout") == 1
    release.set()
    assert call_with_timeout("slow", slow, 1.0, "p", "c", stats=stats) == 1.0
    assert call_with_timeout("fast", guarded("fast", stats)(lambda p, c, **e: 0.5), None, "p", "c") == 0.5


def test_combined_reward_names_the_component_that_timed_out_and_bounds_the_sum() -> None:
    register_reward("test_sleeps", lambda p, c, **e: time.sleep(1.0) or 1.0)
    register_reward("test_ok", lambda p, c, **e: 0.25)
    register_reward("test_huge", lambda p, c, **e: 1e39)
    combined = combine_rewards({"test_sleeps": 1.0, "test_ok": 2.0}).with_timeout(0.05)
    total, parts = combined("p", "c")
    assert parts == {"test_sleeps": 0.0, "test_ok": 0.25} and total == 0.5
    assert REWARD_STATS.count("test_sleeps", "timeout") == 1 and REWARD_STATS.count("test_ok", "timeout") == 0
    total, parts = combine_rewards({"test_huge": 1e6})("p", "c")  # each part bounded, their weighted sum too
    assert parts == {"test_huge": MAX_ABS_REWARD} and total == MAX_ABS_REWARD
    assert REWARD_STATS.count("weighted_sum", "clipped") == 1


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_policy(tmp_path_factory.mktemp("policy"))


def test_grpo_run_survives_huge_sleeping_and_exiting_rewards(init_dir: Path, tmp_path: Path) -> None:
    user = tmp_path / "user_rewards.py"
    user.write_text(USER_REWARDS)
    names = {kind: f"{user}:{kind}" for kind in ("huge", "sleepy", "leave", "fine")}
    cfg = load_run_config(GRPORunConfig, None, [
        "--run_dir", str(tmp_path / "run"), "--model.init_from", str(init_dir), "--grpo.steps", "2",
        "--grpo.prompts_per_step", "2", "--grpo.num_generations", "2", "--grpo.max_completion_length", "6",
        "--grpo.reward_timeout_s", "0.05", "--data.synthetic_problems", "10", "--log.eval_problems", "0",
        "--log.tensorboard", "false", "--log.progress", "false", "--log.plots", "false", "--device", "cpu"])
    cfg.rewards = {names["huge"]: 1.0, names["sleepy"]: 1.0, names["leave"]: 1.0, names["fine"]: 1.0}
    result = run_grpo(cfg)
    assert result.step == 2 and result.checkpoint is not None  # the run went on to the end and saved
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "reward_mean" in r][-1]
    assert last["step"] == 2 and math.isfinite(last["reward_mean"]) and math.isfinite(last["loss"])
    n = 2 * 2 * 2  # steps * prompts * generations
    assert last[f"reward_stats/{names['huge']}/clipped"] == n
    assert last[f"reward_stats/{names['sleepy']}/timeout"] == n
    assert last[f"reward_stats/{names['leave']}/error"] == n
    assert last[f"reward/{names['huge']}"] == MAX_ABS_REWARD
    assert f"reward_stats/{names['fine']}/error" not in last
