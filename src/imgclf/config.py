"""Step configurations: one frozen dataclass per ``params.yaml`` section.

Each step reads only its own section (DVC's ``params:`` lists the same keys), so a change to
``train.epochs`` reruns train and what follows, not ingest. Unknown keys and wrong types are
rejected with the section and key named, because a typo in params.yaml that is silently
ignored costs a whole training run.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from imgclf.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")

IMAGE_SIZE_RANGE = (8, 4096)
"""Square sizes (px) images may be resized to: below 8 a CNN pools the picture away to
nothing; above 4096 one batch needs gigabytes, and training died of a bare MemoryError long
after it started instead of refusing the setting."""

AUTO = "auto"
DATA_MODES = (AUTO, "images", "shards")
"""``train.data``: which layout of the dataset dir training reads (see imgclf.data.shard_reader)."""
_SPLIT_TOLERANCE = 1e-6


def _number_error(where: str, value: Any, rule: str) -> ConfigError | None:
    """The error for ``value`` breaking ``rule``, or None when it is a finite number.

    NaN compares false with every bound, so a range check alone would let it through.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return ConfigError(f"{where}={value}: must be a finite number {rule}")
    return None


def _at_least(section: str, cfg: Any, low: float, *names: str) -> None:
    """Refuse the first of ``names`` whose value is below ``low``, naming ``section.name``."""
    for name in names:
        value, where = getattr(cfg, name), f"{section}.{name}"
        error = _number_error(where, value, f">= {low:g}")
        if error is None and value < low:
            error = ConfigError(f"{where}={value}: must be >= {low:g}")
        if error is not None:
            raise error


def _between(section: str, cfg: Any, low: float, high: float, *names: str) -> None:
    """Refuse the first of ``names`` whose value is outside ``[low, high]``."""
    for name in names:
        value, where = getattr(cfg, name), f"{section}.{name}"
        rule = f"between {low:g} and {high:g}"
        error = _number_error(where, value, rule)
        if error is None and not low <= value <= high:
            error = ConfigError(f"{where}={value}: must be {rule}")
        if error is not None:
            raise error


def parse_rate(value: float | str, key: str) -> float | None:
    """A learning-rate setting as a number, or None for ``auto``; ConfigError naming
    ``train.<key>``.

    YAML reads ``3e-3`` (no dot) as a string, so numeric strings are accepted too.
    """
    if isinstance(value, str):
        if value.strip().lower() == AUTO:
            return None
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"train.{key}={value!r}: expected a number or 'auto'") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"train.{key}={value!r}: expected a finite rate >= 0 or 'auto'")
    return float(value)


def parse_flag(value: bool | str) -> bool:
    """A boolean setting given as a bool or, from KFP and overrides, as ``true``/``false``."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise ConfigError(f"expected true or false, got {value!r}")
    return value


def parse_write_images(value: bool | str) -> bool | None:
    """``ingest.write_images``: True, False, or None for ``auto``; ConfigError naming it."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return None
    try:
        return parse_flag(value)
    except ConfigError:
        raise ConfigError(
            f"ingest.write_images={value!r}: expected true, false or 'auto'"
        ) from None


