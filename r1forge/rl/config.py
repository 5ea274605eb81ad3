"""`r1forge grpo`'s run config: the algorithm's options (`GRPOConfig`, named as TRL and verl users know them,
docs/design.md section 7), the prompts, the rewards and what is logged (loaded by r1forge.train.config's machinery).

    cfg = load_run_config(GRPORunConfig, "configs/grpo_tiny.yaml", ["--grpo.steps", "20"])
"""

from __future__ import annotations

from dataclasses import dataclass, field

from r1forge.parallel.config import ParallelConfig
from r1forge.rl.grpo_loss import LOSS_TYPES, SCALE_REWARDS
from r1forge.rl.rewards import combine_rewards
from r1forge.rl.templates import TEMPLATES
from r1forge.train.config import ModelSection, ProblemSet, finite_number, in_range


@dataclass
class GRPOConfig:
    """One GRPO run. Defaults are a small CPU-friendly R1-Zero setup."""

    steps: int = 100  # optimizer updates of the policy (each on one rollout batch)
    prompts_per_step: int = 16  # distinct prompts per rollout batch
    num_generations: int = 8  # G, completions per prompt (shares one prefill in the engine)
    max_prompt_length: int = 256  # longer prompts are skipped with a warning
    max_completion_length: int = 128  # tokens per completion at most
    max_completion_length_schedule: dict[int, int] = field(default_factory=dict)  # {step: new max length}
    temperature: float = 1.0  # sampling temperature (the logprobs are of this distribution)
    top_p: float = 1.0  # nucleus sampling during rollouts
    learning_rate: float = 1e-5  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW decoupled decay, on matrices only (as train.weight_decay)
    warmup_steps: int = 0  # linear warmup, then constant
    max_grad_norm: float = 1.0  # gradient clipping
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.99  # AdamW beta2
    num_iterations: int = 1  # mu: optimisation passes over each rollout batch
    micro_batch_size: int = 32  # completions per forward/backward
    beta: float = 0.0  # KL weight to the frozen reference; 0 builds no reference model
    ref_model_sync_steps: int = 0  # reset the reference to the current policy every N steps (R1: 400); 0 never
    epsilon_low: float = 0.2  # clip below 1 - epsilon_low
    epsilon_high: float = 0.2  # clip above 1 + epsilon_high (DAPO clip-higher: 0.28; R1 stage 1 used 10)
    loss_type: str = "grpo"  # grpo | bnpo | dr_grpo | dapo
    scale_rewards: str = "group"  # group | batch | none (Dr. GRPO)
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, resample to refill
    max_resample_rounds: int = 3  # extra rollout rounds dynamic sampling may spend to refill a batch
    mask_truncated_completions: bool = False  # DAPO overlong filtering: no loss on truncated completions
    overlong_buffer: int = 0  # DAPO soft overlong punishment over the last N tokens; 0 disables
    overlong_penalty_factor: float = 1.0  # scale of that punishment
    template: str = "r1-zero"  # r1-zero (plain-text R1-Zero prompt) | chat (tokenizer chat template, opens <think>)
    bias_update_gamma: float = 0.0  # auxiliary-loss-free MoE bias update during RL; 0 keeps routing biases fixed
    log_completions_every: int = 10  # write sample completions every K steps
    seed: int = 0  # rollout sampling and prompt order
    rollout_cuda_graphs: bool = False  # rollout engine: decode steps as CUDA graphs (CUDA only)
    rollout_compile: bool = False  # rollout engine: torch.compile'd decode steps
    reward_timeout_s: float = 10.0  # a reward call running longer scores 0, counted as a timeout (and left behind)
    rollout_speculative_tokens: int = 0  # rollout engine: MTP drafts verified per step (needs model.mtp); 0 off
    time_limit_s: float = 0.0  # stop at the first step ending past this many seconds of training (the schedule keeps its length); 0: none

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "grpo") -> None:
        """Checks every value (also after YAML / command-line overrides); errors name the dotted key."""
        # every number finite and of a number type before any comparison (NaN compares false to everything)
        for key in ("steps", "prompts_per_step", "max_prompt_length", "max_completion_length", "num_iterations",
                    "micro_batch_size", "learning_rate", "temperature", "max_grad_norm", "reward_timeout_s"):
            if finite_number(self, prefix, key) <= 0:
                raise ValueError(f"{prefix}.{key} must be > 0, got {getattr(self, key)}")
        if not 0 < finite_number(self, prefix, "top_p") <= 1:
            raise ValueError(f"{prefix}.top_p must be in (0, 1], got {self.top_p}")
        for key in ("adam_beta1", "adam_beta2"):
            in_range(self, prefix, key, 0, 1, high_open=True)
        for key in ("weight_decay", "warmup_steps", "ref_model_sync_steps", "overlong_buffer", "max_resample_rounds",
                    "bias_update_gamma", "log_completions_every", "beta", "epsilon_low", "epsilon_high",
                    "overlong_penalty_factor", "seed", "rollout_speculative_tokens", "time_limit_s"):
            if finite_number(self, prefix, key) < 0:
                raise ValueError(f"{prefix}.{key} must be >= 0, got {getattr(self, key)}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"{prefix}.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"{prefix}.scale_rewards must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}")
        if self.template not in TEMPLATES:
            raise ValueError(f"{prefix}.template must be one of {TEMPLATES}, got {self.template!r}")
        if self.num_generations < 2:
            raise ValueError(f"{prefix}.num_generations must be >= 2 (advantages compare samples), got {self.num_generations}")
        if self.beta < 0:
            raise ValueError(f"{prefix}.beta must be >= 0, got {self.beta}")
        if self.epsilon_low <= 0 or self.epsilon_high <= 0:
            raise ValueError(f"{prefix}.epsilon_low and {prefix}.epsilon_high must be > 0")
        if self.epsilon_low >= 1:
            raise ValueError(f"{prefix}.epsilon_low must be < 1 (the ratio is clipped at 1 - epsilon_low), got {self.epsilon_low}")
        try:
            self.max_completion_length_schedule = {int(k): int(v) for k, v in self.max_completion_length_schedule.items()}
        except (TypeError, ValueError):
            raise ValueError(f"{prefix}.max_completion_length_schedule must map steps to lengths, e.g. {{50: 256}}, "
                             f"got {self.max_completion_length_schedule!r}") from None

    def completion_length_at(self, step: int) -> int:
        """The maximum completion length in force at `step` (raised by the schedule)."""
        length = self.max_completion_length
        for at, value in sorted(self.max_completion_length_schedule.items()):
            if step >= at:
                length = value
        return length


