"""What the KFP components in ``components/<step>/`` share, kept here so it is written once.

The components are thin adapters (KFP artifacts and parameters in, a library call, typed
outputs back); the few adapter chores that several of them repeat live in this module. It
is imported inside the component functions, in the pipeline's image, so compiling a pipeline
still needs only ``kfp``; ``kfp`` itself is only needed for type checking here.
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgclf import config
from imgclf.errors import ConfigError

if TYPE_CHECKING:
    from kfp import dsl


def log_scalar_metrics(metrics: dsl.Metrics, values: Mapping[str, Any]) -> None:
    """Log every number in ``values`` on ``metrics``, in key order.

    KFP's Metrics artifact holds scalars only; booleans are left out although Python counts
    them as ints, because the UI would chart ``passed`` as 0/1 beside the accuracies, and
    None, strings and nested records (per-class tables) are left out too.
    """
    for key, value in sorted(values.items()):
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics.log_metric(key, value)


def checkpoint_location(checkpoint_root: str, run_id: str) -> str:
    """This run's checkpoint folder: ``checkpoint_root/run_id``, or "" (off) without a root.

    The KFP run id is what a retried task has in common with its first attempt (the task's
    own id changes), so it is what lets the retry find the checkpoints.
    """
    root = checkpoint_root.strip().rstrip("/")
    if not root:
        return ""
    run = run_id.strip()
    if not run or "/" in run or run in (".", "..") or run.startswith("{{"):
        raise ConfigError(
            f"component:train run_id={run_id!r}: not a KFP run id (the pipeline passes "
            "dsl.PIPELINE_JOB_ID_PLACEHOLDER; set checkpoint_root to '' to train without "
            "checkpoints)"
        )
    return f"{root}/{run}"


# Train component inputs named apart from their TrainConfig field (one flat list in the UI).
TRAIN_QUALIFIED = {"train_image_size": "image_size", "train_seed": "seed"}


def train_values(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The ``train`` section from a train component's parameters (its ``locals()``).

    Qualified names map back to their fields, ``checkpoint_root`` and ``run_id`` become
    ``checkpoint_dir`` (:func:`checkpoint_location`), and whatever is not a TrainConfig
    field (artifacts, the job's image, the GPU count) is left out: both train components
    build their config here, so a new train setting is wired once.
    """
    fields = {f.name for f in dataclasses.fields(config.TrainConfig)}
    values = {TRAIN_QUALIFIED.get(name, name): value for name, value in inputs.items()}
    values = {name: value for name, value in values.items() if name in fields}
    if "checkpoint_root" in inputs:
        values["checkpoint_dir"] = checkpoint_location(
            str(inputs["checkpoint_root"]), str(inputs.get("run_id", ""))
        )
    return values


def publish_training(
    trained_model: dsl.Model, metrics: dsl.Metrics, summary: Mapping[str, Any]
) -> None:
    """What a train component shows in the UI: the Model artifact's metadata (from
    ``model.json``, ``summary``) and the best validation metrics with the chosen lr."""
    trained_model.metadata.update(
        {
            "framework": "pytorch",
            "architecture": summary["architecture"],
            "classes": summary["classes"],
            "input_size": summary["input_size"],
            "dataset_hash": summary["dataset_hash"],
            "torch_version": summary["torch_version"],
        }
    )
    log_scalar_metrics(metrics, {**summary["metrics"], "lr": summary["training"]["lr"]})


def registry_config(
    registry_uri: str, model_name: str, registry_alias: str, component: str
) -> config.RegistryConfig:
    """The ``registry`` section from the pipeline's parameters, validated like params.yaml.

    In the pipeline's one flat list of run parameters, ``uri`` and ``alias`` alone would not
    say what they address, so the pipeline and the components call them ``registry_uri`` and
    ``registry_alias``; this is the one place they map back to the section's fields.
    ``component`` names the caller in a ConfigError.
    """
    return config.build(
        config.RegistryConfig,
        {"uri": registry_uri, "model_name": model_name, "alias": registry_alias},
        f"component:{component}",
    )


def write_data_docs_page(docs_dir: Path, page: Path) -> None:
    """Write one self-contained HTML page at ``page`` with every Data Docs validation result.

    The KFP UI shows a single HTML file without its neighbours, so the site's index under
    ``docs_dir`` would only offer dead links there: each suite's validation result page
    (``validations/<suite>/.../*.html``) is inlined instead, under its suite's name.
    """
    results = docs_dir / "validations"
    sections = [
        f"<h2>{html.escape(result.relative_to(results).parts[0])}</h2>"
        f'<iframe srcdoc="{html.escape(result.read_text(encoding="utf-8"))}" '
        'style="width:100%;height:80vh;border:0"></iframe>'
        for result in sorted(results.glob("**/*.html"))
    ]
    page.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Data validation</title>"
        f"</head><body>{''.join(sections)}</body></html>\n",
        encoding="utf-8",
    )
