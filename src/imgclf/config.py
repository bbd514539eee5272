"""Step configurations: one frozen dataclass per ``params.yaml`` section.

Each step reads only its own section (DVC's ``params:`` lists the same keys), so a change to
``train.epochs`` reruns train and what follows, not ingest. Unknown keys and wrong types are
rejected with the section and key named, because a typo in params.yaml that is silently
ignored costs a whole training run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from imgclf.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")


@dataclasses.dataclass(frozen=True)
class SplitRatios:
    """Fractions of each class that go to train, val and test (they must sum to 1)."""

    train: float = 0.7
    val: float = 0.15
    test: float = 0.15


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    """Where the raw images come from and how they are normalised and split."""

    source: str = "sample:digits"
    image_size: int = 32
    split: SplitRatios = SplitRatios()
    seed: int = 42
    image_format: str = "png"
    s3: Mapping[str, Any] = dataclasses.field(default_factory=dict)


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
    num_workers: int = 0
    threads: int = 0
    max_steps_per_epoch: int = 0


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
    return cls(**kwargs)


def read_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """Read params.yaml as a dict; a missing file means all defaults."""
    p = Path(path)
    if not p.exists():
        return {}
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
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