@dataclass
class GRPODataConfig(ProblemSet):
    """Prompts with verifiable answers: `files` are JSONL of {"question": ..., "answer": ...} (or chat records with
    an "answer"); empty: built-in train-split problems. Held-out: `eval_files`, else test-split problems."""


@dataclass
class GRPOLogConfig:
    """What is written where, and how often."""

    save_every: int = 0  # steps between checkpoints; 0 saves only at the end
    keep_last: int = 2  # checkpoints kept (older ones are deleted); 0 keeps all
    eval_every: int = 0  # steps between held-out evaluations; 0 only before and after
    eval_problems: int = 500  # held-out problems per evaluation (greedy decoding)
    eval_before: bool = True  # evaluate the initial policy too (the "before" of the before/after table)
    tensorboard: bool = True  # also write TensorBoard events to RUN_DIR/tb
    progress: bool = True  # tqdm progress bar on stderr
    plots: bool = True  # write RUN_DIR/plots/*.png at the end

    def validate(self, prefix: str = "log") -> None:
        for key in ("save_every", "keep_last", "eval_every", "eval_problems"):
            if getattr(self, key) < 0:
                raise ValueError(f"{prefix}.{key} must be >= 0, got {getattr(self, key)}")


@dataclass
class GRPORunConfig:
    """`r1forge grpo CONFIG.yaml`."""

    run_dir: str = "runs/grpo"  # metrics.jsonl, completions.jsonl, tb/, plots/, checkpoints/
    seed: int = 0  # seeds every RNG, the prompt order and the rollout sampling
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", ...
    model: ModelSection = field(default_factory=lambda: ModelSection(mtp=False))  # init_from: the policy to train
    data: GRPODataConfig = field(default_factory=lambda: GRPODataConfig(synthetic_eval_problems=500))  # prompts
    rewards: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.2})  # name -> weight
    grpo: GRPOConfig = field(default_factory=GRPOConfig)  # the algorithm
    log: GRPOLogConfig = field(default_factory=GRPOLogConfig)  # logging, evaluation, checkpoints
    # under torchrun: data parallel over every rank (each holds the whole policy and rolls out its share of
    # grpo.prompts_per_step, the global count); dp_shard -1 or the world size, ep 1
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self, prefix: str = "") -> None:
        combine_rewards(self.rewards)  # names every unknown reward / bad weight
