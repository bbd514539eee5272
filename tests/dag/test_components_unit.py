"""Each KFP component's Python function, called directly with KFP artifact objects.

This is the depth between the step tests and a kfp.local run (STYLE rule 9): the adapter's
own code (artifact paths in, typed outputs and metadata out) runs in this process on tiny
data, so a wrong path, a missing metadata key or a mistyped return fails here with a plain
traceback. Artifacts get local URIs under tmp_path; for those ``.path`` is the URI itself,
as it is for kfp.local's pipeline root.

No ``from __future__ import annotations``: the component modules are imported as KFP
compiles them, and nothing here defines components.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from kfp import dsl

from _dataset_factory import pattern_image
from components.check_retrain.component import check_retrain
from components.deploy.component import deploy
from components.evaluate.component import evaluate
from components.ingest.component import ingest
from components.train.component import train
from components.validate.component import validate
from imgclf.config import RegistryConfig
from imgclf.errors import ConfigError, ValidationFailed
from imgclf.kfp.components import log_scalar_metrics, registry_config, write_data_docs_page
from imgclf.registry import ModelRegistry

CLASSES = ("bar", "column", "diagonal")
VALIDATE_ARGS: dict[str, Any] = {
    "min_width": 8,
    "max_width": 64,
    "min_height": 8,
    "max_height": 64,
    "allowed_modes": ["L", "RGB"],
    "min_images_per_class": 3,
    "min_images_per_split": 6,
    "max_duplicate_fraction": 0.0,
    "max_imbalance_ratio": 10.0,
    "imbalance_blocking": False,
}
REGISTRY_ARGS = {"model_name": "patterns", "registry_alias": "production"}


def _artifact(cls: type, root: Path, task: str, name: str) -> Any:
    """An output artifact as KFP's executor makes one: a URI under the task's folder."""
    (root / task).mkdir(parents=True, exist_ok=True)
    return cls(name=name, uri=str(root / task / name), metadata={})


@dataclasses.dataclass
class Chain:
    """The outputs of ingest -> validate -> train -> evaluate, shared by the tests."""

    root: Path
    registry: str
    dataset: dsl.Dataset
    report: dsl.Artifact
    data_docs: dsl.HTML
    validate_metrics: dsl.Metrics
    trained_model: dsl.Model
    train_metrics: dsl.Metrics
    training_curves: dsl.HTML
    evaluation: dsl.Artifact
    eval_metrics: dsl.Metrics
    confusion: dsl.ClassificationMetrics
    model_card: dsl.Markdown
    misclassified: dsl.HTML
    evaluate_returned: Any


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    root = tmp_path_factory.mktemp("components")
    rng = np.random.default_rng(5)
    source = root / "raw"
    for index, name in enumerate(CLASSES):
        (source / name).mkdir(parents=True)
        for n in range(20):
            pattern_image(index, 16, rng).save(source / name / f"{n:03d}.png")

    dataset = _artifact(dsl.Dataset, root, "ingest", "dataset")
    ingest.python_func(
        dataset=dataset,
        source=str(source),
        image_size=32,
        split_train=0.6,
        split_val=0.2,
        split_test=0.2,
        split_seed=1,
        image_format="png",
    )
    report = _artifact(dsl.Artifact, root, "validate", "report")
    data_docs = _artifact(dsl.HTML, root, "validate", "data_docs")
    validate_metrics = _artifact(dsl.Metrics, root, "validate", "metrics")
    validate.python_func(
        dataset=dataset,
        report=report,
        data_docs=data_docs,
        metrics=validate_metrics,
        **VALIDATE_ARGS,
    )
    trained_model = _artifact(dsl.Model, root, "train", "trained_model")
    train_metrics = _artifact(dsl.Metrics, root, "train", "metrics")
    training_curves = _artifact(dsl.HTML, root, "train", "training_curves")
    train.python_func(
        dataset=dataset,
        trained_model=trained_model,
        metrics=train_metrics,
        training_curves=training_curves,
        model="simple_cnn",
        pretrained="none",
        freeze_backbone=False,
        freeze_epochs=1,
        train_image_size=16,
        augment="none",
        epochs=2,
        min_steps=0,
        batch_size=8,
        optimizer="adamw",
        lr="auto",
        backbone_lr="auto",
        weight_decay=0.0,
        scheduler="onecycle",
        patience=0,
        train_seed=3,
        device="cpu",
        num_workers="0",
        threads=1,
        max_steps_per_epoch=3,
        checkpoint_root=str(root / "checkpoints"),
        checkpoint_every_steps=2,
        checkpoint_min_interval_s=0.0,
        keep_checkpoints=2,
        run_id="run-1",
        nproc_per_node=1,
    )
    registry = str(root / "registry")
    evaluation = _artifact(dsl.Artifact, root, "evaluate", "evaluation")
    eval_metrics = _artifact(dsl.Metrics, root, "evaluate", "metrics")
    confusion = _artifact(dsl.ClassificationMetrics, root, "evaluate", "confusion_matrix")
    model_card = _artifact(dsl.Markdown, root, "evaluate", "model_card")
    misclassified = _artifact(dsl.HTML, root, "evaluate", "misclassified")
    returned = evaluate.python_func(
        dataset=dataset,
        trained_model=trained_model,
        evaluation=evaluation,
        metrics=eval_metrics,
        confusion_matrix=confusion,
        model_card=model_card,
        misclassified=misclassified,
        min_accuracy=0.0,
        max_regression=1.0,
        top_k=2,
        eval_batch_size=16,
        registry_uri=registry,
        **REGISTRY_ARGS,
    )
    return Chain(
        root,
        registry,
        dataset,
        report,
        data_docs,
        validate_metrics,
        trained_model,
        train_metrics,
        training_curves,
        evaluation,
        eval_metrics,
        confusion,
        model_card,
        misclassified,
        returned,
    )


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def test_ingest_publishes_the_dataset_and_its_hash(chain: Chain) -> None:
    summary = _json(Path(chain.dataset.path) / "dataset.json")
    assert summary["classes"] == list(CLASSES)
    meta = chain.dataset.metadata
    assert meta["hash"] == summary["hash"]
    assert meta["classes"] == list(CLASSES)
    assert meta["num_images"] == 3 * 20 and meta["num_errors"] == 0
    assert meta["counts"] == summary["counts"]
    assert (Path(chain.dataset.path) / "manifest.csv").is_file()


def test_validate_writes_report_docs_and_metrics(chain: Chain) -> None:
    report = _json(Path(chain.report.path) / "report.json")
    assert report["blocking_success"] is True
    assert chain.report.metadata["blocking_success"] is True
    assert chain.report.metadata["failed"] == [
        e["name"] for e in report["expectations"] if not e["success"]
    ]
    page = Path(chain.data_docs.path).read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.count("<iframe srcdoc=") >= 1
    assert chain.validate_metrics.metadata["num_images"] == 60


def test_validate_fails_the_task_on_a_blocking_expectation(chain: Chain, tmp_path: Path) -> None:
    report = _artifact(dsl.Artifact, tmp_path, "validate", "report")
    args = {**VALIDATE_ARGS, "min_images_per_class": 100}
    with pytest.raises(ValidationFailed):
        validate.python_func(
            dataset=chain.dataset,
            report=report,
            data_docs=_artifact(dsl.HTML, tmp_path, "validate", "data_docs"),
            metrics=_artifact(dsl.Metrics, tmp_path, "validate", "metrics"),
            **args,
        )
    # The step writes its report before failing, so the UI can show why.
    assert _json(Path(report.path) / "report.json")["blocking_success"] is False


def test_train_publishes_the_model_dir_and_metrics(chain: Chain) -> None:
    model_dir = Path(chain.trained_model.path)
    for name in ("model.safetensors", "model.pt2", "model.json", "history.csv", "lr_find.png"):
        assert (model_dir / name).is_file(), name
    meta = chain.trained_model.metadata
    assert meta["framework"] == "pytorch" and meta["architecture"] == "simple_cnn"
    assert meta["classes"] == list(CLASSES)
    assert meta["dataset_hash"] == chain.dataset.metadata["hash"]
    assert meta["input_size"] == _json(model_dir / "model.json")["input_size"]
    assert chain.train_metrics.metadata["epochs_run"] == 2
    chosen = _json(model_dir / "model.json")["training"]
    assert chosen["lr_source"] == "auto" and chain.train_metrics.metadata["lr"] == chosen["lr"]
    curves = Path(chain.training_curves.path).read_text(encoding="utf-8")
    assert curves.startswith("<!DOCTYPE html>") and '<img src="data:image/png;base64,' in curves
    # checkpoints were written under checkpoint_root/run_id, and removed once the model was
    assert not any((chain.root / "checkpoints").glob("run-1/*.pt"))


def test_train_refuses_checkpoints_without_a_run_id() -> None:
    from imgclf.kfp.components import checkpoint_location

    assert checkpoint_location("s3://b/ckpt/", "abc-123") == "s3://b/ckpt/abc-123"
    assert checkpoint_location("", "") == ""
    for bad in ("", "{{$.pipeline_job_uuid}}", "../x", "a/b"):
        with pytest.raises(ConfigError, match="run_id"):
            checkpoint_location("s3://b/ckpt", bad)


def test_evaluate_returns_the_gate_and_logs_metrics(chain: Chain) -> None:
    passed, accuracy = chain.evaluate_returned
    metrics = _json(Path(chain.evaluation.path) / "metrics.json")
    assert passed is True and metrics["passed"] is True
    assert accuracy == metrics["accuracy"]
    assert chain.eval_metrics.metadata["accuracy"] == metrics["accuracy"]
    assert chain.eval_metrics.metadata["loss"] == metrics["loss"]
    assert chain.evaluation.metadata["champion"] is None
    matrix = chain.confusion.metadata["confusionMatrix"]
    assert [c["displayName"] for c in matrix["annotationSpecs"]] == list(CLASSES)
    report = _json(Path(chain.evaluation.path) / "report.json")
    assert sum(map(sum, (row["row"] for row in matrix["rows"]))) == report["num_images"]
    card = Path(chain.model_card.path).read_text(encoding="utf-8")
    assert card == (Path(chain.evaluation.path) / "model_card.md").read_text(encoding="utf-8")
    page = Path(chain.misclassified.path).read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "misclassified" in page


def test_check_retrain_then_deploy_then_nothing_to_retrain(chain: Chain, tmp_path: Path) -> None:
    args = {"dataset": chain.dataset, "registry_uri": chain.registry, **REGISTRY_ARGS}
    should, reason = check_retrain.python_func(force=False, **args)
    assert should is True and "training the first model" in reason

    service = _artifact(dsl.Artifact, tmp_path, "deploy", "inference_service")
    smoke = _artifact(dsl.Markdown, tmp_path, "deploy", "smoke_report")
    version, promoted = deploy.python_func(
        dataset=chain.dataset,
        smoke_report=smoke,
        smoke_samples=4,
        smoke_p95_ms=60_000.0,
        canary_percent=0,
        apply_inference_service="false",
        trained_model=chain.trained_model,
        evaluation=chain.evaluation,
        inference_service=service,
        namespace="imgclf",
        service_account="imgclf-kserve",
        serving_image="ghcr.io/imgclf/imgclf:0.1.0",
        storage_uri_prefix="pvc://imgclf-models",
        registry_uri=chain.registry,
        **REGISTRY_ARGS,
    )
    assert (version, promoted) == (1, True)
    assert ModelRegistry.open(chain.registry).alias("patterns", "production") == 1
    manifest = yaml.safe_load(Path(service.path).read_text(encoding="utf-8"))
    assert manifest["kind"] == "InferenceService"
    assert manifest["metadata"]["namespace"] == "imgclf"
    assert "pvc://imgclf-models/" in json.dumps(manifest)
    assert service.metadata["version"] == 1 and service.metadata["promoted"] is True
    report = Path(smoke.path).read_text(encoding="utf-8")
    assert report.startswith("# Smoke test of `patterns`: PASSED")
    assert service.metadata["smoke"]["samples"] == 4

    should, reason = check_retrain.python_func(force=False, **args)
    assert should is False and reason.startswith("nothing to retrain")
    should, reason = check_retrain.python_func(force=True, **args)
    assert should is True and "forced" in reason


def test_log_scalar_metrics_logs_only_numbers_in_key_order(tmp_path: Path) -> None:
    metrics = _artifact(dsl.Metrics, tmp_path, "train", "metrics")
    log_scalar_metrics(
        metrics,
        {
            "val_loss": 0.25,
            "epochs_run": 4,
            "passed": True,
            "champion": None,
            "best_model": "resnet18",
            "per_class": {"bar": 0.5},
        },
    )
    assert list(metrics.metadata.items()) == [("epochs_run", 4), ("val_loss", 0.25)]


def test_registry_config_maps_the_qualified_parameters_to_the_section() -> None:
    registry = registry_config("s3://models/registry", "digits", "production", "deploy")
    assert registry == RegistryConfig(
        uri="s3://models/registry", model_name="digits", alias="production"
    )


def test_registry_config_names_the_component_and_field_of_a_bad_value() -> None:
    with pytest.raises(ConfigError, match=r"component:evaluate\.alias"):
        registry_config("registry", "digits", 1, "evaluate")  # type: ignore[arg-type]


def test_data_docs_page_inlines_every_suite_result(tmp_path: Path) -> None:
    docs = tmp_path / "data_docs"
    for suite, body in (("images", '<p class="x">ok & fine</p>'), ("classes", "<p>2 < 3</p>")):
        result = docs / "validations" / suite / "run-1" / "result.html"
        result.parent.mkdir(parents=True)
        result.write_text(body, encoding="utf-8")
    (docs / "index.html").write_text("<a href='validations/images'>images</a>", encoding="utf-8")
    data_docs = _artifact(dsl.HTML, tmp_path, "validate", "data_docs")

    write_data_docs_page(docs, Path(data_docs.path))

    page = Path(data_docs.path).read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.endswith("</html>\n")
    assert page.index("<h2>classes</h2>") < page.index("<h2>images</h2>")
    assert page.count("<iframe srcdoc=") == 2  # the index, with its dead links, is left out
    assert 'srcdoc="&lt;p class=&quot;x&quot;&gt;ok &amp; fine&lt;/p&gt;"' in page
    assert "index.html" not in page and "href" not in page


def test_data_docs_page_without_results_is_still_a_page(tmp_path: Path) -> None:
    data_docs = _artifact(dsl.HTML, tmp_path, "validate", "data_docs")
    write_data_docs_page(tmp_path / "data_docs", Path(data_docs.path))
    page = Path(data_docs.path).read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<iframe" not in page
