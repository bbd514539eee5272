"""KFP component: publish the passed model, move the production alias, render KServe YAML."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from components._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def deploy(
    trained_model: Input[Model],
    evaluation: Input[Artifact],
    inference_service: Output[Artifact],
    namespace: str,
    service_account: str,
    serving_image: str,
    storage_uri_prefix: str,
    registry_uri: str,
    model_name: str,
    registry_alias: str,
) -> NamedTuple("DeployOutputs", [("version", int), ("promoted", bool)]):
    """Run ``imgclf.steps.deploy`` and hand back the InferenceService to apply.

    Args:
        trained_model: Model dir written by the train component.
        evaluation: Evaluation dir written by the evaluate component (its ``passed`` flag).
        inference_service: Output KServe InferenceService YAML serving the version the alias
            holds afterwards (``kubectl apply -f`` it); metadata has the ``deploy.json`` fields.
        namespace: Namespace the InferenceService is rendered for.
        service_account: Service account whose secret lets KServe read the registry.
        serving_image: Image of the custom KServe predictor.
        storage_uri_prefix: Storage URI prefix for a registry that is not on S3 (e.g.
            ``pvc://imgclf-models``); empty for an ``s3://`` registry.
        registry_uri: Model registry location, ``s3://bucket/prefix`` on a cluster.
        model_name: Registry name of the model, also the InferenceService name.
        registry_alias: Alias moved to the new version (``production``).

    Returns:
        version: Registry version the alias points to afterwards (0: none).
        promoted: Whether this run's model now holds the alias.
    """
    import shutil
    import tempfile
    from pathlib import Path

    from imgclf import config
    from imgclf.kfp.components import registry_config
    from imgclf.steps import deploy as step

    cfg = config.build(
        config.DeployConfig,
        {
            "namespace": namespace,
            "service_account": service_account,
            "image": serving_image,
            "storage_uri_prefix": storage_uri_prefix,
        },
        "component:deploy",
    )
    registry = registry_config(registry_uri, model_name, registry_alias, "deploy")
    with tempfile.TemporaryDirectory(prefix="imgclf-deploy-") as tmp:
        out_dir = Path(tmp) / "deploy"
        result = step.run(
            cfg,
            registry,
            model_dir=Path(trained_model.path),
            eval_dir=Path(evaluation.path),
            out_dir=out_dir,
        )
        if result["manifest"]:
            shutil.copyfile(out_dir / result["manifest"], inference_service.path)
        else:
            # KFP uploads every declared output; an empty document says "nothing to apply".
            Path(inference_service.path).write_text("# nothing promoted: no manifest\n")
    inference_service.metadata.update(
        {k: v for k, v in result.items() if k != "manifest" and v is not None}
    )
    print(
        f"{model_name} {registry_alias} -> version {result['version']} "
        f"({'promoted' if result['promoted'] else 'not promoted'})"
    )
    return int(result["version"] or 0), bool(result["promoted"])
