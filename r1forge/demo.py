"""`make demo`: the R1 recipe end to end on a laptop CPU, with nothing downloaded.

Stages (each cached under OUT_DIR; a second run skips finished ones, an interrupted one resumes):
  1. tokenizer + pretraining: a tiny MLA + DeepSeekMoE model on the built-in arithmetic corpus;
  2. cold-start SFT on a small set of `<think>` / `<answer>` chain-of-thought conversations;
  3. evaluation before RL: greedy accuracy, format rate and response length on held-out test-split problems
     (never in any training data), plus pass@1 / pass@k of sampled answers: the headroom RL can sharpen;
  4. GRPO (the R1 recipe's RL stage) with the accuracy + format rewards, on train-split problems;
  5. evaluation after RL on the same held-out problems; a before/after table, plots, a sample trace.

Why the task is built this way: tiny models rarely learn to reason from RL alone. Here pretraining teaches the
arithmetic, and a deliberately short cold start teaches the output format; the SFT model then samples correct
answers far more often than its greedy answer is correct (pass@k >> pass@1), which is what GRPO turns into
greedy accuracy.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from r1forge.rl.examples import train_and_held_out
from r1forge.rl.config import GRPORunConfig
from r1forge.rl.run import run_grpo
from r1forge.rl.evaluate import EvalResult
from r1forge.data.jsonl import write_json
from r1forge.train.config import PretrainRunConfig, SFTRunConfig, load_run_config

DONE_FILE = "DONE.json"
# The stages' run configs are the shipped configs/*_tiny.yaml (one source: `r1forge pretrain
# configs/pretrain_tiny.yaml` trains exactly the demo's first stage); the demo only places them under OUT_DIR,
# chains them (init_from) and pins the CPU, so the table is the same on every machine.
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
STAGE_FILES = {"pretrain": "pretrain_tiny.yaml", "sft": "sft_tiny.yaml", "grpo": "grpo_tiny.yaml"}
PASS_AT_K = 8
PASS_AT_K_PROBLEMS = 200


def _done(stage_dir: Path) -> dict[str, Any] | None:
    marker = stage_dir / DONE_FILE
    return json.loads(marker.read_text()) if marker.is_file() else None


def _mark_done(stage_dir: Path, info: dict[str, Any]) -> None:
    write_json(stage_dir / DONE_FILE, info)


_STAGE_OUTPUTS = ["pretrain", "sft", "eval_before.json", "grpo", "eval_after.json"]


def _invalidate(out: Path, after: str) -> None:
    """A stage that just ran makes everything downstream of it stale: remove it so it is rebuilt."""
    import shutil

    for name in _STAGE_OUTPUTS[_STAGE_OUTPUTS.index(after) + 1:]:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 100 - len(text)), flush=True)


def _pass_at_k(llm: Any, tokenizer: Any, examples: list[dict[str, Any]], k: int, max_tokens: int,
               temperature: float, seed: int = 0) -> tuple[float, float]:
    """(pass@1, pass@k) of samples at the RL sampling temperature, k samples per problem."""
    from r1forge.engine import SamplingParams
    from r1forge.rl.rewards import accuracy_reward
    from r1forge.rl.templates import render_prompt

    rendered = [render_prompt(tokenizer, ex["question"], "chat") for ex in examples]
    params = [SamplingParams(n=k, temperature=temperature, max_tokens=max_tokens, seed=seed + i) for i in range(len(examples))]
    outs = llm.generate([ids for _, ids in rendered], params, use_tqdm=True)
    p1, pk = 0.0, 0.0
    for (prompt, _), ex, out in zip(rendered, examples, outs):
        correct = [accuracy_reward(prompt, c.text, **ex) >= 1.0 for c in out.outputs]
        p1 += sum(correct) / k
        pk += float(any(correct))
    return p1 / len(examples), pk / len(examples)


def _evaluate_checkpoint(model_dir: Path, examples: list[dict[str, Any]], max_tokens: int,
                         pass_at_k_problems: int, temperature: float,
                         greedy: EvalResult | None = None) -> dict[str, Any]:
    """Greedy accuracy (unless `greedy` already holds it for this model) and sampled pass@1 / pass@k."""
    from r1forge.data import load_tokenizer
    from r1forge.engine import LLM
    from r1forge.loading import load_model
    from r1forge.rl.evaluate import evaluate

    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, device="cpu")
    llm = LLM(model, tokenizer=tokenizer, max_num_seqs=256, block_size=16)
    result = greedy or evaluate(llm, tokenizer, examples, "chat", max_tokens, progress=True)
    p1, pk = _pass_at_k(llm, tokenizer, examples[:pass_at_k_problems], PASS_AT_K, max_tokens,
                        temperature)
    sample = next((i for i, ok in enumerate(result.correct) if ok), 0)
    return {"accuracy": result.accuracy, "stderr": result.stderr, "format_rate": result.format_rate,
            "response_length": result.mean_length, "problems": result.num_problems, "pass@1": p1,
            f"pass@{PASS_AT_K}": pk, "sample_question": examples[sample]["question"],
            "sample_answer": examples[sample]["answer"], "sample_completion": result.completions[sample],
            "correct": result.correct}


def _as_eval_result(record: dict[str, Any]) -> EvalResult:
    """A cached evaluation (eval_*.json) back as the EvalResult GRPO logs."""
    return EvalResult(record["accuracy"], record["format_rate"], record["response_length"], record["problems"],
                      [], record["correct"])


def _newest_model(run_dir: Path) -> Path:
    from r1forge.train.checkpointing import resolve_model_dir

    return resolve_model_dir(run_dir)


def _train_stage(name: str, run_dir: Path, out: Path, timings: dict[str, float],
                 train: Callable[[bool], Any]) -> None:
    """Run a training stage (`train(resume)` returns a result with eval_loss) unless its DONE.json exists; a
    rerun stage makes the later stages' results stale."""
    if _done(run_dir) is not None:
        print(f"cached: {run_dir} (delete it to redo this stage)")
        return
    t0 = time.perf_counter()
    result = train((run_dir / "checkpoints").is_dir())
    timings[name] = time.perf_counter() - t0
    _mark_done(run_dir, {"eval_loss": result.eval_loss, "seconds": timings[name]})
    _invalidate(out, after=name)


