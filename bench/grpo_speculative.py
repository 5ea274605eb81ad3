"""GRPO with and without speculative rollouts: the same run twice, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python bench/grpo_speculative.py                    # 40 steps, k = 1
    OMP_NUM_THREADS=1 .venv/bin/python bench/grpo_speculative.py --steps 60 --k 2 --pretrained runs/demo/pretrain

Speculation is lossless: the rollouts' tokens are drawn from the policy's own distribution whether or not MTP
drafts them, so the reward curve may differ only by sampling noise (the random draws differ: rejection sampling
consumes its random numbers differently from plain sampling). This bench checks that on the demo's task and
prints what speculation buys in rollout tokens/s.

The policy is the demo's: its pretrained model (`--pretrained`, default runs/demo/pretrain as `r1forge demo`
writes it; trained here with the demo's recipe when missing), cold-started by the demo's SFT stage with the MTP
module kept trained (`model.mtp true`, `mtp_lambda 0.1`, as `r1forge sft` does by default, so that the chat-tuned
model still drafts well). Both GRPO runs then use the demo's GRPO config from that checkpoint with the same seeds,
one with `grpo.rollout_speculative_tokens k`. Printed: reward per step (means over blocks of steps), the two runs'
mean reward and its paired standard error, rollout tokens/s, acceptance, and greedy held-out accuracy after.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any


def _pretrained(work: Path, given: Path | None) -> Path:
    """The demo's pretrained model: `given`, or trained into `work` with the demo's own pretraining config."""
    from r1forge.demo import stage_configs
    from r1forge.train import run_pretrain

    if given is not None:
        return given
    out = work / "pretrain"
    if not (out / "DONE.json").exists():
        run_pretrain(stage_configs(work)["pretrain"])
        (out / "DONE.json").write_text("{}")
    return out


def _sft(work: Path, pretrained: Path) -> Path:
    from r1forge.demo import stage_configs
    from r1forge.train import run_sft

    out = work / "sft-mtp"
    if not (out / "DONE.json").exists():
        cfg = stage_configs(work, {"sft": ["--model.init_from", str(pretrained), "--run_dir", str(out),
                                           "--model.mtp", "true", "--train.mtp_lambda", "0.1"]})["sft"]
        run_sft(cfg)
        (out / "DONE.json").write_text("{}")
    return out


def _grpo(work: Path, sft: Path, steps: int, k: int, eval_problems: int,
          seed: int = 0) -> tuple[list[dict[str, Any]], float]:
    """One GRPO run from `sft`; its per-step metrics and its greedy held-out accuracy after."""
    from r1forge.demo import stage_configs
    from r1forge.rl.run import run_grpo

    out = work / (f"grpo-k{k}" + (f"-seed{seed}" if seed else ""))
    done = out / "bench.json"
    if done.exists():  # this bench's own cache: a finished run is not trained again
        cached = json.loads(done.read_text())
        if cached["steps"] == steps:
            return cached["rows"], cached["accuracy"]
    cfg = stage_configs(work, {"grpo": [
        "--run_dir", str(out), "--model.init_from", str(sft), "--model.mtp", "true", "--grpo.steps", str(steps),
        "--grpo.rollout_speculative_tokens", str(k), "--log.eval_every", "0", "--log.eval_before", "false",
        "--log.eval_problems", str(eval_problems), "--log.plots", "false", "--log.save_every", "0",
        "--grpo.log_completions_every", "0", "--grpo.seed", str(seed)]})["grpo"]
    result = run_grpo(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "reward_mean" in r]
    accuracy = result.after.accuracy if result.after is not None else math.nan
    done.write_text(json.dumps({"steps": steps, "rows": rows, "accuracy": accuracy}))
    return rows, accuracy


def _sampled_rewards(sft: Path, k: int, count: int, work: Path) -> tuple[list[float], float]:
    """The cold-started policy's rewards on `count` training prompts x G samples at the GRPO temperature, as
    GRPO's rollouts draw them (`generate_rollouts`, the same seeds), with MTP drafts when k > 0: the per-prompt
    mean reward, and the rollout tokens/s."""
    import time

    from r1forge import LLM
    from r1forge.demo import stage_configs
    from r1forge.rl.examples import train_and_held_out
    from r1forge.rl.rewards.registry import combine_rewards
    from r1forge.rl.rollout import generate_rollouts
    from r1forge.rl.templates import render_prompt
    from r1forge.train.checkpointing import resolve_model_dir

    cfg = stage_configs(work)["grpo"]
    train, _ = train_and_held_out(cfg.data, cfg.seed)
    spec = {"method": "mtp", "num_speculative_tokens": k} if k else None
    llm = LLM(str(resolve_model_dir(sft)), device="cpu", max_num_seqs=cfg.grpo.prompts_per_step * cfg.grpo.num_generations,
              speculative_config=spec)
    reward_fn, G = combine_rewards(cfg.rewards), cfg.grpo.num_generations
    per_prompt, tokens, seconds = [], 0, 0.0
    step = cfg.grpo.prompts_per_step
    for start in range(0, count, step):
        examples = train[start : start + step]
        rendered = [render_prompt(llm.tokenizer, ex["question"], cfg.grpo.template) for ex in examples]
        t = time.perf_counter()
        batch = generate_rollouts(llm, [ids for _, ids in rendered], [text for text, _ in rendered], examples,
                                  reward_fn, G, cfg.grpo.max_completion_length, cfg.grpo.temperature, seed=start)
        seconds += time.perf_counter() - t
        tokens += int(batch.completion_mask.sum())
        per_prompt += batch.rewards.view(-1, G).mean(dim=1).tolist()
    return per_prompt, tokens / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default="runs/bench_grpo_speculative")
    ap.add_argument("--pretrained", type=Path, default=None,
                    help="the demo's pretrained model (default: runs/demo/pretrain if there, else trained here)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--k", type=int, default=1, help="num_speculative_tokens of the speculative run")
    ap.add_argument("--block", type=int, default=10, help="steps per printed row")
    ap.add_argument("--eval-problems", type=int, default=300)
    ap.add_argument("--sample-prompts", type=int, default=256, help="prompts of the no-training sampled-reward check")
    args = ap.parse_args()
    work = Path(args.work_dir)
    given = args.pretrained or (Path("runs/demo/pretrain") if (Path("runs/demo/pretrain") / "DONE.json").exists()
                                else None)
    sft = _sft(work, _pretrained(work, given))
    plain_r, plain_tps = _sampled_rewards(sft, 0, args.sample_prompts, work)
    spec_r, spec_tps = _sampled_rewards(sft, args.k, args.sample_prompts, work)
    diffs = [b - a for a, b in zip(plain_r, spec_r)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    print(f"\nsampled reward of the cold-started policy, no training ({len(diffs)} prompts x G, the GRPO temperature): "
          f"plain {statistics.fmean(plain_r):.4f}, speculative {statistics.fmean(spec_r):.4f}; difference "
          f"{statistics.fmean(diffs):+.4f} (paired SE over prompts {se:.4f}, {statistics.fmean(diffs) / se:+.1f} SE); "
          f"rollout tokens/s {plain_tps:.1f} vs {spec_tps:.1f} ({spec_tps / plain_tps:.2f}x)")
    plain, plain_acc = _grpo(work, sft, args.steps, 0, args.eval_problems)
    spec, spec_acc = _grpo(work, sft, args.steps, args.k, args.eval_problems)
    # the yardstick for "within noise": the same plain run under another grpo.seed (prompt order and draws)
    other, other_acc = _grpo(work, sft, args.steps, 0, args.eval_problems, seed=1)
    n = min(len(plain), len(spec))

    def mean(rows: list[dict[str, Any]], key: str) -> float:
        return statistics.fmean(r[key] for r in rows)

    print(f"\nGRPO from {sft}: {n} steps each, plain rollouts vs speculative (MTP, k={args.k}), same seeds")
    print(f"{'steps':>9} | {'reward plain':>12} {'spec':>7} | {'rollout tok/s plain':>19} {'spec':>7} {'x':>5} | "
          f"{'accept':>6} {'len/verify':>10}")
    for start in range(0, n, args.block):
        a, b = plain[start : start + args.block], spec[start : start + args.block]
        tp, ts = mean(a, "rollout_tokens_per_s"), mean(b, "rollout_tokens_per_s")
        print(f"{start + 1:>4}-{start + len(a):<4} | {mean(a, 'reward_mean'):12.3f} {mean(b, 'reward_mean'):7.3f} | "
              f"{tp:19.1f} {ts:7.1f} {ts / tp:5.2f} | {mean(b, 'rollout/spec_acceptance_rate'):6.2f} "
              f"{mean(b, 'rollout/spec_mean_accepted_length'):10.2f}")
    diffs = [s["reward_mean"] - p["reward_mean"] for p, s in zip(plain[:n], spec[:n])]
    se = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else math.nan
    tp, ts = mean(plain[:n], "rollout_tokens_per_s"), mean(spec[:n], "rollout_tokens_per_s")
    print(f"mean reward: plain {mean(plain[:n], 'reward_mean'):.4f}, speculative {mean(spec[:n], 'reward_mean'):.4f}; "
          f"difference {statistics.fmean(diffs):+.4f} (paired SE over steps {se:.4f}, "
          f"{statistics.fmean(diffs) / se if se else math.nan:+.1f} SE)")
    print(f"rollout tokens/s: plain {tp:.1f}, speculative {ts:.1f} ({ts / tp:.2f}x); greedy held-out accuracy after: "
          f"plain {plain_acc:.3f}, speculative {spec_acc:.3f} ({args.eval_problems} problems)")
    m = min(n, len(other))
    late = slice(m // 2, m)  # the second half, where runs have drifted apart
    print(f"run-to-run noise: plain seed 1 mean reward {mean(other[:m], 'reward_mean'):.4f} "
          f"(plain seed 0 minus seed 1: {mean(plain[:m], 'reward_mean') - mean(other[:m], 'reward_mean'):+.4f}; "
          f"second half {mean(plain[late], 'reward_mean') - mean(other[late], 'reward_mean'):+.4f} against "
          f"speculative minus plain {mean(spec[late], 'reward_mean') - mean(plain[late], 'reward_mean'):+.4f}); "
          f"accuracy after {other_acc:.3f}")


if __name__ == "__main__":
    main()
