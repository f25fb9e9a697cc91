"""Run configs: YAML files with `section.key=value` command-line overrides, checked against dataclass schemas,
and the sections every training run shares.

A run reads one YAML file; each override replaces one (possibly nested) key, its value parsed as YAML
(`training.max_steps=100`, `optimizer.betas=[0.9,0.95]`, `output.dir=runs/x`). The merged mapping is
then turned into typed dataclasses: an unknown or mistyped key is an error that names the file and key.

`RunConfig` holds the shared sections (`training`, `optimizer`, `deepspeed`, `output`), which
`train.trainer.Trainer` reads; a task's config subclasses it and adds only its own sections
(`train.mlm_task.PretrainConfig`, `train.retrieval_task.FinetuneConfig`), and may give the shared sections
its own recipe's defaults (`SECTION_DEFAULTS`): a key a file leaves out gets its task's default.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from train.files import atomic_write_text

T = TypeVar("T")

DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the source and the key."""


@dataclass
class TrainingSection:
    """Batching, duration, seed, precision and the cadence (in optimizer steps) of logs, evaluations and checkpoints.

    A micro-batch is what one process's forward pass takes (`micro_batch_size` samples for masked LM, pairs
    or triplets for retrieval). An optimizer step takes `global_batch_size` units over all processes, by
    gradient accumulation, so that one config keeps its batch on any number of GPUs; or, without it,
    `gradient_accumulation_steps` micro-batches per process (default 1). A run lasts `epochs` passes over
    its data (tasks that have epochs; default 1) or `max_steps`, whichever ends first.
    """

    RENAMED: ClassVar[dict[str, str]] = {"batch_size": "global_batch_size"}

    micro_batch_size: int = 1
    global_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    max_steps: int | None = None
    epochs: int | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # amp_bf16 on GPU, fp32 on CPU (train.distributed.resolve_precision)
    log_every: int = 10
    eval_every: int = 500
    eval_batch_size: int | None = None  # None: micro_batch_size
    checkpoint_every: int = 1000
    keep_last: int = 2

    def __post_init__(self):
        for key in ("micro_batch_size", "global_batch_size", "gradient_accumulation_steps", "max_steps", "epochs",
                    "log_every", "eval_every", "eval_batch_size", "checkpoint_every", "keep_last"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.gradient_accumulation_steps is not None and self.global_batch_size is not None:
            raise ValueError("set gradient_accumulation_steps or global_batch_size, not both")
        if self.device not in DEVICES:
            raise ValueError(f"device={self.device!r}; expected one of {DEVICES}")
        if self.eval_batch_size is None:
            self.eval_batch_size = self.micro_batch_size

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each process."""
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps or 1
        per_pass = self.micro_batch_size * world_size
        if self.global_batch_size % per_pass:
            raise ValueError(f"training.global_batch_size={self.global_batch_size} is not a multiple of "
                             f"micro_batch_size x processes = {self.micro_batch_size} x {world_size}")
        return self.global_batch_size // per_pass


def check_learning_rate(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{key} must be a positive finite number, got {value}")


def check_weight_decay(key: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{key} must be a finite number >= 0, got {value}")


@dataclass
class HyenaGroupConfig:
    """Learning rate and weight decay of one group of Hyena filter parameters."""

    lr: float
    weight_decay: float

    def __post_init__(self):
        check_learning_rate("lr", self.lr)
        check_weight_decay("weight_decay", self.weight_decay)


@dataclass
class OptimizerConfig:
    """AdamW with linear warmup and linear decay; the defaults are the M2-BERT long-context pretraining recipe.

    `weight_decay` follows `torch.optim.AdamW` (decay multiplied by the current lr); the authors' Composer
    DecoupledAdamW multiplies by lr / peak lr instead (see docs/pretraining.md). `hyena_filter` and
    `hyena_positional` give the Hyena filter groups their own settings (the pretraining recipe; unset,
    they join the base group). `decay_biases_and_norms: false` exempts biases, LayerNorm weights and the
    Hyena `d_skip` from weight decay, as the authors' fine-tuning does; their pretraining decays them.
    """

    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 1e-5
    warmup_fraction: float = 0.06
    final_lr_fraction: float = 0.0
    decay_biases_and_norms: bool = True
    hyena_filter: HyenaGroupConfig | None = None
    hyena_positional: HyenaGroupConfig | None = None

    def __post_init__(self):
        """Every AdamW setting of every group, before any model is built (the Hyena groups check their own)."""
        check_learning_rate("lr", self.lr)
        check_weight_decay("weight_decay", self.weight_decay)
        if len(self.betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a positive finite number, got {self.eps}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ValueError(f"final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}")


@dataclass
class OutputSection:
    """The run directory (config, metrics, TensorBoard, curves, summary, checkpoints, final model)."""

    dir: str
    tensorboard: bool = True


def default_deepspeed() -> dict:
    return {"zero_optimization": {"stage": 1}, "gradient_clipping": 1.0}


@dataclass(kw_only=True)
class RunConfig:
    """The sections every training run has; a task's config adds its own (`model`, `data`, ...).

    `deepspeed` is a DeepSpeed config block, passed through; batch sizes and precision come from
    `training` (`train.distributed.deepspeed_config`).
    """

    # Per section, the task's defaults for keys a config file leaves out (e.g. fine-tuning's learning rate).
    SECTION_DEFAULTS: ClassVar[dict[str, dict]] = {}

    output: OutputSection
    training: TrainingSection = field(default_factory=TrainingSection)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    deepspeed: dict = field(default_factory=default_deepspeed)


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from `path` (errors name the file)."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(values).__name__}")
    return values


def apply_overrides(values: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """A copy of `values` with each `dotted.key=yaml_value` override applied (intermediate mappings created)."""
    merged = copy.deepcopy(values)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {override!r}: expected KEY=VALUE with a dotted KEY such as training.max_steps=10")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {override!r}: value is not valid YAML ({err})") from err
        node = merged
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {'.'.join(parts[:depth + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return merged


def load_config(schema: type[T], path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Read `path`, apply `overrides`, fill in the schema's `SECTION_DEFAULTS` for keys left out and build the
    `schema` dataclass from the result."""
    values = apply_overrides(read_yaml(path), overrides)
    for section, defaults in getattr(schema, "SECTION_DEFAULTS", {}).items():
        given = values.get(section, {})
        if isinstance(given, dict):  # anything else is reported by from_mapping, naming the section
            values[section] = {**defaults, **given}
    return from_mapping(schema, values, where=str(path))


def from_mapping(schema: type[T], values: dict, where: str, prefix: str = "") -> T:
    """Build dataclass `schema` from a mapping, recursing into dataclass-typed fields.

    Unknown keys, missing required keys and values of the wrong type raise `ConfigError` naming
    `where` and the dotted key. Ints are accepted for float fields and lists for tuple fields.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = sorted(set(values) - set(fields))
    renamed = [k for k in unknown if k in getattr(schema, "RENAMED", {})]
    if renamed:
        raise ConfigError(f"{where}: {prefix + renamed[0]} was renamed {prefix + schema.RENAMED[renamed[0]]}")
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {[prefix + k for k in unknown]}; "
                          f"known in this section: {sorted(fields)}")
    hints = typing.get_type_hints(schema)
    kwargs = {}
    for name, field in fields.items():
        key = prefix + name
        if name not in values:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing required key {key!r}")
            continue
        kwargs[name] = _coerce(hints[name], values[name], where, key)
    try:
        return schema(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'}: {err}") from err


def to_mapping(config: Any) -> dict:
    """The plain-data form of a config dataclass (tuples as lists), e.g. to save next to a run."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def write_yaml(values: dict, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(values, sort_keys=False))


def _coerce(hint, value, where: str, key: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {key}={value!r} fits none of {hint}")
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, where, prefix=key + ".")
    if hint is Any:
        return value
    if origin in (dict,) or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}")
        return value
    if origin in (tuple, list) or hint in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if args:
            value = [_coerce(args[0] if len(args) == 1 or Ellipsis in typing.get_args(hint) else args[i], v,
                             where, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(value) if (origin or hint) is tuple else list(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 5e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if isinstance(hint, type) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {key} must be {getattr(hint, '__name__', hint)}, got {value!r}")
    return value

