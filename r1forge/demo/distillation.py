"""The demo's last stage, DeepSeek-R1 section 4.1: distil the RL-trained MoE teacher into a small dense
(Qwen2-shaped) student, and train the same student by RL alone for the same CPU time.

Both arms start from one student base, pretrained on the same corpus with the teacher's tokenizer (a student
that has never seen the arithmetic can neither imitate traces well nor earn a reward). The distillation arm is
rejection sampling + SFT: the teacher's correct traces on training prompts, then SFT on them (`r1forge
distill`, mode sft). The RL arm is the R1 recipe without a teacher: the same cold start the teacher had, then
GRPO stopped when its CPU time (cold start included) equals the distillation arm's (trace sampling included).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from r1forge.demo.evaluation import as_eval_result, evaluate_checkpoint, evaluation_record
from r1forge.demo.report import paired_gain
from r1forge.demo.stages import StageCache

MIN_RL_SECONDS = 10.0  # the RL arm always gets at least this much GRPO, however fast the cold start was


def _arch(model_dir: Path) -> str:
    from r1forge.accounting import count_parameters
    from r1forge.auto_config import load_config

    config = load_config(model_dir)
    total, active = count_parameters(config)
    if getattr(config, "model_type", "") in ("qwen2", "llama"):
        return f"dense {config.model_type}, {total / 1e6:.2f}M parameters"
    return f"MoE, {total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active"


def run_distillation(cache: StageCache, configs: dict[str, Any], held_out: list[dict[str, Any]], max_tokens: int,
                     teacher_eval: dict[str, Any]) -> dict[str, Any]:
    """Student base, distillation, RL alone, their evaluations; the comparison as a dict (cached)."""
    from r1forge.distill.run import run_distill
    from r1forge.rl.run import run_grpo
    from r1forge.train import run_pretrain, run_sft
    from r1forge.train.checkpointing import resolve_model_dir

    out = cache.out
    cache.train("student-base", lambda resume: run_pretrain(configs["student_base"], resume=resume))
    base_eval = cache.record("student_base.json", lambda: evaluate_checkpoint(
        resolve_model_dir(out / "student-base"), held_out, max_tokens, "chat"))

    # trace sampling counts in the distillation arm's time (none when it distils on the dataset's solutions)
    # the teacher's and the student base's evaluations are the stages' above: not made a second time
    done = cache.train("distill", lambda resume: run_distill(
        configs["distill"], resume=resume, teacher_eval=as_eval_result(teacher_eval),
        student_before=as_eval_result(base_eval)), info=lambda r: {
        "trace_seconds": r.report.get("trace_seconds") or 0.0,
        "train_seconds": r.report["train_seconds"], "after": evaluation_record(r.student_after)})
    distill_seconds = done["trace_seconds"] + done["train_seconds"]

    cold = cache.train("student-sft", lambda resume: run_sft(configs["student_sft"], resume=resume))
    grpo_cfg = configs["student_grpo"]
    grpo_cfg.grpo.time_limit_s = max(distill_seconds - cold["seconds"], MIN_RL_SECONDS)
    rl = cache.train("student-grpo", lambda resume: run_grpo(grpo_cfg, resume=resume),
                     info=lambda r: {"steps": r.step, "train_seconds": r.train_seconds,
                                     "after": evaluation_record(r.after)})
    rl_seconds = cold["seconds"] + rl["train_seconds"]

    distilled, rl_alone = done["after"], rl["after"]
    return {"teacher": teacher_eval, "student_base": base_eval, "distilled": distilled, "rl_alone": rl_alone,
            "distill_seconds": distill_seconds, "rl_seconds": rl_seconds, "rl_steps": rl["steps"],
            "teacher_arch": _arch(resolve_model_dir(out / "grpo")),
            "student_arch": _arch(resolve_model_dir(out / "student-base")),
            "distill_minus_rl": paired_gain(distilled["correct"], rl_alone["correct"])}
