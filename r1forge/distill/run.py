"""`run_distill`: a distillation run config -> teacher, student, sequences, a `Trainer`, and a before/after report.

    from r1forge.distill import DistillRunConfig, run_distill
    from r1forge.train import load_run_config
    result = run_distill(load_run_config(DistillRunConfig, "configs/distill_tiny.yaml", ["--mode", "kl"]))

The steps (DeepSeek-R1 section 2.4, "Distillation"):
  1. load the teacher and its tokenizer; derive the student (dense by default, see student.py) or load it;
  2. greedy held-out accuracy of the teacher and of the untrained student (the "before"; or the caller's own);
  3. sequences: the teacher's own traces, N per prompt, only the correct ones by default (rejection sampling,
     r1forge.rl.rejection; written to RUN_DIR/traces.jsonl), or a dataset's conversations (mode kl only);
  4. train the student with `r1forge.train.Trainer`: cross-entropy on the traces (mode sft) or forward KL to
     the teacher's distributions (mode kl), assistant tokens only either way;
  5. greedy held-out accuracy of the student again; RUN_DIR/report.json holds all of it.
A run with checkpoints continues only with `resume=True`, reusing its traces and its "before" numbers.

Under torchrun (`torchrun --nproc-per-node 2 -m r1forge distill CONFIG`) every rank holds the teacher; the
traces and every evaluation are split over the ranks by prompt (prompt i keeps seed + i, so the records are the
1-process ones) and merged; the student trains FSDP2-sharded through the same `Trainer` as pretraining, each
rank on its share of every global batch (train.batch_size), gradients reduced over ranks; it is evaluated
after training through an unsharded copy gathered on every rank (`weight_sync_s` in the report). Rank 0 writes
the run directory; the final sharded checkpoint is also exported to the Hugging Face layout.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from r1forge.accounting import count_parameters
from r1forge.auto_config import load_config
from r1forge.data import SFTDataset, read_jsonl, sft_messages
from r1forge.data.jsonl import write_json, write_jsonl
from r1forge.distill.config import DistillDataConfig, DistillRunConfig
from r1forge.distill.loss import ForwardKLLoss
from r1forge.distill.student import build_student, dense_student_config, other_architecture_student_config
from r1forge.parallel import ParallelMesh, parallelize
from r1forge.parallel.gather import unsharded_copy
from r1forge.parallel.rl import evaluate_sharded, rejection_sample_sharded
from r1forge.rl.evaluate import EvalResult
from r1forge.rl.examples import train_and_held_out
from r1forge.rl.policy import load_policy, sampling_engine
from r1forge.train.checkpointing import resolve_model_dir
from r1forge.train.data import make_loader
from r1forge.train.prologue import start_parallel_run
from r1forge.train.run import check_global_batch
from r1forge.train.trainer import Trainer

if TYPE_CHECKING:
    from r1forge.engine import LLM

TRACES_FILE = "traces.jsonl"
REPORT_FILE = "report.json"
_BEFORE_FILE = "before.json"  # the untrained student's numbers and the traces' statistics, for --resume


@dataclass
class DistillResult:
    status: str  # the Trainer's: "completed" or "diverged"
    teacher: EvalResult
    student_before: EvalResult | None  # None when resumed without a saved "before"
    student_after: EvalResult
    num_sequences: int  # training conversations
    checkpoint: Path | None
    report: dict[str, Any]


def dataset_conversations(cfg: DistillDataConfig, seed: int) -> list[dict[str, Any]]:
    """Chat records to distil on when data.sequences is "dataset": `files`' records, or built-in solutions."""
    from r1forge.data import validate_chat_record

    if cfg.files:
        return [r for path in cfg.files for r in read_jsonl(path, validate_chat_record)[0]]
    return [{"messages": sft_messages(p)} for p in cfg.problems(cfg.synthetic_problems, seed, "train")]


