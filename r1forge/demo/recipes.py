"""`run_demo`: the stages of the R1 recipe (or R1-Zero's) chained under one directory, then the report.

The stages' run configs are the shipped configs/*_tiny.yaml (one source: `r1forge pretrain
configs/pretrain_tiny.yaml` trains exactly the demo's first stage); the demo only places them under OUT_DIR,
chains them (init_from, teacher, tokenizer) and pins the CPU, so the table is the same on every machine.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from r1forge.data.jsonl import write_json
from r1forge.demo.distillation import run_distillation
from r1forge.demo.evaluation import PASS_AT_K, as_eval_result, evaluate_checkpoint, evaluation_record
from r1forge.demo.report import print_before_after, print_distillation, print_sample_traces
from r1forge.demo.stages import StageCache, banner
from r1forge.distill.config import DistillRunConfig
from r1forge.rl.config import GRPORunConfig
from r1forge.rl.examples import train_and_held_out
from r1forge.train.config import PretrainRunConfig, SFTRunConfig, load_run_config
from r1forge.train.checkpointing import resolve_model_dir

RECIPES = ("r1", "r1-zero")
CONFIGS_DIR = Path(__file__).resolve().parent.parent.parent / "configs"
PASS_AT_K_PROBLEMS = 200
# stage -> (config file, config class)
STAGE_FILES: dict[str, tuple[str, type]] = {
    "pretrain": ("pretrain_tiny.yaml", PretrainRunConfig),
    "sft": ("sft_tiny.yaml", SFTRunConfig),
    "grpo": ("grpo_tiny.yaml", GRPORunConfig),
    "student_base": ("pretrain_student_tiny.yaml", PretrainRunConfig),
    "distill": ("distill_tiny.yaml", DistillRunConfig),
    "student_sft": ("sft_tiny.yaml", SFTRunConfig),
    "student_grpo": ("grpo_tiny.yaml", GRPORunConfig),
    "r1_zero": ("grpo_r1_zero_tiny.yaml", GRPORunConfig),
}
# what each output under OUT_DIR is computed from (a rebuilt output makes everything downstream of it stale)
DEPENDS_ON: dict[str, list[str]] = {
    "pretrain": [],
    "sft": ["pretrain"],
    "eval_before.json": ["sft"],
    "grpo": ["sft"],
    "eval_after.json": ["grpo"],
    "student-base": ["pretrain"],  # the teacher's tokenizer
    "student_base.json": ["student-base"],
    "distill": ["grpo", "student-base"],
    "student-sft": ["student-base"],
    "student-grpo": ["student-sft", "distill"],  # its CPU time is the distillation arm's
    "r1-zero/eval_before.json": ["pretrain"],
    "r1-zero/grpo": ["pretrain"],
    "r1-zero/eval_after.json": ["r1-zero/grpo"],
}

def _placement(out: Path) -> dict[str, list[str]]:
    """Where each stage writes and what it starts from, as command-line overrides."""
    return {
        "pretrain": ["--run_dir", str(out / "pretrain"), "--train.device", "cpu"],
        "sft": ["--run_dir", str(out / "sft"), "--model.init_from", str(out / "pretrain"), "--train.device", "cpu"],
        "grpo": ["--run_dir", str(out / "grpo"), "--model.init_from", str(out / "sft"), "--device", "cpu"],
        "student_base": ["--run_dir", str(out / "student-base"), "--data.tokenizer", str(out / "pretrain" / "tokenizer"),
                         "--train.device", "cpu"],
        "distill": ["--run_dir", str(out / "distill"), "--teacher", str(out / "grpo"),
                    "--student.init_from", str(out / "student-base"), "--train.device", "cpu"],
        "student_sft": ["--run_dir", str(out / "student-sft"), "--model.init_from", str(out / "student-base"),
                        "--train.device", "cpu"],
        "student_grpo": ["--run_dir", str(out / "student-grpo"), "--model.init_from", str(out / "student-sft"),
                         "--device", "cpu", "--log.eval_every", "0", "--log.eval_before", "false",
                         "--log.plots", "false"],
        "r1_zero": ["--run_dir", str(out / "r1-zero" / "grpo"), "--model.init_from", str(out / "pretrain"),
                    "--device", "cpu"],
    }


def stage_configs(out_dir: str | Path, overrides: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Every stage's run config: configs/*_tiny.yaml placed under `out_dir`, each starting from the stage it
    builds on, on the CPU; then `overrides` (dotted, per stage, as on the command line)."""
    overrides = overrides or {}
    unknown = set(overrides) - set(STAGE_FILES)
    if unknown:
        raise ValueError(f"overrides: unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGE_FILES)}")
    if not CONFIGS_DIR.is_dir():
        raise FileNotFoundError(f"{CONFIGS_DIR}: the demo runs the repository's configs/*_tiny.yaml; run it from a "
                                "source checkout (pip install -e .)")
    placement = _placement(Path(out_dir))
    return {stage: load_run_config(cls, CONFIGS_DIR / name, placement[stage] + list(overrides.get(stage, [])))
            for stage, (name, cls) in STAGE_FILES.items()}


