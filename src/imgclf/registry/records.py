"""What the model registry records and returns: valid names, timestamps, who published,
the frozen views of a version (:class:`VersionInfo`) and of an alias (:class:`Champion`),
and what ``verify`` and ``gc`` report (:class:`IntegrityProblem`, :class:`GcEntry`).

Kept apart from :mod:`imgclf.registry.model_registry`, which does the storing, so that
callers formatting or checking these values need not read the store logic.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import getpass
import os
import re
import socket
from collections.abc import Mapping
from typing import Any

from imgclf.errors import RegistryError

# A lowercase DNS-1035 label: the model name also becomes the KServe InferenceService name
# and a Kubernetes label value, which both must be DNS labels starting with a letter.
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_MAX_NAME = 63


def validate_name(value: str, what: str = "model name") -> str:
    """Return ``value`` if it is a valid model/alias name, else raise RegistryError saying why."""
    if not isinstance(value, str) or not _NAME_RE.match(value) or len(value) > _MAX_NAME:
        raise RegistryError(
            f"invalid {what} {value!r}: use 1-{_MAX_NAME} lowercase letters, digits and '-', "
            "starting with a letter and not ending with '-' (it becomes a Kubernetes name; "
            "set registry.model_name in params.yaml)"
        )
    return value


def utc_now() -> str:
    """The current UTC time as ISO-8601 with seconds (what every registry timestamp uses)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def default_registered_by() -> str:
    """Who publishes: ``IMGCLF_REGISTERED_BY`` (e.g. a KFP run id), else ``user@host``."""
    explicit = os.environ.get("IMGCLF_REGISTERED_BY")
    if explicit:
        return explicit
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclasses.dataclass(frozen=True)
class VersionInfo:
    """One published (READY) model version, as listed and shown by the registry."""

    name: str
    version: int
    created_at: str
    accuracy: float | None
    dataset_hash: str | None
    model_sha256: str | None
    aliases: tuple[str, ...]
    uri: str
    files: Mapping[str, str]
    metrics: Mapping[str, Any]
    lineage: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (``imgclf registry ... --json``)."""
        out = dataclasses.asdict(self)
        out["aliases"] = list(self.aliases)
        out["files"] = dict(self.files)
        return out


@dataclasses.dataclass(frozen=True)
class Champion:
    """The version an alias serves, as the evaluate gate and the retraining policy need it.

    ``model_json`` is None when the version has no ``model/model.json`` (published by hand),
    ``metrics`` empty when it has no ``metrics.json``, ``dataset_hash`` None when its lineage
    records none: callers decide what an unknown means for them.
    """

    version: int
    model_json: Mapping[str, Any] | None
    metrics: Mapping[str, Any]
    dataset_hash: str | None


@dataclasses.dataclass(frozen=True)
class IntegrityProblem:
    """One stored file of a complete version that differs from its ``READY`` record.

    ``key`` is relative to the registry root; ``where`` is the full location (the registry
    URI joined with it), the thing a user opens or deletes.
    """

    name: str
    version: int
    key: str
    detail: str
    where: str

    def __str__(self) -> str:
        return f"{self.where}: {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (``imgclf registry verify --json``)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class GcEntry:
    """An incomplete version (no ``READY``) that ``gc`` removed, or would remove in a dry run."""

    name: str
    version: int
    prefix: str
    objects: int
    newest: dt.datetime
    removed: bool

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (``imgclf registry gc --json``)."""
        out = dataclasses.asdict(self)
        out["newest"] = self.newest.isoformat(timespec="seconds")
        return out