def teacher_traces(llm: LLM, tokenizer: Any, examples: list[dict[str, Any]], cfg: DistillDataConfig,
                   seed: int, mesh: ParallelMesh | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The teacher's traces on the training prompts (correct ones only unless `only_correct` is false); under a
    data-parallel `mesh` each rank samples its share of the prompts and every rank gets all the traces."""
    records, stats = rejection_sample_sharded(
        mesh or ParallelMesh.single(), llm, tokenizer, examples, cfg.samples_per_prompt, template=cfg.template,
        temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, seed=seed,
        require_correct=cfg.only_correct, require_format=cfg.only_correct, max_per_prompt=cfg.max_per_prompt)
    return records, stats.to_dict()


def _params(model: torch.nn.Module) -> dict[str, int]:
    total, active = count_parameters(model.config)
    return {"total": total, "active": active, "moe_layers": len(model.moe_layers()),
            "model_type": model.config.model_type}


def make_student(cfg: DistillRunConfig, teacher: torch.nn.Module, tokenizer: Any,
                 device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The student of `cfg.student` and the tokenizer it reads: loaded from `init_from` (with its own tokenizer
    when the directory has one), or built fresh on the teacher's tokenizer from the teacher's config, a
    preset or a config.json."""
    section = cfg.student
    shape = dict(num_hidden_layers=section.num_hidden_layers, hidden_size=section.hidden_size,
                 intermediate_size=section.intermediate_size, num_attention_heads=section.num_attention_heads)
    if section.init_from is not None:
        from r1forge.data import load_tokenizer
        from r1forge.loading import load_model

        student_dir = resolve_model_dir(section.init_from)
        with_mtp = section.mtp and load_config(student_dir).num_nextn_predict_layers > 0
        student = load_model(student_dir, device=device, with_mtp=with_mtp)
        if (student_dir / "tokenizer.json").is_file():
            tokenizer = load_tokenizer(student_dir)
        if student.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"student.init_from: vocab_size {student.config.vocab_size} is smaller than its "
                             f"tokenizer's {tokenizer.vocab_size} (the teacher's, as {student_dir} has no "
                             f"tokenizer.json)")
        student.train()
        return student, tokenizer
    source = section.preset or section.config
    if source is not None:
        if section.mtp:
            raise ValueError("student.mtp: only a DeepSeek-shaped student has an MTP module; a student.preset / "
                             "student.config student (Qwen2, Llama) has none")
        config = other_architecture_student_config(teacher.config, source, **shape, **section.overrides)
    else:
        config = dense_student_config(teacher.config, dense=section.dense, **shape,
                                      **({"num_nextn_predict_layers": 1} if section.mtp else {}), **section.overrides)
    return build_student(config, seed=cfg.seed, device=device), tokenizer


def check_shared_vocabulary(teacher: torch.nn.Module, student: torch.nn.Module, teacher_tokenizer: Any,
                            student_tokenizer: Any, mode: str) -> None:
    """Forward KL compares the two models' distributions token by token: they must mean the same tokens."""
    if mode != "kl":
        return
    if student.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(f"mode kl needs a shared vocabulary: the student's vocab_size {student.config.vocab_size} "
                         f"differs from the teacher's {teacher.config.vocab_size}; use mode sft")
    if student_tokenizer is not teacher_tokenizer and teacher_tokenizer.vocabulary() != student_tokenizer.vocabulary():
        raise ValueError("mode kl needs a shared vocabulary: the student's tokenizer (student.init_from) differs "
                         "from the teacher's; use mode sft (the traces are re-tokenised for the student) or a "
                         "student on the teacher's tokenizer")


def _given_evaluation(result: EvalResult | None, n_eval: int, key: str) -> EvalResult | None:
    """A caller's own evaluation, used in place of one of this run's: it must cover these held-out problems."""
    if result is not None and result.num_problems != n_eval:
        raise ValueError(f"{key}: an evaluation of {result.num_problems} problems was given, but the run holds out "
                         f"{n_eval} (data.synthetic_eval_problems)")
    return result


