"""Training: pretraining and SFT with auxiliary-loss-free MoE balancing, MTP loss and exact resume.

Small modules with one job each, reused by GRPO and distillation:
- config.py: run configs (dataclasses <- YAML + dotted command-line overrides) and the sections every run config
  shares (`ModelSection`, `TrainConfig`, `LogConfig`, the `ProblemSource` every `data:` section extends);
- prologue.py: the start of every run (run directory, saved config, seeds, device);
- schedule.py: AdamW with matrix-only decay, warmup + cosine;
- balance.py: the router-bias update, expert-load tracking and statistics, the optional aux loss;
- guard.py: the non-finite loss / gradient guard;
- loss.py: next-token CE + MTP + aux, exact token mean under gradient accumulation; held-out loss;
- checkpointing.py: atomic training checkpoints (HF model dir + tokenizer + optimizer/scheduler/RNG/data state);
- metrics.py: metrics.jsonl, TensorBoard, tqdm;
- trainer.py: the loop; data.py and run.py: from a run config to a finished run; plots.py: PNGs of a run.
"""

from r1forge.train.balance import (
    ExpertLoadTracker, load_fractions, load_ratios, moe_layers, set_aux_loss_alpha, update_router_biases,
)
from r1forge.train.checkpointing import (
    latest_checkpoint, list_checkpoints, load_training_checkpoint, resolve_model_dir, save_training_checkpoint,
)
from r1forge.train.config import (
    LogConfig, ModelSection, PretrainDataConfig, PretrainRunConfig, SFTDataConfig, SFTRunConfig, TrainConfig,
    apply_overrides, config_from_dict, config_to_dict, load_run_config, save_run_config,
)
from r1forge.train.guard import NonFiniteGuard
from r1forge.train.loss import CausalLMLoss, LossOutput, TrainingLoss, evaluate_loss, mtp_labels
from r1forge.train.metrics import MetricsLogger, Progress, read_metrics
from r1forge.train.run import run_pretrain, run_sft
from r1forge.train.schedule import build_optimizer, build_scheduler, warmup_cosine
from r1forge.train.trainer import Trainer, TrainResult, enable_activation_checkpointing

__all__ = [
    "ExpertLoadTracker", "load_fractions", "load_ratios", "moe_layers", "set_aux_loss_alpha", "update_router_biases",
    "latest_checkpoint", "list_checkpoints", "load_training_checkpoint", "resolve_model_dir",
    "save_training_checkpoint", "LogConfig", "ModelSection", "PretrainDataConfig", "PretrainRunConfig",
    "SFTDataConfig", "SFTRunConfig", "TrainConfig", "apply_overrides", "config_from_dict", "config_to_dict",
    "load_run_config", "save_run_config", "NonFiniteGuard", "CausalLMLoss", "LossOutput", "evaluate_loss",
    "mtp_labels", "TrainingLoss", "MetricsLogger", "Progress", "read_metrics", "run_pretrain", "run_sft",
    "build_optimizer", "build_scheduler", "warmup_cosine", "Trainer", "TrainResult",
    "enable_activation_checkpointing",
]