def stage_configs(out_dir: str | Path, overrides: dict[str, list[str]] | None = None
                  ) -> tuple[PretrainRunConfig, SFTRunConfig, GRPORunConfig]:
    """The three training stages' run configs: configs/*_tiny.yaml placed under `out_dir`, each stage starting
    from the previous one, on the CPU; then `overrides` (dotted, per stage, as on the command line)."""
    overrides = overrides or {}
    unknown = set(overrides) - set(STAGE_FILES)
    if unknown:
        raise ValueError(f"overrides: unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGE_FILES)}")
    if not CONFIGS_DIR.is_dir():
        raise FileNotFoundError(f"{CONFIGS_DIR}: the demo runs the repository's configs/*_tiny.yaml; run it from a "
                                "source checkout (pip install -e .)")
    out = Path(out_dir)
    placement = {
        "pretrain": ["--run_dir", str(out / "pretrain"), "--train.device", "cpu"],
        "sft": ["--run_dir", str(out / "sft"), "--model.init_from", str(out / "pretrain"), "--train.device", "cpu"],
        "grpo": ["--run_dir", str(out / "grpo"), "--model.init_from", str(out / "sft"), "--device", "cpu"],
    }
    classes = {"pretrain": PretrainRunConfig, "sft": SFTRunConfig, "grpo": GRPORunConfig}
    pretrain, sft, grpo = (load_run_config(classes[stage], CONFIGS_DIR / name,
                                           placement[stage] + list(overrides.get(stage, [])))
                           for stage, name in STAGE_FILES.items())
    return pretrain, sft, grpo


