"""KFP component: run the Great Expectations suite over a dataset; fail on blocking checks."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output

from components._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate(
    dataset: Input[Dataset],
    report: Output[Artifact],
    data_docs: Output[HTML],
    metrics: Output[Metrics],
    min_width: int,
    max_width: int,
    min_height: int,
    max_height: int,
    allowed_modes: list,
    min_images_per_class: int,
    min_images_per_split: int,
    max_duplicate_fraction: float,
    max_imbalance_ratio: float,
    imbalance_blocking: bool,
):
    """Run ``imgclf.steps.validate``; the task fails (and the run stops) when a blocking
    expectation fails, so no model is ever trained on data that broke the contract.

    Args:
        dataset: Dataset dir written by the ingest component.
        report: Output validation dir: ``report.json`` (every expectation, offending files),
            ``metrics.json`` and the full Great Expectations Data Docs site.
        data_docs: Output single HTML page with every suite's Data Docs validation result
            inlined, for the KFP UI's viewer.
        metrics: Output scalar metrics of the validation (``num_images``, ``num_failed``, ...).
        min_width: Smallest image width in pixels accepted.
        max_width: Largest image width in pixels accepted.
        min_height: Smallest image height in pixels accepted.
        max_height: Largest image height in pixels accepted.
        allowed_modes: PIL image modes accepted, e.g. ``["L", "RGB"]``.
        min_images_per_class: Fewest images of each class required in every split.
        min_images_per_split: Fewest images required in each split.
        max_duplicate_fraction: Largest fraction of exact duplicate images accepted.
        max_imbalance_ratio: Largest ratio of the biggest to the smallest train class.
        imbalance_blocking: Whether class imbalance fails the run instead of only warning.
    """
    from pathlib import Path

    from imgclf import config
    from imgclf.contracts import METRICS_FILE
    from imgclf.fsutil import read_json
    from imgclf.kfp.components import log_scalar_metrics, write_data_docs_page
    from imgclf.steps import validate as step

    cfg = config.build(
        config.ValidateConfig,
        {
            "min_width": min_width,
            "max_width": max_width,
            "min_height": min_height,
            "max_height": max_height,
            "allowed_modes": list(allowed_modes),
            "min_images_per_class": min_images_per_class,
            "min_images_per_split": min_images_per_split,
            "max_duplicate_fraction": max_duplicate_fraction,
            "max_imbalance_ratio": max_imbalance_ratio,
            "imbalance_blocking": imbalance_blocking,
        },
        "component:validate",
    )
    out_dir = Path(report.path)
    result = step.run(cfg, dataset_dir=Path(dataset.path), out_dir=out_dir)

    expectations = result["expectations"]
    report.metadata.update(
        {
            "success": result["success"],
            "blocking_success": result["blocking_success"],
            "failed": [e["name"] for e in expectations if not e["success"]],
        }
    )
    log_scalar_metrics(metrics, read_json(out_dir / METRICS_FILE))
    write_data_docs_page(out_dir / step.DOCS_DIR, Path(data_docs.path))
