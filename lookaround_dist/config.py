"""The run configuration: a typed tree of dataclasses, YAML files and command-line overrides.

Precedence is command line > YAML file > defaults. Overrides are ``section.key=value``
strings whose values are parsed as YAML (``data.augmentations=[hflip,vflip]``,
``optim.lr=0.05``); a key may appear in only one override. An unknown section or key is
rejected with the list of valid ones, and every numeric field with a meaningful range is
checked against it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration value or key that is invalid."""


@dataclasses.dataclass
class ModelConfig:
    name: str = "resnet20"
    """Model name: a CIFAR ResNet (resnet20/32/44/56/110) or a torchvision model."""
    num_classes: int = 10
    """Number of output classes; labels must lie in [0, num_classes)."""
    weights_path: Optional[str] = None
    """Optional local state-dict file with initial weights (loaded on rank 0, then broadcast)."""


@dataclasses.dataclass
class DataConfig:
    backend: str = "auto"
    """Input pipeline: dali, torchvision, or auto (DALI when installed and usable)."""
    train_path: str = ""
    """Training data: a shard file, a brace pattern (train-{000000..000009}.tar), a folder of
    shards, or an ImageFolder tree."""
    val_path: str = ""
    """Validation data, same forms as train_path."""
    image_size: int = 32
    """Side of the square training input in pixels. 32 selects the padded random crop,
    larger sizes the random-resized crop and a resize-then-center-crop validation."""
    batch_size: int = 128
    """Base-batch samples per rank and per branch at each step."""
    eval_batch_size: int = 256
    """Validation samples per rank per batch."""
    num_workers: int = 2
    """DataLoader worker processes per rank (torchvision) or CPU threads (DALI)."""
    augmentations: list[str] = dataclasses.field(default_factory=lambda: ["hflip", "vflip", "randaugment"])
    """One augmentation name per branch, on top of the base crop."""
    independent_sampling: bool = False
    """Draw a separate sample order per branch instead of the shared base batches."""
    last_batch: str = "drop"
    """Handling of the incomplete last base batch of an epoch: drop or pad (repeat samples)."""
    on_decode_error: str = "raise"
    """Action for an image that does not decode: raise (naming shard and key) or skip (counted)."""
    mean: list[float] = dataclasses.field(default_factory=lambda: [0.4914, 0.4822, 0.4465])
    """Per-channel normalization mean (RGB, 0..1 scale)."""
    std: list[float] = dataclasses.field(default_factory=lambda: [0.2470, 0.2435, 0.2616])
    """Per-channel normalization standard deviation (RGB, 0..1 scale)."""
    prefetch_depth: int = 2
    """Batches prepared ahead per loader (DataLoader prefetch_factor, DALI prefetch queue)."""
    hw_decoder_load: float = 0.65
    """Share of JPEG decoding given to the hardware decoder on GPUs that have one (DALI)."""


@dataclasses.dataclass
class OptimConfig:
    name: str = "sgd"
    """Optimizer: sgd or adamw."""
    lr: float = 0.1
    """Peak learning rate, reached at the end of the warm-up."""
    momentum: float = 0.9
    """SGD momentum (ignored by adamw)."""
    weight_decay: float = 5e-4
    """L2 penalty for sgd, decoupled weight decay for adamw."""
    nesterov: bool = False
    """Nesterov momentum for sgd."""
    schedule: str = "cosine"
    """Decay after warm-up: cosine, multistep or constant."""
    warmup_epochs: float = 1.0
    """Linear warm-up length in epochs (0 disables it)."""
    milestones: list[int] = dataclasses.field(default_factory=list)
    """Epochs at which multistep decay multiplies the learning rate by gamma."""
    gamma: float = 0.1
    """Factor applied to the learning rate at each multistep milestone."""


