"""The rendered InferenceService validates against KServe's own CRD schema, speaks the v2
protocol, probes the model server, and can canary."""

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


def _container(manifest: dict[str, Any]) -> dict[str, Any]:
    (container,) = manifest["spec"]["predictor"]["containers"]
    return container


@pytest.mark.parametrize("canary", [None, 0, 10, 100])
def test_v2_manifest_validates_against_the_crd(isvc_crd: Path, canary: int | None) -> None:
    manifest = _render(canary_percent=canary, min_replicas=1)
    validate_custom_resource(manifest, isvc_crd)
    reloaded = yaml.safe_load(kserve.dump_yaml(manifest))
    assert reloaded == manifest
    validate_custom_resource(reloaded, isvc_crd)


def test_custom_predictor_declares_protocol_v2_where_kserve_reads_it(isvc_crd: Path) -> None:
    manifest = _render()
    env = {e["name"]: e["value"] for e in _container(manifest)["env"]}
    assert env["PROTOCOL"] == "v2"
    # protocolVersion belongs to the model/framework specs: beside containers the CRD has no
    # such field, so it would be pruned (or rejected under strict validation).
    manifest["spec"]["predictor"]["protocolVersion"] = "v2"
    with pytest.raises(jsonschema.ValidationError, match="protocolVersion"):
        validate_custom_resource(manifest, isvc_crd)


def test_probes_hit_the_v2_health_endpoints_of_the_served_port() -> None:
    container = _container(_render())
    ready, live = container["readinessProbe"], container["livenessProbe"]
    assert ready["httpGet"]["path"] == "/v2/health/ready"
    assert live["httpGet"]["path"] == "/v2/health/live"
    # Knative accepts a probe port only when it is the container's serving port.
    (port,) = container["ports"]
    assert ready["httpGet"]["port"] == live["httpGet"]["port"] == port["containerPort"] == 8080
    for probe in (ready, live):
        assert probe["periodSeconds"] > 0 and probe["failureThreshold"] >= 3
    # A pod loading its model is not ready yet, but must not be restarted for it either.
    assert live["initialDelaySeconds"] > ready["initialDelaySeconds"] >= 1
    grace = live["initialDelaySeconds"] + live["periodSeconds"] * live["failureThreshold"]
    assert grace >= 60


def test_canary_percent_sets_the_traffic_split() -> None:
    assert "canaryTrafficPercent" not in _render()["spec"]["predictor"]
    assert _render(canary_percent=25)["spec"]["predictor"]["canaryTrafficPercent"] == 25


@pytest.mark.parametrize("bad", [-1, 101, 12.5, True, "10"])
def test_bad_canary_percent_names_the_setting(bad: Any) -> None:
    with pytest.raises(ConfigError, match=r"deploy\.canary_percent"):
        _render(canary_percent=bad)


def test_earlier_callers_get_the_same_manifest_plus_the_v2_fields() -> None:
    manifest = _render()
    container = _container(manifest)
    assert container["args"][:2] == ["--model_name", "digits"]
    assert [e["name"] for e in container["env"]] == [
        "STORAGE_URI",
        "PROTOCOL",
        "IMGCLF_MODEL_VERSION",
    ]
    assert set(manifest["spec"]["predictor"]) == {"serviceAccountName", "labels", "containers"}