def run_demo(out_dir: str | Path = "runs/demo", grpo_steps: int | None = None,
             overrides: dict[str, list[str]] | None = None,
             pass_at_k_problems: int = PASS_AT_K_PROBLEMS) -> dict[str, Any]:
    """Run (or continue) every stage; print the before/after table; return the numbers.

    Args:
        out_dir: every stage writes under it; a stage with a DONE.json there is skipped.
        grpo_steps: GRPO steps instead of the demo's own.
        overrides: dotted config overrides per stage ("pretrain", "sft", "grpo"), as on the command line,
            e.g. {"pretrain": ["--train.steps", "100"]}; the evaluation set is the grpo stage's held-out data.
        pass_at_k_problems: held-out problems sampled k times for pass@1 / pass@k.
    """
    from r1forge.train import run_pretrain, run_sft

    pretrain_cfg, sft_cfg, grpo_cfg = stage_configs(out_dir, overrides)
    if grpo_steps is not None:
        grpo_cfg.grpo.steps = grpo_steps
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    # 1. tokenizer + pretraining
    pre_dir = out / "pretrain"
    _banner("1/5 tokenizer + pretraining a tiny MLA + DeepSeekMoE model on the built-in corpus")
    _train_stage("pretrain", pre_dir, out, timings, lambda resume: run_pretrain(pretrain_cfg, resume=resume))

    # 2. cold-start SFT
    sft_dir = out / "sft"
    _banner("2/5 cold-start SFT on chain-of-thought conversations (<think> ... </think> <answer> ... </answer>)")
    _train_stage("sft", sft_dir, out, timings, lambda resume: run_sft(sft_cfg, resume=resume))

    _, held_out = train_and_held_out(grpo_cfg.data, grpo_cfg.seed)
    max_tokens = grpo_cfg.grpo.max_completion_length

    # 3. evaluation before RL
    before_file = out / "eval_before.json"
    _banner(f"3/5 evaluation before RL: {len(held_out)} held-out problems, greedy; pass@{PASS_AT_K} on "
            f"{min(pass_at_k_problems, len(held_out))}")
    if before_file.is_file():
        before = json.loads(before_file.read_text())
        print(f"cached: {before_file}")
    else:
        t0 = time.perf_counter()
        before = _evaluate_checkpoint(_newest_model(sft_dir), held_out, max_tokens, pass_at_k_problems,
                                      grpo_cfg.grpo.temperature)
        timings["eval_before"] = time.perf_counter() - t0
        write_json(before_file, before)  # atomic: these files are cache markers
    print(f"greedy accuracy {before['accuracy']:.3f} +- {before['stderr']:.3f}; sampled pass@1 "
          f"{before['pass@1']:.3f}, pass@{PASS_AT_K} {before[f'pass@{PASS_AT_K}']:.3f}")

    # 4. GRPO
    grpo_dir = out / "grpo"
    _banner(f"4/5 GRPO: {grpo_cfg.grpo.steps} steps x {grpo_cfg.grpo.prompts_per_step} prompts x "
            f"G={grpo_cfg.grpo.num_generations}, rewards {grpo_cfg.rewards}, loss {grpo_cfg.grpo.loss_type}")
    plots: list[str]
    after_greedy: EvalResult | None = None
    done = _done(grpo_dir)
    if done is None:
        t0 = time.perf_counter()
        result = run_grpo(grpo_cfg, resume=(grpo_dir / "checkpoints").is_dir(), before=_as_eval_result(before))
        after_greedy = result.after
        timings["grpo"] = time.perf_counter() - t0
        plots = [str(p) for p in result.plots]
        _mark_done(grpo_dir, {"steps": result.step, "seconds": timings["grpo"], "plots": plots})
        _invalidate(out, after="grpo")
    else:
        plots = done["plots"]
        print(f"cached: {grpo_dir} (delete it to redo this stage)")

    # 5. evaluation after RL
    after_file = out / "eval_after.json"
    _banner("5/5 evaluation after RL on the same held-out problems")
    if after_file.is_file():
        after = json.loads(after_file.read_text())
        print(f"cached: {after_file}")
    else:
        t0 = time.perf_counter()
        after = _evaluate_checkpoint(_newest_model(grpo_dir), held_out, max_tokens, pass_at_k_problems,
                                      grpo_cfg.grpo.temperature, greedy=after_greedy)
        timings["eval_after"] = time.perf_counter() - t0
        write_json(after_file, after)

    summary = _report(before, after, plots, grpo_cfg.grpo.steps)
    summary["timings"] = timings
    summary["seconds"] = time.perf_counter() - t_all
    write_json(out / "summary.json", summary)
    print(f"\ndemo finished in {summary['seconds'] / 60:.1f} min (stages run now: "
          + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"); everything is under {out}")
    return summary


def _report(before: dict[str, Any], after: dict[str, Any], plots: list[str], steps: int) -> dict[str, Any]:
    n = before["problems"]
    gain = after["accuracy"] - before["accuracy"]
    # The two evaluations are on the same problems: the standard error of the paired difference.
    diffs = [float(a) - float(b) for a, b in zip(after["correct"], before["correct"])]
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / max(n - 1, 1) / n)
    k = f"pass@{PASS_AT_K}"
    rows = [("held-out accuracy (greedy)", before["accuracy"], after["accuracy"]),
            ("format rate", before["format_rate"], after["format_rate"]),
            ("response length (tokens)", before["response_length"], after["response_length"]),
            ("sampled pass@1", before["pass@1"], after["pass@1"]),
            (f"sampled {k}", before[k], after[k])]
    print(f"\n{'':30s}{'after SFT':>12s}{'after GRPO':>12s}")
    for name, b, a in rows:
        print(f"{name:30s}{b:12.3f}{a:12.3f}" if "length" not in name else f"{name:30s}{b:12.1f}{a:12.1f}")
    z = gain / se if se > 0 else float("inf") if gain > 0 else 0.0
    print(f"\nGRPO gain: {gain:+.3f} accuracy on {n} held-out problems ({steps} steps), {z:.1f} standard errors "
          f"(paired SE {se:.3f}); those problems are test-split: in no pretraining, SFT or RL data.")
    if plots:
        print("plots: " + ", ".join(plots))
    print("\nsample reasoning trace (held-out problem, after GRPO, greedy):")
    print(f"  question: {after['sample_question']}")
    print(f"  reference answer: {after['sample_answer']}")
    print("  completion: <think>\n" + "\n".join("    " + line for line in after["sample_completion"].splitlines()))
    return {"before": {k2: v for k2, v in before.items() if k2 != "correct"},
            "after": {k2: v for k2, v in after.items() if k2 != "correct"},
            "gain": gain, "gain_se": se, "gain_z": z, "plots": plots}
