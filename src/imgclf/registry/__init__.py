"""The model registry: numbered versions and movable aliases on any store, their integrity
checks and garbage collection, and the retraining policy that reads it."""

from imgclf.registry.model_registry import (
    DEFAULT_ALIAS,
    DEFAULT_GC_GRACE,
    ModelRegistry,
    VersionIntegrityError,
)
from imgclf.registry.records import (
    Champion,
    GcEntry,
    IntegrityProblem,
    VersionInfo,
    validate_name,
)

__all__ = [
    "DEFAULT_ALIAS",
    "DEFAULT_GC_GRACE",
    "Champion",
    "GcEntry",
    "IntegrityProblem",
    "ModelRegistry",
    "VersionInfo",
    "VersionIntegrityError",
    "validate_name",
]
