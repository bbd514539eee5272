"""KFP component: evaluate the model on the test split and apply the quality gate."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import (
    HTML,
    Artifact,
    ClassificationMetrics,
    Dataset,
    Input,
    Markdown,
    Metrics,
    Model,
    Output,
)

from components._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    dataset: Input[Dataset],
    trained_model: Input[Model],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    confusion_matrix: Output[ClassificationMetrics],
    model_card: Output[Markdown],
    misclassified: Output[HTML],
    min_accuracy: float,
    max_regression: float,
    top_k: int,
    eval_batch_size: int,
    registry_uri: str,
    model_name: str,
    registry_alias: str,
) -> NamedTuple("EvaluateOutputs", [("passed", bool), ("accuracy", float)]):
    """Run ``imgclf.steps.evaluate``; ``passed`` decides whether the deploy task runs.

    Args:
        dataset: Dataset dir; its test split is evaluated.
        trained_model: Model dir written by the train component.
        evaluation: Output evaluation dir: ``metrics.json``, ``confusion.csv``,
            ``confusion_matrix.json`` and ``model_card.md`` (deploy reads it).
        metrics: Output scalar metrics: accuracy, loss, top-k accuracy, macro F1.
        confusion_matrix: Output confusion matrix on the test split, for the KFP UI.
        model_card: Output model card (Markdown).
        misclassified: Output page with the worst misclassified test images (the wrong
            predictions made with the highest probability), true and predicted labels.
        min_accuracy: Lowest test accuracy a model may have to be deployed.
        max_regression: Largest accuracy drop allowed against the production model.
        top_k: k of the reported top-k accuracy.
        eval_batch_size: Images per evaluation batch.
        registry_uri: Model registry location, where the production champion is read.
        model_name: Registry name of the model.
        registry_alias: Alias of the champion version (``production``).

    Returns:
        passed: Whether the model passed the quality gate.
        accuracy: Test accuracy of the model.
    """
    import shutil
    from pathlib import Path

    from imgclf import config
    from imgclf.fsutil import read_json
    from imgclf.kfp.components import log_scalar_metrics, registry_config
    from imgclf.kfp.report_html import write_misclassified_page
    from imgclf.steps import evaluate as step

    cfg = config.build(
        config.EvaluateConfig,
        {
            "min_accuracy": min_accuracy,
            "max_regression": max_regression,
            "top_k": top_k,
            "batch_size": eval_batch_size,
        },
        "component:evaluate",
    )
    registry = registry_config(registry_uri, model_name, registry_alias, "evaluate")
    out_dir = Path(evaluation.path)
    result = step.run(
        cfg,
        registry,
        dataset_dir=Path(dataset.path),
        model_dir=Path(trained_model.path),
        out_dir=out_dir,
    )

    passed, accuracy = bool(result["passed"]), float(result["accuracy"])
    evaluation.metadata.update(
        {"passed": passed, "reasons": result["reasons"], "champion": result["champion"]}
    )
    log_scalar_metrics(
        metrics,
        {key: result.get(key) for key in ("accuracy", "loss", "top_k_accuracy", "macro_f1")},
    )
    matrix = read_json(out_dir / "confusion_matrix.json")
    confusion_matrix.log_confusion_matrix(matrix["classes"], matrix["matrix"])
    shutil.copyfile(out_dir / "model_card.md", model_card.path)
    write_misclassified_page(out_dir, Path(dataset.path), Path(misclassified.path))
    print(f"accuracy {accuracy:.4f}: {'passed' if passed else 'failed'} the quality gate")
    for reason in result["reasons"]:
        print(f"  {reason}")
    return passed, accuracy
