"""Render the KServe InferenceService that serves one registry version.

The project serves with a *custom predictor*: our own image runs a model server built on
the ``kserve`` SDK. For a custom container KServe finds the model through the ``STORAGE_URI``
environment variable of the container named ``kserve-container``: the admission webhook
then injects the storage-initializer init container, which downloads that URI (``s3://``,
``gs://``, ``pvc://``, ``https://``, ...) into ``/mnt/models`` and points ``STORAGE_URI`` at
the local copy. So the server is started with ``--model_dir /mnt/models`` and never needs S3
credentials itself; the service account carries them for the initializer.

The server speaks the Open Inference Protocol (v2). A custom predictor declares that with the
``PROTOCOL`` environment variable of its first container: ``protocolVersion`` is a field of
the framework and ``model`` predictor specs only, and the CRD's structural schema has no
such field beside ``containers`` (the API server would prune it, or reject it under strict
field validation). The same server's ``/v2/health/ready`` and ``/v2/health/live`` back the
container's readiness and liveness probes, so Knative routes traffic to a pod only once its
model is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from imgclf.errors import ConfigError

API_VERSION = "serving.kserve.io/v1beta1"
KIND = "InferenceService"
CONTAINER_NAME = "kserve-container"
STORAGE_URI_ENV = "STORAGE_URI"
MODEL_MOUNT = "/mnt/models"
HTTP_PORT = 8080
SERVE_COMMAND = ("imgclf", "serve")
PROTOCOL_ENV = "PROTOCOL"
PROTOCOL_VERSION = "v2"
READY_PATH = "/v2/health/ready"
LIVE_PATH = "/v2/health/live"
# Readiness gates traffic, so it is probed early and often; liveness restarts the pod, so it
# starts late and tolerates a slow answer: loading a model takes a few seconds.
READINESS_PROBE: Mapping[str, int] = {
    "initialDelaySeconds": 5,
    "periodSeconds": 5,
    "timeoutSeconds": 5,
    "failureThreshold": 6,
}
LIVENESS_PROBE: Mapping[str, int] = {
    "initialDelaySeconds": 30,
    "periodSeconds": 15,
    "timeoutSeconds": 5,
    "failureThreshold": 4,
}
LABEL_PREFIX = "imgclf.io"
DEFAULT_RESOURCES: Mapping[str, Mapping[str, str]] = {
    "requests": {"cpu": "100m", "memory": "512Mi"},
    "limits": {"cpu": "1", "memory": "2Gi"},
}

# InferenceService names become Knative service and DNS names: DNS-1035 labels.
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _check(value: str, pattern: re.Pattern[str], what: str, setting: str) -> None:
    if not pattern.match(value or "") or len(value) > 63:
        raise ConfigError(
            f"{setting}: {value!r} is not a valid {what} (lowercase letters, digits and '-', "
            "at most 63 characters)"
        )


def _check_canary(canary_percent: int | None) -> None:
    valid = isinstance(canary_percent, int) and not isinstance(canary_percent, bool)
    if canary_percent is not None and not (valid and 0 <= canary_percent <= 100):
        raise ConfigError(
            f"deploy.canary_percent: {canary_percent!r} is not a whole percentage from 0 to 100"
        )


def _http_probe(path: str, timing: Mapping[str, int]) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": HTTP_PORT, "scheme": "HTTP"}, **timing}


def render_inference_service(
    *,
    name: str,
    namespace: str,
    storage_uri: str,
    service_account: str,
    image: str,
    model_version: int | None = None,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    resources: Mapping[str, Mapping[str, str]] | None = None,
    extra_args: Sequence[str] = (),
    min_replicas: int | None = None,
    canary_percent: int | None = None,
) -> dict[str, Any]:
    """The InferenceService manifest (a plain dict, ready for YAML or the Kubernetes API).

    ``name`` is both the InferenceService name and the model name the server registers
    (``/v1/models/<name>:predict``). ``model_version`` goes into labels on the resource and
    its pods, so ``kubectl get pods -l imgclf.io/model-version=3`` finds what serves it.
    ``canary_percent`` (0-100) sends that share of traffic to the new revision while the
    last ready one keeps the rest; KServe promotes it only when the field is removed or 100.
    """
    _check(name, _DNS1035, "InferenceService name", "registry.model_name")
    _check(namespace, _DNS1123, "namespace", "deploy.namespace")
    _check(service_account, _DNS1123, "service account name", "deploy.service_account")
    if not image:
        raise ConfigError("deploy.image: the serving image must be set")
    if not storage_uri:
        raise ConfigError("storage URI of the model must be set")
    _check_canary(canary_percent)

    common = {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/part-of": "imgclf",
        "app.kubernetes.io/managed-by": "imgclf",
        f"{LABEL_PREFIX}/model-name": name,
    }
    if model_version is not None:
        common[f"{LABEL_PREFIX}/model-version"] = str(int(model_version))
    meta_labels = {**common, **(labels or {})}
    meta_annotations = {f"{LABEL_PREFIX}/storage-uri": storage_uri, **(annotations or {})}

    env = [
        {"name": STORAGE_URI_ENV, "value": storage_uri},
        {"name": PROTOCOL_ENV, "value": PROTOCOL_VERSION},
    ]
    if model_version is not None:
        env.append({"name": "IMGCLF_MODEL_VERSION", "value": str(int(model_version))})
    chosen = resources or DEFAULT_RESOURCES
    container = {
        "name": CONTAINER_NAME,
        "image": image,
        # The image has no ENTRYPOINT (KFP sets each component's command), so the model
        # server is named here; the args are the ones KServe's own predictors take.
        "command": list(SERVE_COMMAND),
        "args": [
            "--model_name",
            name,
            "--model_dir",
            MODEL_MOUNT,
            "--http_port",
            str(HTTP_PORT),
            *extra_args,
        ],
        "env": env,
        "ports": [{"name": "http1", "containerPort": HTTP_PORT, "protocol": "TCP"}],
        "resources": {kind: dict(values) for kind, values in chosen.items()},
        "readinessProbe": _http_probe(READY_PATH, READINESS_PROBE),
        "livenessProbe": _http_probe(LIVE_PATH, LIVENESS_PROBE),
    }
    predictor: dict[str, Any] = {
        "serviceAccountName": service_account,
        "labels": dict(common),
        "containers": [container],
    }
    if min_replicas is not None:
        predictor["minReplicas"] = int(min_replicas)
    if canary_percent is not None:
        predictor["canaryTrafficPercent"] = canary_percent
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": meta_labels,
            "annotations": meta_annotations,
        },
        "spec": {"predictor": predictor},
    }


def dump_yaml(manifest: Mapping[str, Any]) -> str:
    """YAML for ``kubectl apply -f`` (key order kept as rendered, block style)."""
    return yaml.safe_dump(dict(manifest), sort_keys=False, default_flow_style=False)
