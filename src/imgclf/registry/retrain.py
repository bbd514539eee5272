"""Retraining policy: train only when the data changed since the production model.

A recurring pipeline run (daily, say) ingests the source every time; training and
evaluating a GPU model on the very data the production model was trained on would cost an
hour to learn nothing. So after validation the pipeline compares the dataset's content hash
(recorded by ingest in ``dataset.json``) with the dataset hash in the lineage of the version
the production alias points to (:meth:`ModelRegistry.champion`), and skips training when
they match.
"""

from __future__ import annotations

from pathlib import Path

from imgclf.config import RegistryConfig
from imgclf.contracts import read_dataset_hash
from imgclf.registry.model_registry import ModelRegistry


def should_retrain(
    dataset_dir: str | Path, registry: RegistryConfig, force: bool = False
) -> tuple[bool, str]:
    """Whether to train on ``dataset_dir``, and a one-line reason for the run's log and UI.

    A production version whose lineage records no dataset hash (a model published by hand)
    counts as "unknown, so retrain".
    """
    current = read_dataset_hash(dataset_dir)
    if force:
        return True, f"retraining forced on dataset {current}"
    champion = ModelRegistry.open(registry.uri).champion(registry.model_name, registry.alias)
    name = f"{registry.model_name!r} alias {registry.alias!r}"
    if champion is None:
        return True, f"no {name} in registry {registry.uri}: training the first model"
    version, trained_on = champion.version, champion.dataset_hash
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