@dataclasses.dataclass(frozen=True)
class SplitRatios:
    """Fractions of each class that go to train, val and test (they must sum to 1)."""

    train: float = 0.7
    val: float = 0.15
    test: float = 0.15

    def __post_init__(self) -> None:
        # Checked on load, not at ingest: ratios that do not sum to 1 drop or invent images.
        ratios = (self.train, self.val, self.test)
        if any(not math.isfinite(r) or r < 0 for r in ratios) or not math.isclose(
            sum(ratios), 1.0, abs_tol=_SPLIT_TOLERANCE
        ):
            raise ConfigError(
                "ingest.split: ratios must be >= 0 and sum to 1, got "
                f"train={self.train} val={self.val} test={self.test}"
            )


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    """Where the raw images come from and how they are normalised and split."""

    source: str = "sample:digits"
    image_size: int = 32
    split: SplitRatios = SplitRatios()
    seed: int = 42
    # keep: files that need no change are stored byte for byte; png: re-encode every image
    image_format: str = "keep"
    # processes that decode, check and hash images: "auto" (one per core) or a count
    workers: int | str = "auto"
    s3: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # Sources are untrusted input: bounds that stop a hostile or broken archive or download
    # before it fills the disk. Generous enough for a large image dataset, small enough
    # that hitting one on a laptop still leaves it usable; raise them for bigger datasets.
    max_download_bytes: int = 20 * 1024**3
    max_extracted_bytes: int = 20 * 1024**3
    max_archive_members: int = 2_000_000
    max_compression_ratio: float = 200.0
    # A local directory may hold symlinks resolving inside it; one leading outside is refused
    # unless this is true (e.g. a DVC cache of type symlink, whose links point into .dvc/cache).
    allow_external_links: bool = False
    # Each split also as tar shards of at most shard_bytes (WebDataset layout, shards.json).
    shards: bool = True
    shard_bytes: int = 256 * 1024**2
    # images/ tree: true, false, or auto (kept up to images_max images; needs shards to drop)
    write_images: bool | str = AUTO
    images_max: int = 200_000

    def __post_init__(self) -> None:
        _between("ingest", self, *IMAGE_SIZE_RANGE, "image_size")
        _at_least("ingest", self, 1, "shard_bytes", "images_max")
        if parse_write_images(self.write_images) is False and not parse_flag(self.shards):
            raise ConfigError(
                "ingest.write_images=false needs ingest.shards: true (the dataset would hold "
                "no images)"
            )
        _at_least("ingest", self, 1, "max_download_bytes", "max_extracted_bytes")
        _at_least("ingest", self, 1, "max_archive_members")
        workers = self.workers
        if isinstance(workers, str) and workers.strip().isdigit():
            workers = int(workers)  # KFP passes strings
        if not (isinstance(workers, str) and workers.strip().lower() == AUTO) and (
            type(workers) is not int or workers < 1
        ):
            raise ConfigError(f"ingest.workers={self.workers!r}: must be >= 1 or 'auto'")
        if not self.max_compression_ratio >= 1:
            raise ConfigError(
                f"ingest.max_compression_ratio={self.max_compression_ratio}: must be >= 1"
            )


