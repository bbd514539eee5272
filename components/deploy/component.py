"""KFP component: smoke-test the passed model on the real server, publish it, move the
production alias (or start a canary), render the InferenceService and apply it in-cluster."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Model, Output

from components._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def deploy(
    dataset: Input[Dataset],
    trained_model: Input[Model],
    evaluation: Input[Artifact],
    inference_service: Output[Artifact],
    smoke_report: Output[Markdown],
    namespace: str,
    service_account: str,
    serving_image: str,
    storage_uri_prefix: str,
    registry_uri: str,
    model_name: str,
    registry_alias: str,
    smoke_samples: int,
    smoke_p95_ms: float,
    canary_percent: int,
    apply_inference_service: str,
) -> NamedTuple("DeployOutputs", [("version", int), ("promoted", bool)]):
    """Run ``imgclf.steps.deploy`` and hand back the InferenceService to apply.

    Args:
        dataset: Dataset dir written by the ingest component (the smoke test sends its test
            images to the server).
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
        smoke_report: Output Markdown page of the smoke test (``smoke.md``), shown in the UI.
        smoke_samples: Test images the smoke test sends to the server (0 skips it).
        smoke_p95_ms: Highest acceptable p95 latency of the smoke test, in ms.
        canary_percent: Share of traffic a new version takes first while another serves
            (0: all at once); ``imgclf registry promote --finish`` completes it.
        apply_inference_service: ``auto`` (apply when the pod has a service account
            token, as in a cluster), ``true`` or ``false``: whether to apply the
            InferenceService and wait for Ready.

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
            "smoke_samples": smoke_samples,
            "smoke_p95_ms": smoke_p95_ms,
            "canary_percent": canary_percent,
            "apply": {"true": True, "false": False}.get(
                apply_inference_service.strip().lower(), apply_inference_service
            ),
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
            dataset_dir=Path(dataset.path),
        )
        smoke_md = out_dir / step.SMOKE_REPORT
        Path(smoke_report.path).write_text(
            smoke_md.read_text() if smoke_md.is_file() else "# No smoke test: nothing to promote\n"
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
