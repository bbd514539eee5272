"""The model registry: numbered versions and movable aliases on any store, and the
retraining policy that reads it."""

from imgclf.registry.model_registry import DEFAULT_ALIAS, ModelRegistry
from imgclf.registry.records import Champion, VersionInfo, validate_name

__all__ = ["DEFAULT_ALIAS", "Champion", "ModelRegistry", "VersionInfo", "validate_name"]
