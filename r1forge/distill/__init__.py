"""Distillation (DeepSeek-R1 section 2.4): a smaller dense student learns from a teacher's traces (SFT) or its token
distributions (forward KL), and is compared with the teacher on held-out problems.

- student.py: the student's config (the teacher's architecture without MoE layers, optionally smaller);
- loss.py: the forward-KL loss, as a `TrainingLoss` for r1forge.train.Trainer;
- config.py: the `r1forge distill` run config; run.py: from a run config to a finished run and its report.
"""

from r1forge.distill.config import DistillDataConfig, DistillRunConfig, KLConfig, StudentSection
from r1forge.distill.loss import ForwardKLLoss, forward_kl
from r1forge.distill.run import DistillResult, make_student, run_distill
from r1forge.distill.student import build_student, dense_student_config

__all__ = [
    "DistillDataConfig", "DistillRunConfig", "KLConfig", "StudentSection", "ForwardKLLoss", "forward_kl",
    "DistillResult", "make_student", "run_distill", "build_student",
    "dense_student_config",
]