@dataclasses.dataclass(frozen=True)
class ValidateConfig:
    """Bounds for the Great Expectations suite run over the manifest."""

    min_width: int = 8
    max_width: int = 4096
    min_height: int = 8
    max_height: int = 4096
    allowed_modes: tuple[str, ...] = ("L", "RGB")
    min_images_per_class: int = 5
    min_images_per_split: int = 10
    max_duplicate_fraction: float = 0.0
    max_imbalance_ratio: float = 10.0
    imbalance_blocking: bool = False

    def __post_init__(self) -> None:
        _at_least("validate", self, 1, "min_width", "min_height")
        for low, high in (("min_width", "max_width"), ("min_height", "max_height")):
            if getattr(self, low) > getattr(self, high):
                raise ConfigError(
                    f"validate.{low}={getattr(self, low)} exceeds validate.{high}="
                    f"{getattr(self, high)}: no image could pass"
                )
        _at_least("validate", self, 0, "min_images_per_class", "min_images_per_split")
        _between("validate", self, 0, 1, "max_duplicate_fraction")
        # largest / smallest class: below 1 no dataset, not even a balanced one, could pass
        _at_least("validate", self, 1, "max_imbalance_ratio")
        if not self.allowed_modes:
            raise ConfigError("validate.allowed_modes=[]: must list at least one PIL mode")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Model, transfer-learning and optimisation settings (book chapter 4 knobs)."""

    model: str = "resnet18"
    pretrained: str = "none"
    freeze_backbone: bool = False
    freeze_epochs: int = 1
    image_size: int = 32
    augment: str = "light"
    epochs: int = 8
    min_steps: int = 300
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float | str = "auto"
    backbone_lr: float | str = "auto"
    weight_decay: float = 1e-4
    scheduler: str = "onecycle"
    patience: int = 3
    seed: int = 42
    device: str = "auto"
    num_workers: int | str = "auto"
    prefetch_factor: int | str = "auto"
    persistent_workers: bool | str = "auto"
    pin_memory: bool | str = "auto"
    threads: int = 0
    max_steps_per_epoch: int = 0
    # Read the images/ tree or the tar shards: auto takes images/ when the dataset dir has it
    # and streams the shards otherwise (a remote dataset with shards.json is streamed).
    data: str = AUTO
    # Samples each DataLoader worker shuffles at a time when reading shards.
    shuffle_buffer: int = 2000
    # torch.compile the training forward/backward: off until measured on the target GPU
    # (benchmarks/gpu_check.sh prints the gain); the first steps pay the compilation.
    compile: bool = False
    # Preemption-safe training (imgclf.training.checkpoint): a dir that outlives a retried
    # step, never inside the model dir ("" turns checkpoints off); every N optimizer steps
    # (0: at epoch ends only; >= 0 and keep >= 1 are checked by the train step).
    checkpoint_dir: str = "out/checkpoints"
    checkpoint_every_steps: int = 200
    # Scheduled checkpoints (every N steps, epoch ends) at most this often; SIGTERM always
    # writes one. A resnet18 checkpoint costs ~0.4 s of CPU: on short epochs, every epoch end
    # would cost a fifth of the run for at most a minute of work saved.
    checkpoint_min_interval_s: float = 60.0
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        _between("train", self, *IMAGE_SIZE_RANGE, "image_size")
        _at_least("train", self, 1, "epochs", "batch_size", "shuffle_buffer")
        if self.data not in DATA_MODES:
            raise ConfigError(f"train.data={self.data!r}: must be one of {', '.join(DATA_MODES)}")
        # 0 means "off" or "the default" for these (no early stop, torch's thread count, ...)
        _at_least(
            "train",
            self,
            0,
            "freeze_epochs",
            "min_steps",
            "weight_decay",
            "patience",
            "threads",
            "max_steps_per_epoch",
            "checkpoint_min_interval_s",
        )
        if parse_rate(self.lr, "lr") == 0:
            raise ConfigError("train.lr=0: must be > 0 or 'auto'")
        parse_rate(self.backbone_lr, "backbone_lr")
        # DataLoader knobs: "auto" (chosen from the machine by the loader) or an explicit value;
        # KFP passes them as strings, so "4" is a count too.
        for name, kind, low, rule in (
            ("num_workers", int, 0, ">= 0"),
            ("prefetch_factor", int, 1, ">= 1"),
            ("persistent_workers", bool, None, "true or false"),
            ("pin_memory", bool, None, "true or false"),
        ):
            value = getattr(self, name)
            if isinstance(value, str) and value.strip().lower() == AUTO:
                continue
            if kind is int and isinstance(value, str) and value.strip().isdigit():
                value = int(value)
            if type(value) is not kind or (low is not None and value < low):
                raise ConfigError(f"train.{name}={value!r}: must be {rule} or 'auto'")


@dataclasses.dataclass(frozen=True)
class RegistryConfig:
    """Where model versions live (a local dir or ``s3://bucket/prefix``) and under which name.

    Read by evaluate (to find the production champion) and deploy (to publish and promote).
    """

    uri: str = "registry"
    model_name: str = "digits"
    alias: str = "production"


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Quality gate: absolute floor and allowed regression against production."""

    min_accuracy: float = 0.95
    max_regression: float = 0.01
    top_k: int = 3
    batch_size: int = 256

    def __post_init__(self) -> None:
        # Accuracies are fractions: a floor above 1 silently blocks every model, and a
        # negative allowance silently demands a challenger strictly better than production.
        _between("evaluate", self, 0, 1, "min_accuracy", "max_regression")
        _at_least("evaluate", self, 1, "top_k", "batch_size")


@dataclasses.dataclass(frozen=True)
class DeployConfig:
    """How a candidate is smoke-tested, and how its KServe InferenceService is rendered and
    applied."""

    namespace: str = "imgclf"
    service_account: str = "imgclf-kserve"
    image: str = "ghcr.io/imgclf/imgclf:0.1.0"
    storage_uri_prefix: str = ""
    smoke_samples: int = 64
    smoke_p95_ms: float = 1000.0
    smoke_timeout_s: float = 300.0
    canary_percent: int = 0
    apply: bool | str = "auto"
    ready_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.smoke_samples < 0:
            raise ConfigError(f"deploy.smoke_samples={self.smoke_samples}: must be >= 0")
        if not 0 <= self.canary_percent <= 100:
            raise ConfigError(
                f"deploy.canary_percent={self.canary_percent}: must be between 0 and 100"
            )
        if isinstance(self.apply, str) and self.apply != "auto":
            raise ConfigError(f"deploy.apply={self.apply!r}: expected auto, true or false")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """The model server (``imgclf serve``, the KServe predictor and the deploy smoke test).

    Requests that arrive while a batch runs are stacked into the next one, up to
    ``max_batch_size`` images or ``max_batch_wait_ms`` after the first: one forward pass for
    many clients is what lets a CPU or GPU server keep up with concurrent load. The limits
    bound what one request can cost the server (body bytes, images, decoded pixels).
    """

    max_batch_size: int = 32
    max_batch_wait_ms: float = 2.0
    top_k: int = 3
    max_body_bytes: int = 16 * 1024 * 1024
    max_images_per_request: int = 64
    max_image_pixels: int = 4096 * 4096
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in (
            "max_batch_size",
            "top_k",
            "max_body_bytes",
            "max_images_per_request",
            "max_image_pixels",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve.{name}={getattr(self, name)}: must be at least 1")
        if self.max_batch_wait_ms < 0:
            raise ConfigError(f"serve.max_batch_wait_ms={self.max_batch_wait_ms}: must be >= 0")


T = TypeVar("T")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a YAML value to the dataclass field type, or raise ConfigError naming it."""
    # YAML's .nan and .inf are floats that pass every type check and compare false with
    # every bound; no setting means "not a number" or "unbounded", so refuse them anywhere.
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}={value}: must be a finite number")
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        for arg in args[:-1]:  # the first member type the value fits (`float | str`: 1e-3, auto)
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        return _coerce(value, args[-1], where)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return build(hint, value, where)
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1]
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if (origin is not None and issubclass(origin, Mapping)) or hint is Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def build(cls: type[T], values: Mapping[str, Any], where: str) -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys and bad types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(_located(str(exc), where)) from None


def _located(message: str, where: str) -> str:
    """A range check's message with the params file named: ``params.yaml:train.epochs=0: ...``.

    ``__post_init__`` checks know their section (``train.epochs=0: must be >= 1``) but not
    the file; ``where`` is ``<file>:<section>``, so the message is prefixed with the file when
    it starts with the section, else with all of ``where``.
    """
    file_label, colon, section = where.rpartition(":")
    if re.match(rf"{re.escape(section)}[.:=]", message):
        return f"{file_label}{colon}{message}"
    return f"{where}: {message}"


def read_params(path: str | Path = DEFAULT_PARAMS, *, missing_ok: bool = True) -> dict[str, Any]:
    """Read params.yaml as a dict; a missing file means all defaults when ``missing_ok``.

    The CLI passes ``missing_ok=False`` for a file the user named: ``--params missing.yaml``
    must not quietly train with every default.
    """
    p = Path(path)
    if not p.exists():
        if missing_ok:
            return {}
        raise ConfigError(f"params file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read the params file: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of sections at the top level")
    return data


def load_section(
    cls: type[T],
    section: str,
    params_path: str | Path = DEFAULT_PARAMS,
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """Load ``section`` of params.yaml into ``cls``, then apply ``overrides`` (flags, KFP)."""
    return section_of(read_params(params_path), cls, section, Path(params_path).name, overrides)


def section_of(
    params: Mapping[str, Any],
    cls: type[T],
    section: str,
    file_label: str,
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """``section`` of already-read params into ``cls``, with ``overrides``; errors name
    ``file_label:section.key``."""
    values = dict(params.get(section) or {})
    values.update(overrides or {})
    return build(cls, values, f"{file_label}:{section}")


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key=value`` (value as YAML, so ``epochs=2`` is an int) from ``--set`` flags."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected key=value")
    return key.strip(), yaml.safe_load(raw)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain JSON-able data, saved next to outputs (``config.json``)."""
    return dataclasses.asdict(cfg)