@dataclasses.dataclass
class LookaroundConfig:
    num_branches: int = 3
    """d, the number of branches; must divide or be a multiple of the world size."""
    k: int = 5
    """Optimizer steps per round; an average step follows every k-th step."""
    average_optimizer_state: bool = False
    """Also average the optimizer state (momentum) across branches at each average step."""


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 200
    """Passes over the training data; each ends on an average step and an evaluation."""
    seed: int = 0
    """Seed for model initialization, sample order and augmentations."""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)."""
    output_dir: str = "runs"
    """Parent folder of run directories."""
    run_name: str = ""
    """Run directory name under output_dir; empty picks a timestamped name."""
    timeout_seconds: float = 300.0
    """Limit for any collective before the run fails instead of hanging."""
    log_interval_steps: int = 50
    """Steps between progress log lines."""
    keep_checkpoints: int = 2
    """Number of most recent checkpoints kept in the run directory."""
    max_steps_per_epoch: int = 0
    """Cap on optimizer steps per epoch (0 means the whole epoch); for quick trials."""
    threads_per_rank: int = 0
    """torch intra-op threads per process (0 lets the launcher's OMP_NUM_THREADS decide)."""
    stop_after_steps: int = 0
    """Save a checkpoint and stop after this many optimizer steps in total (0: never)."""
    precision: str = "auto"
    """fp32, bf16 (autocast), fp16 (autocast with one gradient scaler per branch), or auto
    (bf16 on CUDA, fp32 on CPU)."""
    channels_last: Optional[bool] = None
    """Channels-last memory format for model and input; null picks it on CUDA only."""
    compile: bool = False
    """Compile each branch's model with torch.compile."""
    preemption_signal: str = "SIGUSR1"
    """Signal (besides SIGTERM) that makes all ranks save a checkpoint and exit for requeue."""
    nonfinite_policy: str = "stop"
    """Action at the average step for a branch with non-finite weights: stop (raise), skip
    (average the healthy branches only) or rollback (restore the last consensus)."""
    method: str = "lookaround"
    """Training method, all on the same data and step budget: lookaround; sgd (one model
    trained on all d augmentations of every base batch); independent (d branches never
    averaged, evaluated one by one and as a logit ensemble); lookahead (slow and fast
    weights of one model that sees all d augmentations, synchronized every k steps)."""
    lookahead_alpha: float = 0.5
    """Lookahead's interpolation factor: slow += alpha * (fast - slow) every k steps."""
    swa_epochs: int = 0
    """Stochastic weight averaging: average the consensus at the end of each of the last
    this many epochs, then recompute its BatchNorm statistics (0 disables SWA)."""
    bn_recalibration_batches: int = 50
    """Training batches per rank whose forward passes recompute BatchNorm statistics, for
    SWA and for train.recalibrate_bn."""
    recalibrate_bn: bool = False
    """Also evaluate a copy of the consensus whose BatchNorm statistics are recomputed from
    training batches, beside the averaged statistics."""
    diversity_interval_rounds: int = 0
    """Rounds between diversity measurements (branch distances to the consensus), taken
    before the average step; each costs one all-reduce of the parameters, so the default
    (0) leaves them off and the method comparison turns them on."""
    evaluate_branches: bool = False
    """At each epoch end, also evaluate every branch and their logit ensemble, measured
    before the epoch's last average step (d more evaluations per epoch)."""
    swa_lr: float = 0.0
    """Constant learning rate during the SWA epochs (0 keeps optim.schedule's rate)."""


@dataclasses.dataclass
class WandbConfig:
    enabled: bool = False
    """Track the run in wandb from global rank 0."""
    project: str = "lookaround"
    """wandb project name."""
    entity: Optional[str] = None
    """wandb team or user; null uses the account's default."""
    name: Optional[str] = None
    """wandb run name; null uses the run directory's name."""
    tags: list[str] = dataclasses.field(default_factory=list)
    """wandb tags of the run."""
    mode: str = "offline"
    """offline, online or disabled; the WANDB_MODE environment variable takes precedence."""


@dataclasses.dataclass
class RunConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    lookaround: LookaroundConfig = dataclasses.field(default_factory=LookaroundConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce_float(value: Any, where: str) -> float:
    """Convert a number, or a string that float() parses, to a finite float.

    Strings are accepted because YAML 1.1, which PyYAML implements, reads ``1e-3`` (an
    exponent without a decimal point) as a string.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where} expects a number, found {value!r}")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise ConfigError(f"{where} expects a number, found {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{where} expects a finite number, found {value!r}")
    return number


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a parsed YAML value to the field's type, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _coerce(value, inner, where)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} expects true or false, found {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} expects an integer, found {value!r}")
    if annotation is float:
        return _coerce_float(value, where)
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where} expects a string, found {value!r}")
    if annotation is list or origin is list:
        if isinstance(value, (list, tuple)):
            items = list(value)
        elif isinstance(value, str):
            items = [part.strip() for part in value.split(",") if part.strip()]
        else:
            raise ConfigError(f"{where} expects a list, found {value!r}")
        item_types = typing.get_args(annotation)
        if not item_types:
            return items
        return [_coerce(item, item_types[0], f"{where}[{i}]") for i, item in enumerate(items)]
    return value


def _apply(section: Any, values: dict, where: str) -> None:
    types = _field_types(type(section))
    for key, value in values.items():
        if key not in types:
            valid = ", ".join(sorted(types))
            raise ConfigError(f"unknown key {where}.{key}; valid keys of {where}: {valid}")
        setattr(section, key, _coerce(value, types[key], f"{where}.{key}"))


def apply_dict(config: RunConfig, values: dict, source: str = "config") -> RunConfig:
    """Apply a nested ``{section: {key: value}}`` mapping onto ``config``."""
    sections = _field_types(RunConfig)
    for name, body in (values or {}).items():
        if name not in sections:
            valid = ", ".join(sorted(sections))
            raise ConfigError(f"unknown section {name!r} in {source}; valid sections: {valid}")
        if not isinstance(body, dict):
            raise ConfigError(f"section {name!r} in {source} must be a mapping, found {body!r}")
        _apply(getattr(config, name), body, name)
    return config


def split_override(text: str) -> tuple[str, str, str]:
    """Split ``section.key=value`` into its section, key and unparsed value."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"an override must look like section.key=value, found {text!r}")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    return section, key, raw


def parse_override(text: str) -> dict:
    """Turn ``section.key=value`` into ``{section: {key: value}}``; the value is parsed as YAML."""
    section, key, raw = split_override(text)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"cannot parse the value of override {text!r}: {error}") from None
    return {section: {key: value}}


def shell_brace_pattern(values: list[str]) -> Optional[str]:
    """Return a bash brace pattern that expands to ``values`` in this order, or None.

    Evenly spaced numbers become a sequence expression (``train-{000000..000003}.tar``),
    other values a comma list of whole words (``{hflip,vflip}``).
    """
    if len(values) < 2 or len(set(values)) < len(values):
        return None
    prefix = os.path.commonprefix(values)
    suffix = os.path.commonprefix([value[len(prefix):][::-1] for value in values])[::-1]

    # Digits beside the common parts belong to the numbers: train-{000000..000003}, not
    # train-00000{0..3}.
    number_prefix = re.sub(r"\d+$", "", prefix)
    number_suffix = re.sub(r"^\d+", "", suffix)
    numbers = [value[len(number_prefix):len(value) - len(number_suffix)] for value in values]
    if all(number.isdigit() for number in numbers):
        steps = {int(b) - int(a) for a, b in zip(numbers, numbers[1:])}
        if len(steps) == 1 and 0 not in steps:
            step = abs(steps.pop())
            increment = f"..{step}" if step > 1 else ""
            return f"{number_prefix}{{{numbers[0]}..{numbers[-1]}{increment}}}{number_suffix}"

    word_prefix = re.sub(r"\w+$", "", prefix)
    word_suffix = re.sub(r"^\w+", "", suffix)
    words = [value[len(word_prefix):len(value) - len(word_suffix)] for value in values]
    if any(character in word for word in words for character in ",{}"):
        return None
    return f"{word_prefix}{{{','.join(words)}}}{word_suffix}"


def check_unique_overrides(overrides: tuple[str, ...] | list[str]) -> None:
    """Raise ConfigError when several overrides set the same key.

    An unquoted brace pattern (``data.train_path=train-{000000..000003}.tar``) is expanded
    by the shell into one override per file, so the message shows the pattern to quote
    when the repeated overrides are adjacent, as bash writes them.
    """
    positions: dict[str, list[int]] = {}
    for index, text in enumerate(overrides):
        section, key, _ = split_override(text)
        positions.setdefault(f"{section}.{key}", []).append(index)
    for dotted, indices in positions.items():
        if len(indices) < 2:
            continue
        values = [split_override(overrides[index])[2] for index in indices]
        message = (f"{dotted} is given {len(indices)} times on the command line "
                   f"({', '.join(repr(value) for value in values)}); give each key once")
        adjacent = indices == list(range(indices[0], indices[0] + len(indices)))
        pattern = shell_brace_pattern(values) if adjacent else None
        # Two values with nothing in common, such as lookaround.k=3 lookaround.k=4, are
        # likelier typed twice than expanded from lookaround.k={3,4}.
        bare = pattern is not None and pattern.startswith("{") and pattern.endswith("}")
        if pattern is not None and (len(values) > 2 or not bare):
            message += (f". These values look like the shell's expansion of the brace pattern "
                        f"{dotted}={pattern}: to pass the pattern itself, quote the argument, "
                        f"as in '{dotted}={pattern}'")
        raise ConfigError(message)


def read_yaml_file(path: Path) -> Any:
    """Parse the YAML file at ``path``, raising a ConfigError that names the file and the error's line."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass a YAML file such as configs/demo.yaml")
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative to the current folder {Path.cwd()})"
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        # Bytes, so that PyYAML detects the encoding and reports invalid bytes as YAMLError.
        return yaml.safe_load(path.read_bytes())
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        message = f"{path} is not valid YAML: {error.problem or error.context}"
        if mark is not None:
            message += f" at line {mark.line + 1}, column {mark.column + 1}"
        # The context ("while parsing a flow sequence") helps when it starts on another line,
        # such as the line of an unclosed bracket.
        context_mark = error.context_mark
        if error.context and context_mark is not None and (mark is None or context_mark.line != mark.line):
            message += (f" ({error.context} that starts at line {context_mark.line + 1}, "
                        f"column {context_mark.column + 1})")
        raise ConfigError(message) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None


def load_config(path: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = ()) -> RunConfig:
    """Build a config from defaults, then the YAML file at ``path``, then ``overrides``."""
    config = RunConfig()
    if path is not None:
        path = Path(path)
        values = read_yaml_file(path) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, found {type(values).__name__}")
        apply_dict(config, values, source=str(path))
    check_unique_overrides(overrides)
    for text in overrides:
        apply_dict(config, parse_override(text), source=f"override {text!r}")
    validate_config(config)
    return config


CHOICES = {
    ("data", "backend"): ("auto", "dali", "torchvision"),
    ("data", "last_batch"): ("drop", "pad"),
    ("data", "on_decode_error"): ("raise", "skip"),
    ("optim", "name"): ("sgd", "adamw"),
    ("optim", "schedule"): ("cosine", "multistep", "constant"),
    ("train", "device"): ("auto", "cpu", "cuda"),
    ("train", "precision"): ("auto", "fp32", "bf16", "fp16"),
    ("train", "preemption_signal"): ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "SIGHUP"),
    ("train", "nonfinite_policy"): ("stop", "skip", "rollback"),
    ("train", "method"): ("lookaround", "sgd", "independent", "lookahead"),
    ("wandb", "mode"): ("offline", "online", "disabled"),
}


@dataclasses.dataclass(frozen=True)
class Bounds:
    """Interval that a numeric value must lie in, unbounded on a side that is None."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    """Exclude ``low`` itself."""
    high_open: bool = False
    """Exclude ``high`` itself."""
    note: str = ""
    """Meaning of a boundary value, shown after the range, as in " (0 disables it)"."""

    def contains(self, value: float) -> bool:
        # Comparisons in this form put NaN outside every range.
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        if self.high is not None and not (value < self.high if self.high_open else value <= self.high):
            return False
        return True

    def describe(self) -> str:
        """Return the range as words that follow "must": "be >= 1", "lie in [0, 1)"."""
        if self.low is not None and self.high is not None:
            opening = "(" if self.low_open else "["
            closing = ")" if self.high_open else "]"
            return f"lie in {opening}{self.low}, {self.high}{closing}{self.note}"
        if self.low is not None:
            return f"be {'>' if self.low_open else '>='} {self.low}{self.note}"
        return f"be {'<' if self.high_open else '<='} {self.high}{self.note}"


AT_LEAST_ONE = Bounds(low=1)
NOT_NEGATIVE = Bounds(low=0)

BOUNDS = {
    ("model", "num_classes"): AT_LEAST_ONE,
    ("data", "image_size"): AT_LEAST_ONE,
    ("data", "batch_size"): AT_LEAST_ONE,
    ("data", "eval_batch_size"): AT_LEAST_ONE,
    ("data", "num_workers"): NOT_NEGATIVE,
    ("data", "prefetch_depth"): AT_LEAST_ONE,
    ("data", "hw_decoder_load"): Bounds(low=0, high=1),
    ("optim", "lr"): Bounds(low=0, low_open=True),
    ("optim", "momentum"): Bounds(low=0, high=1, high_open=True),
    ("optim", "weight_decay"): NOT_NEGATIVE,
    ("optim", "warmup_epochs"): Bounds(low=0, note=" (0 disables the warm-up)"),
    ("optim", "gamma"): Bounds(low=0, high=1, low_open=True),
    ("lookaround", "num_branches"): AT_LEAST_ONE,
    ("lookaround", "k"): AT_LEAST_ONE,
    ("train", "epochs"): AT_LEAST_ONE,
    ("train", "timeout_seconds"): Bounds(low=0, low_open=True),
    ("train", "log_interval_steps"): AT_LEAST_ONE,
    ("train", "keep_checkpoints"): AT_LEAST_ONE,
    ("train", "max_steps_per_epoch"): Bounds(low=0, note=" (0 means the whole epoch)"),
    ("train", "threads_per_rank"): Bounds(low=0, note=" (0 lets OMP_NUM_THREADS decide)"),
    ("train", "stop_after_steps"): Bounds(low=0, note=" (0 never stops early)"),
    ("train", "lookahead_alpha"): Bounds(low=0, high=1, low_open=True),
    ("train", "bn_recalibration_batches"): NOT_NEGATIVE,
    ("train", "diversity_interval_rounds"): Bounds(low=0, note=" (0 disables)"),
    ("train", "swa_lr"): Bounds(low=0, note=" (0 keeps the schedule)"),
}
"""Range of every numeric field that has one. train.swa_epochs depends on train.epochs, so
validate_method checks it."""

LIST_BOUNDS = {
    ("data", "mean"): (3, Bounds(low=0, high=1, note=" (RGB on the 0..1 scale)")),
    ("data", "std"): (3, Bounds(low=0, high=1, low_open=True, note=" (RGB on the 0..1 scale)")),
    ("optim", "milestones"): (None, Bounds(low=0, note=" (epochs)")),
}
"""Required length (None for any) and element range of the numeric list fields."""


def validate_config(config: RunConfig) -> None:
    """Check values that need no data, model or process group."""
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(config, section), key)
        if value not in allowed:
            raise ConfigError(f"{section}.{key} must be one of {', '.join(allowed)}, found {value!r}")
    validate_ranges(config)
    if len(config.data.augmentations) != config.lookaround.num_branches:
        raise ConfigError(
            f"data.augmentations needs one name per branch: lookaround.num_branches="
            f"{config.lookaround.num_branches} but {len(config.data.augmentations)} names were "
            f"given ({config.data.augmentations})"
        )
    validate_method(config)


def validate_ranges(config: RunConfig) -> None:
    """Check every numeric field and numeric list against its range in BOUNDS and LIST_BOUNDS."""
    for (section, key), bounds in BOUNDS.items():
        value = getattr(getattr(config, section), key)
        if not bounds.contains(value):
            raise ConfigError(f"{section}.{key} must {bounds.describe()}, found {value}")
    for (section, key), (length, bounds) in LIST_BOUNDS.items():
        values = getattr(getattr(config, section), key)
        if length is not None and len(values) != length:
            raise ConfigError(f"{section}.{key} needs {length} numbers, found {len(values)}: {values}")
        for index, value in enumerate(values):
            if not bounds.contains(value):
                raise ConfigError(f"{section}.{key}[{index}] must {bounds.describe()}, found {value}")


def validate_method(config: RunConfig) -> None:
    """Check the SWA keys of ``train``, whose valid values depend on other keys."""
    train = config.train
    if not 0 <= train.swa_epochs <= train.epochs:
        raise ConfigError(
            f"train.swa_epochs must lie in [0, train.epochs={train.epochs}], found {train.swa_epochs}"
        )
    if train.swa_epochs > 0 and train.method == "independent":
        raise ConfigError(
            "train.swa_epochs > 0 needs a consensus to average, but train.method=independent "
            "never forms one; set train.swa_epochs=0 or choose another method"
        )
    if (train.swa_epochs > 0 or train.recalibrate_bn) and train.bn_recalibration_batches < 1:
        raise ConfigError(
            f"train.bn_recalibration_batches must be >= 1 with SWA or train.recalibrate_bn, "
            f"found {train.bn_recalibration_batches}"
        )


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
