"""The kustomize manifests render, validate strictly, and agree with the pipeline and image.

Rendering uses kustomize itself (``kustomize build`` or ``kubectl kustomize``, which embeds
it). Plain Kubernetes objects are validated with ``kubernetes-validate``'s strict schemas,
the InferenceService template against KServe's upstream CRD (``shared/schemas``).
"""

from __future__ import annotations

import base64
import functools
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from _k8s_schema import schema_path, validate_custom_resource
from _repo_copy import REPO
from components import _image
from imgclf.config import DeployConfig, RegistryConfig
from imgclf.kfp.settings import ClusterSettings
from imgclf.serving import manifest as kserve
from imgclf.storage import split_uri
from pipelines.training_pipeline import S3_CONFIG_ENV

K8S = REPO / "k8s"
TARGETS = ("base", "overlays/dev", "overlays/prod")
NAMESPACE = "imgclf"
PLACEHOLDER = "REPLACE_ME"
CLUSTER_SCOPED = {"Namespace"}
ISVC_TEMPLATE = K8S / "templates" / "inferenceservice.yaml"
ISVC_CRD = "kserve.serving.kserve.io_inferenceservices.yaml"


def _kustomize() -> list[str]:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    message = "neither kustomize nor kubectl (which embeds kustomize) is on PATH"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@functools.cache
def _rendered(target: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [*_kustomize(), str(K8S / target)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(target: str) -> list[dict[str, Any]]:
    """The objects ``kustomize build k8s/<target>`` prints (fresh copies)."""
    return yaml.safe_load(yaml.safe_dump(list(_rendered(target))))


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def providers(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The S3 provider default of the kfp-launcher ConfigMap."""
    launcher = find(objects, "ConfigMap", "kfp-launcher")
    return yaml.safe_load(launcher["data"]["providers"])["s3"]["default"]


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {})
    pod = spec.get("template", {}).get("spec", {})
    pod = pod or spec.get("predictor", {})
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


@pytest.mark.parametrize("target", TARGETS)
def test_renders_and_validates_strictly(target: str) -> None:
    objects = render(target)
    assert objects
    version = kubernetes_validate.latest_version()
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]["name"]


def test_strict_validation_rejects_unknown_fields() -> None:
    deployment = find(render("overlays/dev"), "Deployment", "minio")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), True)


def test_only_dev_runs_minio() -> None:
    dev = {(o["kind"], o["metadata"]["name"]) for o in render("overlays/dev")}
    prod = {(o["kind"], o["metadata"]["name"]) for o in render("overlays/prod")}
    minio = {
        ("PersistentVolumeClaim", "minio-data"),
        ("Deployment", "minio"),
        ("Service", "minio"),
        ("Job", "minio-buckets"),
    }
    assert minio <= dev
    assert not minio & prod
    assert dev - minio == prod


@pytest.mark.parametrize("target", ["overlays/dev", "overlays/prod"])
def test_every_reader_sees_the_same_object_store(target: str) -> None:
    objects = render(target)
    pods = urlsplit(find(objects, "ConfigMap", "imgclf-s3")["data"]["MINIO_ENDPOINT"])
    launcher = providers(objects)
    annotations = find(objects, "Secret", "imgclf-minio")["metadata"]["annotations"]
    assert pods.netloc == launcher["endpoint"] == annotations["serving.kserve.io/s3-endpoint"]
    https = pods.scheme == "https"
    assert launcher["disableSSL"] is (not https)
    assert annotations["serving.kserve.io/s3-usehttps"] == ("1" if https else "0")
    region = find(objects, "ConfigMap", "imgclf-s3")["data"]["AWS_REGION"]
    assert launcher["region"] == annotations["serving.kserve.io/s3-region"] == region


def test_dev_endpoint_is_the_in_cluster_minio() -> None:
    objects = render("overlays/dev")
    host, _, port = providers(objects)["endpoint"].partition(":")
    service = find(objects, "Service", host.split(".")[0])
    assert host == f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    selector = service["spec"]["selector"]
    pod_labels = find(objects, "Deployment", "minio")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()


def test_dev_creates_every_bucket_the_pipeline_uses() -> None:
    objects = render("overlays/dev")
    script = " ".join(containers(find(objects, "Job", "minio-buckets"))[0]["args"])
    root = find(objects, "ConfigMap", "kfp-launcher")["data"]["defaultPipelineRoot"]
    for uri in (root, ClusterSettings().registry_uri):
        bucket, _ = split_uri(uri)
        assert re.search(rf"imgclf/{re.escape(bucket)}\b", script), bucket


@pytest.mark.parametrize("target", TARGETS)
def test_credentials_resolve_to_the_secret(target: str) -> None:
    objects = render(target)
    cluster = ClusterSettings()
    secret = find(objects, "Secret", cluster.minio_secret)
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    ref = providers(objects)["credentials"]
    assert ref["fromEnv"] is False
    assert ref["secretRef"]["secretName"] == cluster.minio_secret
    assert {ref["secretRef"]["accessKeyKey"], ref["secretRef"]["secretKeyKey"]} <= keys
    assert {cluster.minio_access_key_key, cluster.minio_secret_key_key} <= keys
    s3 = find(objects, "ConfigMap", cluster.s3_config_map)
    assert set(S3_CONFIG_ENV) <= set(s3["data"])
    kserve_sa = find(objects, "ServiceAccount", DeployConfig().service_account)
    assert {"name": cluster.minio_secret} in kserve_sa["secrets"]
    if target == "overlays/dev":
        (minio,) = containers(find(objects, "Deployment", "minio"))
        assert {e["valueFrom"]["secretKeyRef"]["key"] for e in minio["env"]} <= keys


def test_pipeline_service_account_may_read_what_the_launcher_reads() -> None:
    objects = render("base")
    cluster = ClusterSettings()
    rules = find(objects, "Role", "imgclf-pipeline")["rules"]

    def allowed(resource: str, name: str) -> bool:
        return any(
            resource in r["resources"]
            and "get" in r["verbs"]
            and name in r.get("resourceNames", [name])
            for r in rules
        )

    assert allowed("configmaps", "kfp-launcher")
    assert allowed("configmaps", cluster.s3_config_map)
    assert allowed("secrets", cluster.minio_secret)
    # the train task with a job backend: what imgclf.kfp.trainjob calls
    verbs = {(res, verb) for r in rules for res in r["resources"] for verb in r["verbs"]}
    for kind in ("trainjobs", "pytorchjobs"):
        assert {(kind, "create"), (kind, "get")} <= verbs
    assert {("pods", "list"), ("pods/log", "get")} <= verbs
    binding = find(objects, "RoleBinding", "imgclf-pipeline")
    (subject,) = binding["subjects"]
    find(objects, "ServiceAccount", subject["name"])
    assert subject["namespace"] == NAMESPACE


def _yaml_documents() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if isinstance(doc, dict):
                out.append((path, doc))
    return out


def _secret_values(secret: dict[str, Any]) -> dict[str, str]:
    values = dict(secret.get("stringData") or {})
    for key, encoded in (secret.get("data") or {}).items():
        values[key] = base64.b64decode(encoded).decode("utf-8", "replace")
    return values


def test_secrets_hold_only_placeholders() -> None:
    secrets = [(str(p), d) for p, d in _yaml_documents() if d.get("kind") == "Secret"]
    secrets += [(t, o) for t in TARGETS for o in render(t) if o["kind"] == "Secret"]
    assert secrets
    for where, secret in secrets:
        for key, value in _secret_values(secret).items():
            assert value == PLACEHOLDER, f"{where}: {key} holds a value, not {PLACEHOLDER}"
    assert not any(d.get("kind") == "Secret" and "data" in d for _, d in _yaml_documents())


@pytest.mark.parametrize("target", TARGETS)
def test_images_are_pinned(target: str) -> None:
    for obj in render(target):
        for container in containers(obj):
            image = container["image"]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert (tag and tag != "latest") or "@sha256:" in image, image


def test_inference_service_template_is_valid_and_what_deploy_renders() -> None:
    (template,) = [d for d in yaml.safe_load_all(ISVC_TEMPLATE.read_text()) if d]
    validate_custom_resource(template, schema_path(ISVC_CRD))
    predictor = template["spec"]["predictor"]
    (container,) = predictor["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    version = int(template["metadata"]["labels"]["imgclf.io/model-version"])
    registry = RegistryConfig(uri=ClusterSettings().registry_uri)
    expected_uri = f"{registry.uri}/models/{registry.model_name}/{version}/model"
    assert env["STORAGE_URI"] == expected_uri
    deploy = DeployConfig()
    rendered = kserve.render_inference_service(
        name=registry.model_name,
        namespace=deploy.namespace,
        storage_uri=expected_uri,
        service_account=deploy.service_account,
        image=deploy.image,
        model_version=version,
    )
    assert template == rendered
    assert container["image"] == _image.DEFAULT_IMAGE
    base = render("base")
    find(base, "ServiceAccount", predictor["serviceAccountName"])
    find(base, "Namespace", template["metadata"]["namespace"])
    bucket, _ = split_uri(env["STORAGE_URI"])
    script = " ".join(containers(find(render("overlays/dev"), "Job", "minio-buckets"))[0]["args"])
    assert f"imgclf/{bucket}" in script


def test_inference_service_schema_check_can_fail() -> None:
    (template,) = [d for d in yaml.safe_load_all(ISVC_TEMPLATE.read_text()) if d]
    template["spec"]["predictor"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(Exception, match="imagePullPolicyy"):
        validate_custom_resource(template, schema_path(ISVC_CRD))


def _dockerfile() -> list[str]:
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def test_dockerfile_runs_as_non_root_without_entrypoint() -> None:
    lines = _dockerfile()
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] == "1000"
    assert not any(line.startswith(("ENTRYPOINT", "HEALTHCHECK")) for line in lines)
    assert not any(re.search(r"(SECRET|PASSWORD|ACCESS_KEY)", line) for line in lines)


def test_dockerfile_installs_the_pinned_torch_and_every_package() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    pins = {d.split("==")[0]: d for d in pyproject["project"]["dependencies"] if "==" in d}
    text = "\n".join(_dockerfile())
    assert pins["torch"] in text and pins["torchvision"] in text
    copied = set(re.findall(r"^COPY (\S+) ", text, flags=re.MULTILINE))
    for package in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        top = package.rstrip("*")
        source = "src" if (REPO / "src" / top).is_dir() else top
        assert source in copied, f"{top} is not copied into the image"
    assert re.search(r"^RUN pip install \.", text, flags=re.MULTILINE)


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "data", "out", "registry"} <= ignored
