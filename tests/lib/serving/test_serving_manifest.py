"""The rendered InferenceService validates against KServe's own CRD schema."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from _k8s_schema import SHARED_ENV, schema_path, validate_custom_resource
from imgclf.errors import ConfigError
from imgclf.serving import manifest as kserve

CRD_FILE = "kserve.serving.kserve.io_inferenceservices.yaml"


@pytest.fixture(scope="module")
def isvc_crd() -> Path:
    path = schema_path(CRD_FILE)
    if not path.is_file():
        pytest.fail(f"{path} not found: put the shared folder beside the repo or set {SHARED_ENV}")
    return path


def _render(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "name": "digits",
        "namespace": "imgclf",
        "storage_uri": "s3://models/reg/models/digits/3/model",
        "service_account": "imgclf-kserve",
        "image": "ghcr.io/imgclf/imgclf:0.1.0",
        "model_version": 3,
    }
    args.update(overrides)
    return kserve.render_inference_service(**args)


def test_manifest_validates_against_the_crd(isvc_crd: Path) -> None:
    manifest = _render(annotations={"imgclf.io/model-sha256": "ab" * 32}, min_replicas=1)
    validate_custom_resource(manifest, isvc_crd)
    # What kubectl applies is the YAML text: it must round-trip and validate too.
    reloaded = yaml.safe_load(kserve.dump_yaml(manifest))
    assert reloaded == manifest
    validate_custom_resource(reloaded, isvc_crd)


def test_custom_predictor_wiring() -> None:
    manifest = _render()
    assert (manifest["apiVersion"], manifest["kind"]) == (
        "serving.kserve.io/v1beta1",
        "InferenceService",
    )
    predictor = manifest["spec"]["predictor"]
    assert predictor["serviceAccountName"] == "imgclf-kserve"
    (container,) = predictor["containers"]
    # KServe reads the model location of a custom predictor from STORAGE_URI on the
    # container named kserve-container; that is what injects the storage initializer.
    assert container["name"] == "kserve-container"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["STORAGE_URI"] == "s3://models/reg/models/digits/3/model"
    args = container["args"]
    assert args[args.index("--model_name") + 1] == "digits"
    assert args[args.index("--model_dir") + 1] == "/mnt/models"
    assert container["ports"][0]["containerPort"] == 8080
    assert set(container["resources"]) == {"requests", "limits"}
    assert manifest["metadata"]["labels"]["imgclf.io/model-version"] == "3"
    assert predictor["labels"]["imgclf.io/model-version"] == "3"
    assert manifest["metadata"]["namespace"] == "imgclf"


@pytest.mark.parametrize(
    ("field", "value", "setting"),
    [
        ("name", "Digits", "registry.model_name"),
        ("name", "9digits", "registry.model_name"),
        ("namespace", "Bad_NS", "deploy.namespace"),
        ("service_account", "", "deploy.service_account"),
        ("image", "", "deploy.image"),
    ],
)
def test_bad_settings_are_named(field: str, value: str, setting: str) -> None:
    with pytest.raises(ConfigError, match=setting):
        _render(**{field: value})


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m["spec"]["predictor"]["containers"][0].update(storageUri="s3://x"),
        lambda m: m["spec"]["predictor"].update(unknownField=True),
        lambda m: m["metadata"].update(owner="me"),
        lambda m: m["metadata"]["labels"].update({"imgclf.io/model-version": "v 3!"}),
        lambda m: m["spec"]["predictor"]["containers"][0]["resources"]["limits"].update(
            cpu="plenty"
        ),
        lambda m: m["spec"]["predictor"]["containers"][0]["ports"][0].pop("containerPort"),
        lambda m: m.update(apiVersion="serving.kserve.io/v1alpha1"),
    ],
    ids=[
        "unknown-container-field",
        "unknown-predictor-field",
        "unknown-metadata-field",
        "bad-label-value",
        "bad-quantity",
        "missing-required",
        "unserved-version",
    ],
)
def test_schema_helper_rejects_invalid_manifests(isvc_crd: Path, mutate: Any) -> None:
    manifest = copy.deepcopy(_render())
    mutate(manifest)
    with pytest.raises(jsonschema.ValidationError):
        validate_custom_resource(manifest, isvc_crd)
