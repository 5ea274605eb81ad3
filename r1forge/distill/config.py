"""`DistillRunConfig`: the YAML run config of `r1forge distill` (loaded by r1forge.train.config's machinery).

    cfg = load_run_config(DistillRunConfig, "configs/distill_tiny.yaml", ["--mode", "kl", "--train.steps", "200"])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from r1forge.parallel.config import ParallelConfig
from r1forge.rl.templates import TEMPLATES
from r1forge.train.config import LogConfig, ProblemSet, TrainConfig, finite_number

MODES = ("sft", "kl")
SEQUENCES = ("teacher", "dataset")


@dataclass
class StudentSection:
    """The student: by default the teacher's architecture with no MoE layers, freshly initialised; or a Qwen2 /
    Llama student (R1-Distill's architectures) from a preset or a config.json, scaled by the shape fields."""

    init_from: str | None = None  # checkpoint or run directory to start from instead of a fresh init
    preset: str | None = None  # a Qwen2/Llama preset, e.g. deepseek-r1-distill-qwen-1.5b or tiny-qwen2 (fresh init)
    config: str | None = None  # or a student config.json file (model_type qwen2 or llama; fresh init)
    dense: bool = True  # every layer a dense FFN (first_k_dense_replace = num_hidden_layers), as R1's students
    num_hidden_layers: int | None = None  # fewer layers than the teacher; null keeps the teacher's
    hidden_size: int | None = None  # narrower than the teacher; null keeps the teacher's
    intermediate_size: int | None = None  # dense FFN width; null keeps the teacher's
    num_attention_heads: int | None = None  # null keeps the teacher's
    overrides: dict[str, Any] = field(default_factory=dict)  # any other config field (not vocab_size)
    mtp: bool = False  # give the student one MTP module, trained with train.mtp_lambda (a drafter for speculation)

    def validate(self, prefix: str = "student") -> None:
        given = [k for k in ("init_from", "preset", "config") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"{prefix}: give at most one of init_from, preset and config, got {', '.join(given)}")
        for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"{prefix}.{key} must be positive (or null for the teacher's), got {value}")
        if self.init_from is not None and (self.overrides or any(
                getattr(self, k) is not None for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                                       "num_attention_heads"))):
            raise ValueError(f"{prefix}: shape fields cannot reshape a pretrained student ({prefix}.init_from is set)")


@dataclass
class DistillDataConfig(ProblemSet):
    """Prompts to collect teacher traces on, the sequences to distil on, the held-out problems. `files` are JSONL
    prompts {"question", "answer"} (chat records when sequences is "dataset"); held-out: `eval_files` of
    {"question", "answer"}, else test-split problems."""

    template: str = "chat"  # prompt template: "chat" (R1's, opens <think>) or "r1-zero"
    sequences: str = "teacher"  # what to train on: "teacher" traces sampled here, or "dataset" conversations (kl mode)
    samples_per_prompt: int = 4  # teacher samples per prompt
    temperature: float = 1.0  # teacher sampling temperature
    top_p: float = 1.0  # teacher sampling nucleus mass
    max_tokens: int = 256  # longest teacher sample and evaluation completion, in tokens
    only_correct: bool = True  # keep only teacher samples that check out (rejection sampling); false: all finished
    max_per_prompt: int | None = None  # keep at most this many traces per prompt (null: all)
    max_len: int = 256  # longest training conversation in tokens

    def validate(self, prefix: str = "data") -> None:
        super().validate(prefix)
        for key in ("samples_per_prompt", "max_tokens", "max_len"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{prefix}.{key} must be positive, got {getattr(self, key)}")
        if self.template not in TEMPLATES:
            raise ValueError(f"{prefix}.template must be one of {TEMPLATES}, got {self.template!r}")
        if self.sequences not in SEQUENCES:
            raise ValueError(f"{prefix}.sequences must be one of {SEQUENCES}, got {self.sequences!r}")
        if finite_number(self, prefix, "temperature") < 0:
            raise ValueError(f"{prefix}.temperature must be >= 0, got {self.temperature}")
        if not 0 < finite_number(self, prefix, "top_p") <= 1:
            raise ValueError(f"{prefix}.top_p must be in (0, 1], got {self.top_p}")
        if self.max_per_prompt is not None and self.max_per_prompt <= 0:
            raise ValueError(f"{prefix}.max_per_prompt must be positive or null, got {self.max_per_prompt}")


@dataclass
class KLConfig:
    """Forward-KL distillation (mode: kl)."""

    temperature: float = 1.0  # tau: both distributions are softmax(logits / tau); the loss is scaled by tau^2
    ce_weight: float = 0.0  # plus this times the cross-entropy on the sequences' own tokens

    def validate(self, prefix: str = "kl") -> None:
        if finite_number(self, prefix, "temperature") <= 0:
            raise ValueError(f"{prefix}.temperature must be > 0, got {self.temperature}")
        if finite_number(self, prefix, "ce_weight") < 0:
            raise ValueError(f"{prefix}.ce_weight must be >= 0, got {self.ce_weight}")


def _distill_train() -> TrainConfig:
    # mtp_lambda only acts on a student with an MTP module (student.mtp): V3's later weight.
    return TrainConfig(steps=300, lr=1e-3, warmup_steps=20, weight_decay=0.0, mtp_lambda=0.1)


@dataclass
class DistillRunConfig:
    """`r1forge distill CONFIG.yaml`."""

    run_dir: str = "runs/distill"  # config.yaml, traces.jsonl, report.json, metrics.jsonl, checkpoints/
    seed: int = 0  # seeds the student's init, the sampling and the data order
    teacher: str | None = None  # the teacher's checkpoint or run directory (with its tokenizer); required
    mode: str = "sft"  # "sft": train on teacher traces; "kl": match the teacher's token distributions (forward KL)
    student: StudentSection = field(default_factory=StudentSection)  # the student's shape or init
    data: DistillDataConfig = field(default_factory=lambda: DistillDataConfig(synthetic_problems=1000))  # prompts
    kl: KLConfig = field(default_factory=KLConfig)  # forward-KL settings (mode: kl)
    train: TrainConfig = field(default_factory=_distill_train)  # the student's optimisation
    log: LogConfig = field(default_factory=lambda: LogConfig(eval_every=0, save_every=100))  # logging, checkpoints
    # under torchrun: the student FSDP2-sharded as in pretraining (train.batch_size is global); the teacher's
    # traces and every evaluation split over the ranks
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self, prefix: str = "") -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "sft" and self.data.sequences == "dataset":
            raise ValueError("mode 'sft' with data.sequences 'dataset' is plain SFT on the reference solutions, not "
                             "distillation: use `r1forge sft`, or data.sequences 'teacher'")
