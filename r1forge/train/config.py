"""Run configs: dataclasses loaded from YAML, every field overridable from the command line (`--train.lr 3e-4`).

    cfg = load_run_config(PretrainRunConfig, "configs/pretrain_tiny.yaml", ["--train.lr", "3e-4"])

The loader is generic (`config_from_dict`, `apply_overrides`, `config_to_dict` work on any dataclass tree),
so the GRPO and distillation configs reuse it. Values are checked against the field's type annotation; an
unknown key or a value of the wrong type is a ValueError that names the dotted key. A YAML mapping given to
a `dict` field (e.g. `model.overrides`) is taken as is, and `--model.overrides.hidden_size 128` sets one entry.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from r1forge.data.synthetic import KINDS, MAX_RESULT, MAX_STEPS, Problem, make_problems
from r1forge.parallel.config import ParallelConfig

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------- sections
@dataclass
class ModelSection:
    """Which model to train."""

    preset: str = "tiny"  # model shape from r1forge.presets (ignored when init_from is set)
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields on top of the preset
    init_from: str | None = None  # checkpoint (or run) directory to start from instead of a random init
    mtp: bool = True  # build the config's MTP modules and train them with weight train.mtp_lambda

    def validate(self, prefix: str = "model") -> None:
        from r1forge.presets import PRESETS

        if self.init_from is None and self.preset not in PRESETS:
            raise ValueError(f"{prefix}.preset: unknown preset {self.preset!r}; "
                             f"available: {', '.join(sorted(PRESETS))}")


@dataclass
class TrainConfig:
    """Optimisation: AdamW, warmup + cosine, clipping, accumulation, MoE balancing, MTP, the NaN guard."""

    steps: int = 1000  # optimizer steps of the whole run (the schedule's length)
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 50  # linear warmup from lr / warmup_steps to lr
    weight_decay: float = 0.1  # AdamW decoupled decay, on matrices only (not norms)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping (the norm is still logged)
    bias_update_gamma: float = 1e-3  # aux-loss-free balancing speed (DeepSeek-V3 2.1.2); 0 disables the bias update
    aux_loss_alpha: float = 0.0  # sequence-wise balance loss weight (DeepSeek-V3 used 1e-4); 0 disables it
    mtp_lambda: float = 0.3  # weight of the multi-token-prediction loss (V3: 0.3 early, 0.1 later)
    max_bad_steps: int = 5  # this many non-finite steps in a row stop the run (the last checkpoint is kept)
    activation_checkpointing: bool = False  # recompute each decoder layer in backward to save memory
    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...
    bf16: bool = True  # bf16 autocast on CUDA (float32 master weights); ignored on CPU

    def validate(self, prefix: str = "train") -> None:
        _positive(self, prefix, "steps", "batch_size", "grad_accum", "lr", "max_bad_steps", "eps")
        _non_negative(self, prefix, "warmup_steps", "weight_decay", "grad_clip", "bias_update_gamma",
                      "aux_loss_alpha", "mtp_lambda")
        in_range(self, prefix, "min_lr_ratio", 0, 1)
        for key in ("beta1", "beta2"):
            in_range(self, prefix, key, 0, 1, high_open=True)


@dataclass
class LogConfig:
    """What is written where, and how often."""

    log_every: int = 10  # steps between metric records (losses are averaged over them)
    eval_every: int = 100  # steps between held-out evaluations; 0 evaluates only at the end
    eval_batches: int = 20  # at most this many held-out batches per evaluation (0: no evaluation)
    save_every: int = 500  # steps between checkpoints; 0 saves only at the end
    keep_last: int = 3  # checkpoints kept (older ones are deleted); 0 keeps all
    tensorboard: bool = True  # also write TensorBoard events to RUN_DIR/tb
    progress: bool = True  # tqdm progress bar (loss, tokens/s, ETA) on stderr

    def validate(self, prefix: str = "log") -> None:
        _positive(self, prefix, "log_every")
        _non_negative(self, prefix, "eval_every", "eval_batches", "save_every", "keep_last")


@dataclass
class ProblemSource:
    """Where a stage's examples come from: its own files, or the built-in arithmetic problems
    (`r1forge.data.synthetic`), whose train and test splits never share a problem.

    Declared once and shared by the pretrain, SFT, GRPO and distillation data configs (their `data:` section
    extends it, so the YAML keys are the same everywhere) and by `r1forge sample`. What a file holds is the
    stage's own record type (see each data config's docstring); the generator's settings mean the same in all.
    """

    files: list[str] = field(default_factory=list)  # the stage's training files; empty: built-in problems
    eval_files: list[str] = field(default_factory=list)  # held-out files; empty: built-in test-split problems
    synthetic_eval_problems: int = 200  # held-out test-split problems (when eval_files is empty)
    min_steps: int = 1  # built-in problems: fewest solution steps
    max_steps: int = 3  # built-in problems: most solution steps (equations stop at 3)
    max_operand: int = 99  # built-in problems: largest starting number or operand
    max_result: int = MAX_RESULT  # built-in problems: largest number any step may produce (max_operand..999)
    kinds: list[str] = field(default_factory=lambda: list(KINDS))  # built-in problem kinds

    def validate(self, prefix: str = "data") -> None:
        """Errors name the dotted key (`data.max_steps`); with prefix "" the bare field (a command's flag)."""
        if not self.eval_files:
            _positive(self, prefix, "synthetic_eval_problems")
        if not 1 <= self.min_steps <= self.max_steps <= MAX_STEPS:
            raise ValueError(f"{_key(prefix, 'min_steps')}/{_key(prefix, 'max_steps')}: need 1 <= min_steps <= "
                             f"max_steps <= {MAX_STEPS}, got {self.min_steps}, {self.max_steps}")
        if not 2 <= self.max_operand <= MAX_RESULT:
            raise ValueError(f"{_key(prefix, 'max_operand')} must be in [2, {MAX_RESULT}], got {self.max_operand}")
        if not self.max_operand <= self.max_result <= MAX_RESULT:
            raise ValueError(f"{_key(prefix, 'max_result')} must be in [max_operand, {MAX_RESULT}] = "
                             f"[{self.max_operand}, {MAX_RESULT}], got {self.max_result}")
        if not self.kinds or set(self.kinds) - set(KINDS):
            raise ValueError(f"{_key(prefix, 'kinds')} must be a non-empty subset of {list(KINDS)}, got {self.kinds}")

    def problems(self, count: int, seed: int, split: str) -> list[Problem]:
        """`count` built-in problems of `split` ("train" or "test") at this source's difficulty."""
        return make_problems(count, seed, split, self.min_steps, self.max_steps, self.max_operand, tuple(self.kinds),
                             self.max_result)


@dataclass
class ProblemSet(ProblemSource):
    """A problem source whose training side is problems too (SFT, GRPO, distillation), not a text corpus."""

    synthetic_problems: int = 2000  # built-in train-split problems (when files is empty)

    def validate(self, prefix: str = "data") -> None:
        super().validate(prefix)
        if not self.files:
            _positive(self, prefix, "synthetic_problems")


@dataclass
class PretrainDataConfig(ProblemSource):
    """Packed next-token-prediction data: `files` are .txt / .jsonl ({"text": ...}); empty: the built-in corpus
    (worked train-split problems and simple English), evaluated on test-split problems."""

    tokenizer: str | None = None  # tokenizer directory; null trains one on the training text into RUN_DIR/tokenizer
    vocab_size: int = 512  # vocabulary of a tokenizer trained here
    eval_fraction: float = 0.05  # rows of `files` held out for evaluation when eval_files is empty
    synthetic_docs: int = 4000  # documents of the built-in corpus (when files is empty)
    problem_fraction: float = 0.7  # built-in corpus: share of documents that are worked problems (rest: English)
    tagged_fraction: float = 0.0  # built-in corpus: share of worked problems written in the <think>/<answer> format
    seq_len: int = 128  # tokens per packed row
    skip_malformed: bool = False  # skip (and count) malformed JSONL lines instead of stopping at the first one

    def validate(self, prefix: str = "data") -> None:
        super().validate(prefix)
        _positive(self, prefix, "vocab_size", "synthetic_docs", "seq_len")
        in_range(self, prefix, "eval_fraction", 0, 1, high_open=True)
        in_range(self, prefix, "problem_fraction", 0, 1)
        in_range(self, prefix, "tagged_fraction", 0, 1)


@dataclass
class SFTDataConfig(ProblemSet):
    """Chat conversations (`files`: chat JSONL, {"messages": [...]}); the loss is on assistant tokens only.
    Without files: built-in <think>/<answer> conversations of train-split problems."""

    tokenizer: str | None = None  # tokenizer directory; null: init_from's tokenizer, else one trained on the data
    vocab_size: int = 512  # vocabulary of a tokenizer trained here
    max_len: int = 256  # longest conversation (or packed row) in tokens
    skip_malformed: bool = False  # skip (and count) malformed JSONL lines instead of stopping at the first one
    packing: bool = False  # pack conversations into rows of max_len
    shown_steps_fraction: float = 1.0  # built-in conversations writing the steps out (the rest: terse, empty reasoning)

    def validate(self, prefix: str = "data") -> None:
        super().validate(prefix)
        _positive(self, prefix, "vocab_size", "max_len")
        in_range(self, prefix, "shown_steps_fraction", 0, 1)


@dataclass
class PretrainRunConfig:
    """`r1forge pretrain CONFIG.yaml`."""

    run_dir: str = "runs/pretrain"  # metrics.jsonl, tb/, checkpoints/step-N/ and the tokenizer go here
    seed: int = 0  # seeds the init, the data order and every RNG
    model: ModelSection = field(default_factory=ModelSection)  # the model
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)  # the data
    train: TrainConfig = field(default_factory=TrainConfig)  # the optimisation
    log: LogConfig = field(default_factory=LogConfig)  # logging, evaluation, checkpoints
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # degrees under torchrun (train.batch_size is global)


