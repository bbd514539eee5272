"""Retraining policy: train only when the data changed since the production model.

A recurring pipeline run (daily, say) ingests the source every time; training and
evaluating a GPU model on the very data the production model was trained on would cost an
hour to learn nothing. So after validation the pipeline compares the dataset's content hash
(``dataset.json`` ``hash``) with the ``dataset_hash`` in the lineage of the version the
production alias points to, and skips training when they match.

Only the store and the registry layout of docs/CONTRACTS.md are read here, so this check
stays independent of how versions are published.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imgclf.config import RegistryConfig
from imgclf.errors import DataError, RegistryError
from imgclf.fsutil import read_json
from imgclf.storage import Store, open_store


def _store_json(store: Store, key: str) -> Any:
    try:
        return json.loads(store.read_bytes(key))
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{store.uri}/{key}: not valid JSON ({exc})") from None


def dataset_hash(dataset_dir: str | Path) -> str:
    """The content hash ingest recorded in ``<dataset_dir>/dataset.json``."""
    path = Path(dataset_dir) / "dataset.json"
    if not path.is_file():
        raise DataError(f"{path}: not found; is {dataset_dir} a dataset dir written by ingest?")
    value = read_json(path).get("hash")
    if not isinstance(value, str) or not value:
        raise DataError(f"{path}: has no 'hash'; rerun ingest")
    return value


def production_dataset_hash(registry: RegistryConfig) -> tuple[int, str | None] | None:
    """(version, dataset hash) of the version the alias points to; None if no alias yet.

    The hash is None when the version's lineage does not record one (a model published by
    hand), which the caller treats as "unknown, so retrain".
    """
    store = open_store(registry.uri)
    base = f"models/{registry.model_name}"
    alias_key = f"{base}/aliases/{registry.alias}.json"
    if not store.exists(alias_key):
        return None
    version = _store_json(store, alias_key).get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise RegistryError(f"{store.uri}/{alias_key}: 'version' must be an integer")
    prefix = f"{base}/{version}"
    if not store.exists(f"{prefix}/READY"):
        raise RegistryError(
            f"{store.uri}/{alias_key} points to version {version}, which has no READY marker "
            f"(incomplete publish); promote a complete version"
        )
    lineage_key = f"{prefix}/lineage.json"
    lineage = _store_json(store, lineage_key) if store.exists(lineage_key) else {}
    value = lineage.get("dataset_hash")
    return version, value if isinstance(value, str) and value else None


def should_retrain(
    dataset_dir: str | Path, registry: RegistryConfig, force: bool = False
) -> tuple[bool, str]:
    """Whether to train on ``dataset_dir``, and a one-line reason for the run's log and UI."""
    current = dataset_hash(dataset_dir)
    if force:
        return True, f"retraining forced on dataset {current}"
    production = production_dataset_hash(registry)
    name = f"{registry.model_name!r} alias {registry.alias!r}"
    if production is None:
        return True, f"no {name} in registry {registry.uri}: training the first model"
    version, trained_on = production
    if trained_on is None:
        return True, (
            f"{name} is version {version}, whose lineage records no dataset hash: retraining"
        )
    if trained_on == current:
        return False, (
            f"nothing to retrain: dataset {current} unchanged since {registry.alias} "
            f"version {version}"
        )
    return True, (
        f"dataset changed: {current} differs from {trained_on} of {registry.alias} "
        f"version {version}"
    )
