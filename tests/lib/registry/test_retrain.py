"""The retraining policy against a real registry written by ``imgclf.registry.model_registry``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kfp.dsl import Dataset

from components.check_retrain.component import check_retrain
from imgclf.config import RegistryConfig
from imgclf.errors import DataError, RegistryError
from imgclf.registry import ModelRegistry
from imgclf.registry.retrain import should_retrain


def _dataset(path: Path, digest: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "dataset.json").write_text(json.dumps({"hash": digest, "classes": ["a", "b"]}))
    return path


def _publish(registry_dir: Path, dataset_hash: str | None, weights: bytes) -> int:
    model_dir = registry_dir.parent / f"model-{weights.hex()}"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(weights)
    (model_dir / "model.json").write_text("{}")
    lineage = {} if dataset_hash is None else {"dataset_hash": dataset_hash}
    reg = ModelRegistry.open(registry_dir)
    version = reg.publish("digits", model_dir, {"accuracy": 0.99}, lineage)
    reg.promote("digits", version)
    return version


@pytest.fixture
def registry(tmp_path: Path) -> RegistryConfig:
    return RegistryConfig(uri=str(tmp_path / "registry"), model_name="digits")


def test_first_model_is_trained(tmp_path: Path, registry: RegistryConfig) -> None:
    decision, reason = should_retrain(_dataset(tmp_path / "ds", "h1"), registry)
    assert decision is True
    assert "first model" in reason


def test_unchanged_dataset_is_skipped(tmp_path: Path, registry: RegistryConfig) -> None:
    version = _publish(Path(registry.uri), "h1", b"w1")
    decision, reason = should_retrain(_dataset(tmp_path / "ds", "h1"), registry)
    assert decision is False
    assert reason == f"nothing to retrain: dataset h1 unchanged since production version {version}"


def test_changed_dataset_is_trained(tmp_path: Path, registry: RegistryConfig) -> None:
    _publish(Path(registry.uri), "h1", b"w1")
    decision, reason = should_retrain(_dataset(tmp_path / "ds", "h2"), registry)
    assert decision is True
    assert "h2 differs from h1" in reason


def test_alias_decides_not_the_newest_version(tmp_path: Path, registry: RegistryConfig) -> None:
    # Version 2 was trained on h2 but rolled back: production serves h1's model again, so a
    # dataset equal to h2 is new for production and must be trained.
    _publish(Path(registry.uri), "h1", b"w1")
    _publish(Path(registry.uri), "h2", b"w2")
    ModelRegistry.open(registry.uri).rollback("digits")
    assert should_retrain(_dataset(tmp_path / "ds", "h2"), registry)[0] is True
    assert should_retrain(_dataset(tmp_path / "ds", "h1"), registry)[0] is False


def test_force_trains_unchanged_data(tmp_path: Path, registry: RegistryConfig) -> None:
    _publish(Path(registry.uri), "h1", b"w1")
    decision, reason = should_retrain(_dataset(tmp_path / "ds", "h1"), registry, force=True)
    assert decision is True
    assert "forced" in reason


def test_lineage_without_hash_retrains(tmp_path: Path, registry: RegistryConfig) -> None:
    _publish(Path(registry.uri), None, b"w1")
    decision, reason = should_retrain(_dataset(tmp_path / "ds", "h1"), registry)
    assert decision is True
    assert "no dataset hash" in reason


def test_alias_to_incomplete_version_is_an_error(tmp_path: Path, registry: RegistryConfig) -> None:
    _publish(Path(registry.uri), "h1", b"w1")
    (Path(registry.uri) / "models/digits/1/READY").unlink()
    with pytest.raises(RegistryError, match="no READY marker"):
        should_retrain(_dataset(tmp_path / "ds", "h1"), registry)


def test_not_a_dataset_dir(tmp_path: Path, registry: RegistryConfig) -> None:
    with pytest.raises(DataError, match=r"dataset\.json: not found"):
        should_retrain(tmp_path, registry)


def test_component_body_returns_the_decision(tmp_path: Path, registry: RegistryConfig) -> None:
    """The component's own function (what runs in the pod) on a real dataset and registry."""
    _publish(Path(registry.uri), "h1", b"w1")
    dataset = Dataset(uri=str(_dataset(tmp_path / "ds", "h1")))
    decision, reason = check_retrain.python_func(
        dataset=dataset,
        registry_uri=registry.uri,
        model_name="digits",
        registry_alias="production",
        force=False,
    )
    assert (decision, reason.startswith("nothing to retrain")) == (False, True)