def _sft_train() -> TrainConfig:
    # The MTP module keeps training on the assistant tokens (V3's later weight, 0.1): a chat-tuned model whose
    # MTP head was left at its pretrained state drafts badly for speculative decoding.
    return TrainConfig(steps=300, lr=3e-4, warmup_steps=20, weight_decay=0.0, mtp_lambda=0.1)


@dataclass
class SFTRunConfig:
    """`r1forge sft CONFIG.yaml`."""

    run_dir: str = "runs/sft"  # metrics.jsonl, tb/, checkpoints/step-N/ go here
    seed: int = 0  # seeds the init, the data order and every RNG
    model: ModelSection = field(default_factory=ModelSection)  # usually init_from a pretrain run; MTP kept if it has one
    data: SFTDataConfig = field(default_factory=lambda: SFTDataConfig(synthetic_eval_problems=100))  # conversations
    train: TrainConfig = field(default_factory=_sft_train)  # the optimisation
    log: LogConfig = field(default_factory=lambda: LogConfig(eval_every=50, save_every=100))  # logging, checkpoints
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # degrees under torchrun (train.batch_size is global)


def _key(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def finite_number(obj: Any, prefix: str, key: str) -> float | int:
    """`obj.key`, checked to be a finite int or float (not a bool, a string or None) before any comparison."""
    value = getattr(obj, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{_key(prefix, key)} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{_key(prefix, key)} must be finite, got {value}")
    return value


def _positive(obj: Any, prefix: str, *keys: str) -> None:
    for key in keys:
        if finite_number(obj, prefix, key) <= 0:
            raise ValueError(f"{_key(prefix, key)} must be positive, got {getattr(obj, key)}")


def _non_negative(obj: Any, prefix: str, *keys: str) -> None:
    for key in keys:
        if finite_number(obj, prefix, key) < 0:
            raise ValueError(f"{_key(prefix, key)} must be >= 0, got {getattr(obj, key)}")


def in_range(obj: Any, prefix: str, key: str, low: float, high: float, high_open: bool = False) -> None:
    """`low <= obj.key <= high` (`< high` when high_open), after `finite_number`."""
    value = finite_number(obj, prefix, key)
    if not (low <= value < high if high_open else low <= value <= high):
        raise ValueError(f"{_key(prefix, key)} must be in [{low}, {high}{')' if high_open else ']'}, got {value}")


# ---------------------------------------------------------------------------------------------- loading
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(key: str, valid: list[str]) -> ValueError:
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
    return ValueError(f"unknown config key {key!r}{hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against the annotation `tp`; ints widen to float, numeric strings ("3e-4") parse."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{key}: cannot be {value!r}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return merge_into(tp(), value, prefix=key)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "3e-4" (no dot) as a string
            except ValueError:
                pass
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key}: expected a string, got {value!r}")
    raise ValueError(f"{key}: unsupported field type {tp!r}")


def config_from_dict(cls: type[T], raw: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass `cls` from a (YAML) mapping; missing keys keep their defaults, unknown keys are errors.

    A section given partially keeps the run's defaults for the rest (an SFT run's `train:` with only `lr`
    keeps SFT's own step count), because keys are merged into the default instance rather than rebuilt.
    """
    out = merge_into(cls(), raw, prefix)
    if not prefix:
        validate_config(out)
    return out


def merge_into(cfg: T, raw: dict[str, Any] | None, prefix: str = "") -> T:
    """Set the keys of mapping `raw` on the dataclass instance `cfg` (recursing into sections); returns cfg."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ValueError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = _hints(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg)]
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise _unknown(dotted, names)
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            merge_into(current, value, dotted)
        else:
            setattr(cfg, key, _coerce(value, hints[key], dotted))
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (YAML-ready) of a config dataclass."""
    return dataclasses.asdict(cfg)


def validate_config(cfg: Any, prefix: str = "") -> None:
    """Run every section's `validate(prefix)`, depth first."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate_config(value, f"{prefix}.{f.name}" if prefix else f.name)
    if hasattr(cfg, "validate"):
        cfg.validate(prefix) if prefix else cfg.validate()


def _parse_cli_value(text: str, tp: Any) -> Any:
    """A command-line string for a field of type `tp`: strings stay verbatim, everything else is YAML."""
    if text.lower() in ("null", "none", "~"):
        return None
    base = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (
        typing.Union, types.UnionType) else [tp]
    if base == [str]:
        return text
    if typing.get_origin(base[0]) is list and not text.lstrip().startswith("["):
        return [part for part in text.split(",") if part]  # --data.files a.txt,b.txt
    return yaml.safe_load(text)


def set_override(cfg: Any, dotted: str, text: str) -> None:
    """Set one dotted key (`train.lr`, `model.overrides.hidden_size`) from its command-line string."""
    parts = dotted.split(".")
    obj, path = cfg, []
    for i, part in enumerate(parts):
        path.append(part)
        key = ".".join(path)
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            raise _unknown(key, names)
        tp = _hints(type(obj))[part]
        value = getattr(obj, part)
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(value) and not last:
            obj = value
            continue
        if isinstance(value, dict) and not last:  # model.overrides.hidden_size: one entry of a dict field
            value[".".join(parts[i + 1:])] = yaml.safe_load(text)
            return
        if not last:
            raise ValueError(f"config key {key!r} is a {type(value).__name__}, it has no field {parts[i + 1]!r}")
        if dataclasses.is_dataclass(value):
            raise ValueError(f"config key {key!r} is a section; set its fields ({key}.FIELD VALUE)")
        try:
            setattr(obj, part, _coerce(_parse_cli_value(text, tp), tp, key))
        except yaml.YAMLError as e:
            raise ValueError(f"{key}: cannot parse {text!r} ({e})") from None
        return


def parse_override_args(argv: list[str]) -> list[tuple[str, str]]:
    """`["--train.lr", "3e-4", "--seed=1"]` -> `[("train.lr", "3e-4"), ("seed", "1")]`."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"expected --KEY VALUE (e.g. --train.lr 3e-4), got {arg!r}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ValueError(f"config key {arg[2:]!r} has no value: use --{arg[2:]} VALUE")
            key, value = arg[2:], argv[i + 1]
            i += 2
        out.append((key.replace("-", "_"), value))
    return out


def apply_overrides(cfg: T, overrides: list[str] | list[tuple[str, str]]) -> T:
    """Apply command-line overrides (raw argv or parsed pairs) in order, then re-validate."""
    pairs = parse_override_args(overrides) if overrides and isinstance(overrides[0], str) else overrides
    for key, value in pairs:
        set_override(cfg, key, value)
    validate_config(cfg)
    return cfg


def load_run_config(cls: type[T], path: str | os.PathLike | None, overrides: list[str] | None = None) -> T:
    """YAML file (or only defaults when path is None) -> `cls`, then dotted command-line overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of config sections, got {type(raw).__name__}")
    try:
        cfg = config_from_dict(cls, raw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}" if path is not None else str(e)) from None
    return apply_overrides(cfg, overrides or [])


def save_run_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config (defaults and overrides applied) as YAML, to reproduce the run."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
