"""EVALUATE step: test metrics, output files and the champion gate on a real registry layout.

The champion is published with the real registry into a LocalStore (and once into the
session's S3 server), as deploy would. A "good" model trained for a few epochs and an
untrained "bad" one give the gate a real accuracy gap to decide on.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest

from _dataset_factory import build_tiny_dataset
from imgclf.config import EvaluateConfig, RegistryConfig, TrainConfig
from imgclf.errors import DataError, RegistryError
from imgclf.registry import ModelRegistry
from imgclf.steps import evaluate, train

pytestmark = pytest.mark.timeout(180)

TINY = TrainConfig(
    model="simple_cnn",
    image_size=12,
    min_steps=0,
    epochs=6,
    batch_size=8,
    lr=1e-2,
    backbone_lr=1e-2,
    augment="none",
    patience=0,
)
OPEN_GATE = EvaluateConfig(min_accuracy=0.0, max_regression=0.0, top_k=2, batch_size=16)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_dataset(tmp_path_factory.mktemp("tiny") / "ds")


@pytest.fixture(scope="module")
def good_model(dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("good") / "model"
    train.run(TINY, dataset_dir=dataset_dir, out_dir=out)
    return out


@pytest.fixture(scope="module")
def bad_model(dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bad") / "model"
    cfg = dataclasses.replace(
        TINY, epochs=1, optimizer="sgd", lr=1e-30, backbone_lr=0.0, scheduler="none", seed=5
    )
    train.run(cfg, dataset_dir=dataset_dir, out_dir=out)
    return out


def _publish(uri: str, model_dir: Path, metrics: dict) -> int:
    """Publish ``model_dir`` as the next version and point the production alias at it."""
    reg = ModelRegistry.open(uri)
    version = reg.publish("digits", model_dir, metrics, {})
    reg.promote("digits", version)
    return version


def test_metrics_and_outputs(dataset_dir: Path, good_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    registry = RegistryConfig(uri=str(tmp_path / "empty-registry"))
    metrics = evaluate.run(
        OPEN_GATE, registry, dataset_dir=dataset_dir, model_dir=good_model, out_dir=out
    )

    flat = json.loads((out / "metrics.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert {**flat, **report} == json.loads(json.dumps(metrics))
    assert metrics["passed"] is True and metrics["champion"] is None
    assert any("no production champion" in r for r in metrics["reasons"])
    assert metrics["accuracy"] >= 0.9
    assert metrics["top_k"] == 2 and metrics["top_k_accuracy"] >= metrics["accuracy"]
    assert metrics["num_images"] == 18

    matrix_doc = json.loads((out / "confusion_matrix.json").read_text())
    classes, matrix = matrix_doc["classes"], matrix_doc["matrix"]
    assert classes == ["p0", "p1", "p2"]
    assert sum(map(sum, matrix)) == 18
    diagonal = sum(matrix[i][i] for i in range(3))
    assert metrics["accuracy"] == pytest.approx(diagonal / 18)
    for i, name in enumerate(classes):
        per = metrics["per_class"][name]
        assert per["support"] == sum(matrix[i]) == 6
        assert per["recall"] == pytest.approx(matrix[i][i] / 6)
        column = sum(row[i] for row in matrix)
        assert per["precision"] == pytest.approx(matrix[i][i] / column if column else 0.0)

    with open(out / "confusion.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 18 and set(rows[0]) == {"actual", "predicted"}
    assert sum(r["actual"] == r["predicted"] for r in rows) == diagonal
    card = (out / "model_card.md").read_text()
    assert "| accuracy |" in card and "| p1 |" in card and "## Gate: PASSED" in card
    assert (out / "history.csv").read_text() == (good_model / "history.csv").read_text()
    assert json.loads((out / "config.json").read_text())["evaluate"]["top_k"] == 2


def test_min_accuracy_fails_the_gate(dataset_dir: Path, bad_model: Path, tmp_path: Path) -> None:
    cfg = EvaluateConfig(min_accuracy=0.95)
    registry = RegistryConfig(uri=str(tmp_path / "registry"))
    metrics = evaluate.run(
        cfg, registry, dataset_dir=dataset_dir, model_dir=bad_model, out_dir=tmp_path / "e"
    )
    assert metrics["accuracy"] < 0.95
    assert metrics["passed"] is False
    assert any("< min_accuracy 0.9500" in r for r in metrics["reasons"])
    assert "## Gate: FAILED" in (tmp_path / "e" / "model_card.md").read_text()


def test_better_champion_blocks_challenger(
    dataset_dir: Path, good_model: Path, bad_model: Path, tmp_path: Path
) -> None:
    uri = str(tmp_path / "registry")
    # The recorded accuracy is deliberately wrong: the gate must re-evaluate, not trust it.
    _publish(uri, good_model, {"accuracy": 0.0})
    metrics = evaluate.run(
        OPEN_GATE,
        RegistryConfig(uri=uri),
        dataset_dir=dataset_dir,
        model_dir=bad_model,
        out_dir=tmp_path / "eval",
    )
    good = evaluate.run(
        OPEN_GATE,
        RegistryConfig(uri=str(tmp_path / "none")),
        dataset_dir=dataset_dir,
        model_dir=good_model,
        out_dir=tmp_path / "good-eval",
    )
    assert metrics["passed"] is False
    assert metrics["champion"]["version"] == 1
    assert metrics["champion"]["accuracy"] == pytest.approx(good["accuracy"])
    assert "re-evaluated" in metrics["champion"]["source"]
    assert any("champion v1" in r and r.split()[2] == "<" for r in metrics["reasons"])

    # The same champion against itself passes: equal accuracy is no regression.
    again = evaluate.run(
        OPEN_GATE,
        RegistryConfig(uri=uri),
        dataset_dir=dataset_dir,
        model_dir=good_model,
        out_dir=tmp_path / "eval2",
    )
    assert again["passed"] is True


def test_champion_with_other_classes_uses_recorded_accuracy(
    dataset_dir: Path, good_model: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other-model"
    other_data = build_tiny_dataset(tmp_path / "other-ds", classes=("x", "y", "z"))
    train.run(dataclasses.replace(TINY, epochs=1), dataset_dir=other_data, out_dir=other)
    uri = str(tmp_path / "registry")
    _publish(uri, other, {"accuracy": 0.999})
    metrics = evaluate.run(
        OPEN_GATE,
        RegistryConfig(uri=uri),
        dataset_dir=dataset_dir,
        model_dir=good_model,
        out_dir=tmp_path / "eval",
    )
    assert metrics["champion"] == {
        "version": 1,
        "accuracy": 0.999,
        "source": "recorded metrics.json accuracy (its classes differ from the current dataset's)",
    }
    assert metrics["passed"] is (metrics["accuracy"] >= 0.999)


def test_tampered_champion_is_refused_not_worked_around(
    dataset_dir: Path, good_model: Path, tmp_path: Path
) -> None:
    uri = str(tmp_path / "registry")
    version = _publish(uri, good_model, {"accuracy": 0.5})
    weights = (
        tmp_path / "registry" / "models" / "digits" / str(version) / "model" / "model.safetensors"
    )
    weights.write_bytes(b"not the weights")
    with pytest.raises(RegistryError, match="cannot look up the champion") as refused:
        evaluate.run(
            OPEN_GATE,
            RegistryConfig(uri=uri),
            dataset_dir=dataset_dir,
            model_dir=good_model,
            out_dir=tmp_path / "eval",
        )
    assert str(weights) in str(refused.value) and "sha256" in str(refused.value)
    assert not (tmp_path / "eval").exists()


def test_alias_to_an_incomplete_version_fails(
    good_model: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    uri = str(tmp_path / "registry")
    version = _publish(uri, good_model, {"accuracy": 0.5})
    (tmp_path / "registry" / "models" / "digits" / str(version) / "READY").unlink()
    with pytest.raises(RegistryError, match=f"version {version}, which has no READY marker"):
        evaluate.run(
            OPEN_GATE,
            RegistryConfig(uri=uri),
            dataset_dir=dataset_dir,
            model_dir=good_model,
            out_dir=tmp_path / "eval",
        )


def test_model_for_other_classes_is_rejected(good_model: Path, tmp_path: Path) -> None:
    other_data = build_tiny_dataset(tmp_path / "ds", classes=("a", "b", "c"))
    with pytest.raises(DataError, match="classes"):
        evaluate.run(
            OPEN_GATE,
            RegistryConfig(uri=str(tmp_path / "r")),
            dataset_dir=other_data,
            model_dir=good_model,
            out_dir=tmp_path / "eval",
        )
    assert not (tmp_path / "eval").exists()


@pytest.mark.s3
def test_champion_from_s3_registry(
    dataset_dir: Path,
    good_model: Path,
    bad_model: Path,
    tmp_path: Path,
    s3_env: dict[str, str],
    s3_uri: str,
) -> None:
    _publish(s3_uri, good_model, {"accuracy": 0.0})
    metrics = evaluate.run(
        OPEN_GATE,
        RegistryConfig(uri=s3_uri),
        dataset_dir=dataset_dir,
        model_dir=bad_model,
        out_dir=tmp_path / "eval",
    )
    assert metrics["passed"] is False
    assert metrics["champion"]["version"] == 1
    assert "re-evaluated" in metrics["champion"]["source"]
