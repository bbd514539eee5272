"""KFP component: decide whether the dataset differs from the production model's."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input

from components._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def check_retrain(
    dataset: Input[Dataset],
    registry_uri: str,
    model_name: str,
    registry_alias: str,
    force: bool,
) -> NamedTuple("RetrainDecision", [("should_retrain", bool), ("reason", str)]):
    """Call ``imgclf.registry.retrain.should_retrain`` so a recurring run skips the GPU when
    the data is what the production model was trained on.

    Args:
        dataset: Validated dataset dir; its ``dataset.json`` hash is compared.
        registry_uri: Model registry location, ``s3://bucket/prefix`` on a cluster.
        model_name: Registry name of the model.
        registry_alias: Alias of the serving version (``production``).
        force: Train even when the dataset is unchanged.

    Returns:
        should_retrain: Whether the train, evaluate and deploy tasks run.
        reason: One line saying why, e.g. which version's dataset is unchanged.
    """
    from pathlib import Path

    from imgclf.kfp.components import registry_config
    from imgclf.registry.retrain import should_retrain

    registry = registry_config(registry_uri, model_name, registry_alias, "check_retrain")
    decision, reason = should_retrain(Path(dataset.path), registry, force)
    print(reason)
    return decision, reason