def _check_same_held_out(configs: dict[str, Any], held_out: list[dict[str, Any]]) -> None:
    """The distillation stage evaluates on its own held-out problems: they must be the GRPO stage's, so that
    teacher, students and the R1 table are scored on the same problems (paired)."""
    distill = configs["distill"]
    _, theirs = train_and_held_out(distill.data, distill.seed)
    if [ex["question"] for ex in theirs] != [ex["question"] for ex in held_out]:
        raise ValueError("distill stage: its held-out problems differ from the grpo stage's; give both the same "
                         "data.synthetic_eval_problems, min_steps, max_steps, max_operand, kinds and seed")


def run_demo(out_dir: str | Path = "runs/demo", recipe: str = "r1", grpo_steps: int | None = None,
             overrides: dict[str, list[str]] | None = None, pass_at_k_problems: int = PASS_AT_K_PROBLEMS,
             distill: bool = True) -> dict[str, Any]:
    """Run (or continue) every stage of `recipe`; print the report; return its numbers (also in summary.json).

    Args:
        out_dir: every stage writes under it; a finished stage there is skipped.
        recipe: "r1" (cold start, RL, distillation) or "r1-zero" (RL straight from the pretrained base).
        grpo_steps: GRPO steps instead of the config's.
        overrides: dotted config overrides per stage (see STAGE_FILES), e.g. {"pretrain": ["--train.steps", "100"]}.
        pass_at_k_problems: held-out problems sampled k times for pass@1 / pass@k.
        distill: run the distillation stage (recipe r1).
    """
    from r1forge.train import run_pretrain

    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    configs = stage_configs(out_dir, overrides)
    rl_stage = "grpo" if recipe == "r1" else "r1_zero"
    grpo_cfg = configs[rl_stage]
    if grpo_steps is not None:
        grpo_cfg.grpo.steps = grpo_steps
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = StageCache(out, DEPENDS_ON)
    t_all = time.perf_counter()

    n = 6 if recipe == "r1" and distill else 5 if recipe == "r1" else 4
    banner(f"1/{n} tokenizer + pretraining a tiny MLA + DeepSeekMoE model on the built-in corpus")
    cache.train("pretrain", lambda resume: run_pretrain(configs["pretrain"], resume=resume))

    # the R1-Zero recipe's outputs live under OUT_DIR/r1-zero/, beside the R1 recipe's, on the same base
    prefix, start_dir, template = ("", out / "sft", "chat") if recipe == "r1" else \
        ("r1-zero/", out / "pretrain", grpo_cfg.grpo.template)
    if recipe == "r1":
        from r1forge.train import run_sft

        banner(f"2/{n} cold-start SFT: <think> steps </think> <answer> for some problems, a terse answer for others")
        cache.train("sft", lambda resume: run_sft(configs["sft"], resume=resume))
    _, held_out = train_and_held_out(grpo_cfg.data, grpo_cfg.seed)
    held_out = held_out[: grpo_cfg.log.eval_problems]
    max_tokens = grpo_cfg.grpo.max_completion_length
    temperature = grpo_cfg.grpo.temperature
    k_problems = min(pass_at_k_problems, len(held_out))

    stage = 3 if recipe == "r1" else 2
    banner(f"{stage}/{n} evaluation before RL: {len(held_out)} held-out problems, greedy; pass@{PASS_AT_K} on "
           f"{k_problems}")
    before = cache.record(prefix + "eval_before.json", lambda: evaluate_checkpoint(
        resolve_model_dir(start_dir), held_out, max_tokens, template, k_problems, temperature))
    print(f"greedy accuracy {before['accuracy']:.3f} +- {before['stderr']:.3f}; sampled pass@1 "
          f"{before['pass@1']:.3f}, pass@{PASS_AT_K} {before[f'pass@{PASS_AT_K}']:.3f}")

    banner(f"{stage + 1}/{n} GRPO: {grpo_cfg.grpo.steps} steps x {grpo_cfg.grpo.prompts_per_step} prompts x "
           f"G={grpo_cfg.grpo.num_generations}, rewards {grpo_cfg.rewards}, loss {grpo_cfg.grpo.loss_type}, "
           f"template {grpo_cfg.grpo.template}")
    from r1forge.rl.run import run_grpo

    after_greedy: dict[str, Any] = {}

    def grpo(resume: bool) -> Any:
        result = run_grpo(grpo_cfg, resume=resume, before=as_eval_result(before))
        if result.after is not None:
            after_greedy["record"] = evaluation_record(result.after)
        return result

    grpo_done = cache.train(prefix + "grpo", grpo, info=lambda r: {"steps": r.step, "plots": [str(p) for p in r.plots],
                                                             "train_seconds": r.train_seconds})

    banner(f"{stage + 2}/{n} evaluation after RL on the same held-out problems")

    after = cache.record(prefix + "eval_after.json", lambda: evaluate_checkpoint(
        resolve_model_dir(out / (prefix + "grpo")), held_out, max_tokens, template, k_problems, temperature,
        greedy=as_eval_result(after_greedy["record"]) if after_greedy else None))
    labels = ("after SFT", "after GRPO") if recipe == "r1" else ("base", "after GRPO")
    summary: dict[str, Any] = {"recipe": recipe}
    summary.update(print_before_after(before, after, held_out, grpo_done["steps"], labels))
    summary["before"] = {k: v for k, v in before.items() if not isinstance(v, list)}
    summary["after"] = {k: v for k, v in after.items() if not isinstance(v, list)}
    summary["plots"] = grpo_done["plots"]
    if grpo_done["plots"]:
        print("plots: " + ", ".join(grpo_done["plots"]))
    opens = template == "chat"
    summary["samples"] = print_sample_traces(after, held_out, opens, "sample reasoning traces after GRPO (the first "
                                             "held-out problem of each difficulty, greedy, as written):")

    if recipe == "r1" and distill:
        banner(f"6/{n} distillation: the RL-trained teacher into a small dense student, against RL alone")
        _check_same_held_out(configs, held_out)
        report = run_distillation(cache, configs, held_out, max_tokens, teacher_eval=after)
        print_distillation(report)
        summary["distillation"] = {k: ({k2: v2 for k2, v2 in v.items() if not isinstance(v2, list)}
                                       if isinstance(v, dict) else v) for k, v in report.items()}

    summary["timings"] = cache.timings
    summary["seconds"] = time.perf_counter() - t_all
    write_json(out / (prefix + "summary.json"), summary)
    print(f"\ndemo ({recipe}) finished in {summary['seconds'] / 60:.1f} min (stages run now: "
          + (", ".join(f"{k} {v:.0f}s" for k, v in summary["timings"].items()) or "none, all cached")
          + f"); everything is under {out}")
    return summary