def run_distill(cfg: DistillRunConfig, resume: bool = False, *, teacher_eval: EvalResult | None = None,
                student_before: EvalResult | None = None) -> DistillResult:
    """Distil `cfg.teacher` into a student as `cfg` says (see the module docstring).

    `teacher_eval` / `student_before`: greedy evaluations of the teacher and of the student's starting point on
    this run's held-out problems that the caller already made (the demo evaluated both as stages of their own);
    given, they go into the report instead of evaluating the same models on the same problems a second time.
    """
    if cfg.teacher is None:
        raise ValueError("teacher: required (a checkpoint or run directory with a tokenizer)")
    mesh, start = start_parallel_run(cfg, cfg.parallel, resume, cfg.train.device, "train.device",
                                     check=lambda mesh: check_global_batch(cfg.train.batch_size, mesh))
    run_dir, checkpoint, device = start.run_dir, start.checkpoint, start.device
    main = mesh.is_main  # rank 0 prints and writes for the run
    say = print if main else (lambda *args, **kwargs: None)

    teacher, tokenizer, teacher_dir = load_policy(cfg.teacher, device, key="teacher")
    student, student_tokenizer = make_student(cfg, teacher, tokenizer, device)
    check_shared_vocabulary(teacher, student, tokenizer, student_tokenizer, cfg.mode)
    train_examples, held_out = train_and_held_out(cfg.data, cfg.seed)
    data = cfg.data
    n_eval = len(held_out)
    given_teacher = _given_evaluation(teacher_eval, n_eval, "teacher_eval")
    given_before = _given_evaluation(student_before, n_eval, "student_before")

    def evaluate(llm: LLM, tok: Any) -> EvalResult:  # every rank its share of the held-out problems
        return evaluate_sharded(mesh, llm, tok, held_out, data.template, data.max_tokens)

    teacher_params = _params(teacher)
    say(f"distill ({cfg.mode}): teacher {teacher_dir} {teacher_params} -> student {_params(student)}, "
        f"{len(train_examples)} prompts, {n_eval} held-out problems, device {device}"
        + (f", {mesh.world_size} data-parallel ranks" if mesh.distributed else ""))

    sampled = train_examples if data.sequences == "teacher" else []
    teacher_llm = sampling_engine(teacher, tokenizer, sampled + held_out, data.template, data.max_tokens,
                                  max(len(sampled) * data.samples_per_prompt, n_eval))
    teacher_eval = given_teacher if given_teacher is not None else evaluate(teacher_llm, tokenizer)
    say(f"teacher: accuracy {teacher_eval.accuracy:.3f} +- {teacher_eval.stderr:.3f} on {n_eval} held-out problems")

    traces_path = run_dir / TRACES_FILE
    trace_stats: dict[str, Any] | None = None
    trace_seconds: float | None = None  # sampling the traces (None when they were read back or not sampled)
    if data.sequences == "dataset":
        records = dataset_conversations(data, cfg.seed)
    elif checkpoint is not None and traces_path.is_file():
        records = read_jsonl(traces_path)[0]
        say(f"resumed: {len(records)} teacher traces from {traces_path}")
    else:
        t0 = time.perf_counter()
        records, trace_stats = teacher_traces(teacher_llm, tokenizer, train_examples, data, cfg.seed, mesh)
        trace_seconds = time.perf_counter() - t0
        if main:
            write_jsonl(traces_path, records)
        say(f"teacher traces: {len(records)} of {trace_stats['total']} samples kept "
            f"(pass@1 {trace_stats['pass_at_1']:.3f}) -> {traces_path}")
    del teacher_llm
    if not records:
        raise ValueError(f"no training sequences: the teacher got no prompt right in {data.samples_per_prompt} "
                         "samples; raise data.samples_per_prompt or set data.only_correct false")

    student_llm = sampling_engine(student, student_tokenizer, held_out, data.template, data.max_tokens, n_eval)
    before: EvalResult | None = None
    before_path = run_dir / _BEFORE_FILE
    if checkpoint is None:
        before = given_before if given_before is not None else evaluate(student_llm, student_tokenizer)
        if main:
            write_json(before_path, {"student_before": before.to_dict(), "traces": trace_stats,
                                     "trace_seconds": trace_seconds})
        say(f"student before: accuracy {before.accuracy:.3f} +- {before.stderr:.3f}")
    mesh.barrier()  # (rank 0 has written before.json)
    saved = json.loads(before_path.read_text()) if before_path.is_file() else {}

    train_ds = SFTDataset(student_tokenizer, data.max_len, records=records, seed=cfg.seed)  # text re-tokenised
    loss = ForwardKLLoss(teacher, cfg.kl.temperature, cfg.kl.ce_weight,
                         mtp_lambda=cfg.train.mtp_lambda) if cfg.mode == "kl" else None
    if loss is None:
        del teacher  # SFT needs only the traces
    student.train()
    student_params = _params(student)
    if mesh.distributed:  # the engine cannot read sharded weights: it gets an unsharded copy after training
        del student_llm
        student = parallelize(student, mesh, cfg.train.bf16)
    loader = make_loader(train_ds, cfg.train.batch_size // mesh.world_size, cfg.seed, mesh.rank, mesh.world_size)
    trainer = Trainer(student, loader, cfg.train, cfg.log, run_dir, eval_batches=None, tokenizer=student_tokenizer,
                      loss=loss, run_info={"kind": f"distill-{cfg.mode}", "train_rows": len(train_ds),
                                           "teacher": str(teacher_dir), "world_size": mesh.world_size},
                      parallel=mesh)
    if checkpoint is not None:
        trainer.resume(checkpoint)
        say(f"resumed from {checkpoint} (step {trainer.step})")
    t0 = time.perf_counter()
    result = trainer.fit()
    train_seconds = time.perf_counter() - t0

    weight_sync_s = 0.0
    if mesh.distributed:
        t0 = time.perf_counter()
        evaluated = unsharded_copy(student, mesh)  # the student's weights, gathered on every rank
        weight_sync_s = time.perf_counter() - t0
        student_llm = sampling_engine(evaluated, student_tokenizer, held_out, data.template, data.max_tokens,
                                      n_eval)
        if main and result.checkpoint is not None:  # the HF layout beside the shards, for load_model / init_from
            from r1forge.parallel.checkpoint import export_checkpoint

            export_checkpoint(result.checkpoint, result.checkpoint)
        mesh.barrier()
    else:
        student.eval()
        student_llm.reset_prefix_cache()
    after = evaluate(student_llm, student_tokenizer)
    report = {"mode": cfg.mode, "status": result.status, "step": result.step, "teacher_dir": str(teacher_dir),
              "teacher": teacher_eval.to_dict(),
              "student_before": before.to_dict() if before else saved.get("student_before"),
              "student_after": after.to_dict(), "num_sequences": len(records),
              "traces": trace_stats or saved.get("traces"), "teacher_params": teacher_params,
              "trace_seconds": trace_seconds if trace_seconds is not None else saved.get("trace_seconds"),
              "student_params": student_params, "student_config": dataclasses.asdict(student.config),
              "checkpoint": str(result.checkpoint) if result.checkpoint else None,
              "world_size": mesh.world_size, "weight_sync_s": weight_sync_s,
              "train_seconds": train_seconds}  # this process's share when resumed
    if main:
        write_json(run_dir / REPORT_FILE, report)
    before_acc = report["student_before"]["accuracy"] if report["student_before"] else float("nan")
    say(f"held-out accuracy: teacher {teacher_eval.accuracy:.3f}, student untrained {before_acc:.3f}, student "
        f"distilled {after.accuracy:.3f} +- {after.stderr:.3f} ({n_eval} problems) -> {run_dir / REPORT_FILE}")
    return DistillResult(result.status, teacher_eval, before, after, len(records), result.checkpoint, report)
