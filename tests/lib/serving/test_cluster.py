"""Applying the InferenceService with the real ``kubernetes`` client, over real HTTP.

The API server is ``tests/k8s_api_double.py`` on 127.0.0.1; the client, its kubeconfig
loading, its serialisation and its error handling are the real ones. Time is injected
(``FakeClock``) so no assertion depends on how fast this machine is.
"""

from __future__ import annotations

import copy
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from imgclf.errors import DeployError
from imgclf.serving import cluster
from imgclf.serving import manifest as kserve
from k8s_api_double import FakeClock, K8sApiDouble, hide_cluster_credentials, write_kubeconfig

TOKEN = "s3cr3t-bearer-token"
NAMESPACE, NAME = "imgclf", "digits"


def _manifest(version: int = 3, **overrides: Any) -> dict[str, Any]:
    return kserve.render_inference_service(
        name=NAME,
        namespace=NAMESPACE,
        storage_uri=f"s3://models/reg/models/digits/{version}/model",
        service_account="imgclf-kserve",
        image="ghcr.io/imgclf/imgclf:0.1.0",
        model_version=version,
        **overrides,
    )


@pytest.fixture(autouse=True)
def _no_in_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """This machine may run in a pod: hide its service account from every test."""
    hide_cluster_credentials(monkeypatch, tmp_path, home=False)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _client(double: K8sApiDouble, tmp_path: Path, token: str = TOKEN) -> Any:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", double.url, token=token)
    return cluster.api_client(str(kubeconfig))


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[K8sApiDouble, Any]]:
    """A ``ready`` double and a client for it; tests switch ``double.mode`` as needed."""
    with K8sApiDouble(token=TOKEN) as double:
        client = _client(double, tmp_path)
        yield double, client
        client.close()


def _apply(client: Any, clock: FakeClock, manifest: dict[str, Any], **kw: Any) -> Any:
    kw.setdefault("timeout_s", 60)
    kw.setdefault("poll_s", 2)
    return cluster.apply_and_wait(manifest, client=client, clock=clock, sleep=clock.sleep, **kw)


def _calls(double: K8sApiDouble) -> list[str]:
    return [f"{r.method} {r.path.rsplit('/', 1)[-1]}" for r in double.requests]


# apply ---------------------------------------------------------------------------------


def test_creates_when_absent_and_waits_for_ready(api: Any, clock: FakeClock) -> None:
    double, client = api
    manifest = _manifest()
    result = _apply(client, clock, manifest)
    assert result == cluster.ApplyResult(
        action="created",
        name=NAME,
        namespace=NAMESPACE,
        generation=1,
        waited_s=0.0,
        previous=None,
    )
    assert _calls(double) == [f"GET {NAME}", "POST inferenceservices", f"GET {NAME}"]
    (post,) = double.find("POST", double.path(NAMESPACE))
    assert post.json == manifest
    assert all(r.authorized for r in double.requests)
    assert {r.headers["Authorization"] for r in double.requests} == {"Bearer <redacted>"}
    assert double.objects[NAMESPACE, NAME]["spec"] == manifest["spec"]


def test_replaces_existing_and_ignores_the_stale_ready(api: Any, clock: FakeClock) -> None:
    double, client = api
    old = _manifest(3)
    old["metadata"]["finalizers"] = ["inferenceservice.finalizers"]
    seeded = double.seed(old)
    double.ready_after_polls = 3  # the first two GETs still show Ready=True of generation 1
    new = _manifest(4, canary_percent=10)
    result = _apply(client, clock, new)
    assert (result.action, result.generation) == ("patched", 2)
    assert result.previous == old["spec"]
    assert clock.sleeps == [2, 2]  # three polls: two stale answers were not taken as Ready
    assert result.waited_s == 4
    (put,) = double.find("PUT", double.path(NAMESPACE, NAME))
    assert put.json["metadata"]["resourceVersion"] == seeded["metadata"]["resourceVersion"]
    assert put.json["spec"] == new["spec"]
    # A replace keeps what others own in metadata (KServe's finalizer) ...
    assert put.json["metadata"]["finalizers"] == ["inferenceservice.finalizers"]
    # ... and the labels say which version serves now.
    stored = double.objects[NAMESPACE, NAME]
    assert stored["metadata"]["labels"]["imgclf.io/model-version"] == "4"
    assert stored["spec"]["predictor"]["canaryTrafficPercent"] == 10


def test_same_spec_is_not_written_again(api: Any, clock: FakeClock) -> None:
    double, client = api
    manifest = _manifest()
    double.seed(manifest)
    result = _apply(client, clock, manifest)
    assert (result.action, result.generation, result.previous) == (
        "unchanged",
        1,
        manifest["spec"],
    )
    assert not double.find("PUT") and not double.find("POST")


def test_conflict_is_retried_on_a_fresh_read(api: Any, clock: FakeClock) -> None:
    double, client = api
    double.seed(_manifest(3))
    double.conflicts_left = 1  # what mode="conflict_once" does
    result = _apply(client, clock, _manifest(4))
    assert result.action == "patched"
    assert _calls(double) == [f"GET {NAME}", f"PUT {NAME}"] * 2 + [f"GET {NAME}"]
    assert double.conflicts_left == 0


def test_conflict_once_mode(tmp_path: Path, clock: FakeClock) -> None:
    with K8sApiDouble(token=TOKEN, mode="conflict_once") as double:
        double.seed(_manifest(3))
        result = _apply(_client(double, tmp_path), clock, _manifest(4))
    assert result.action == "patched"
    assert len(double.find("PUT")) == 2


def test_endless_conflicts_give_up_without_touching_the_object(api: Any, clock: FakeClock) -> None:
    double, client = api
    seeded = double.seed(_manifest(3))
    double.conflicts_left = 100
    with pytest.raises(DeployError, match=r"409 Conflict 4 times"):
        _apply(client, clock, _manifest(4))
    assert len(double.find("PUT")) == 1 + cluster.CONFLICT_RETRIES
    assert double.objects[NAMESPACE, NAME] == seeded


# failure and restore -------------------------------------------------------------------


def test_never_ready_restores_the_previous_spec(api: Any, clock: FakeClock) -> None:
    double, client = api
    old = _manifest(3)
    double.seed(old)
    double.mode = "never"
    with pytest.raises(DeployError) as caught:
        _apply(client, clock, _manifest(4), timeout_s=10, poll_s=3)
    message = str(caught.value)
    assert "InferenceService imgclf/digits" in message
    assert "within 10 s" in message
    assert "Ready=False reason RevisionMissing" in message
    assert message.endswith("restored previous spec")
    assert clock.sleeps == [3, 3, 3, 1]  # the last sleep stops at the deadline
    first, restore = double.find("PUT", double.path(NAMESPACE, NAME))
    assert first.json["spec"] == _manifest(4)["spec"]
    assert restore.json["spec"] == old["spec"]
    # The restoring PUT carries the version read just before it, not the one of the deploy.
    assert int(restore.json["metadata"]["resourceVersion"]) > int(
        first.json["metadata"]["resourceVersion"]
    )
    stored = double.objects[NAMESPACE, NAME]
    assert stored["spec"] == old["spec"]
    assert stored["metadata"]["labels"]["imgclf.io/model-version"] == "3"
    assert not double.find("DELETE")


def test_never_ready_deletes_what_it_created(api: Any, clock: FakeClock) -> None:
    double, client = api
    double.mode = "never"
    with pytest.raises(DeployError, match=r"RevisionMissing.*deleted"):
        _apply(client, clock, _manifest(), timeout_s=5, poll_s=2)
    assert [r.path for r in double.find("DELETE")] == [double.path(NAMESPACE, NAME)]
    assert not double.objects


def test_terminal_failure_stops_without_waiting_out_the_timeout(api: Any, clock: FakeClock) -> None:
    double, client = api
    double.mode = "failed"
    with pytest.raises(DeployError) as caught:
        _apply(client, clock, _manifest(), timeout_s=300)
    assert "imgclf/digits failed (model BlockedByFailedLoad (ModelLoadFailed: " in str(caught.value)
    assert "deleted" in str(caught.value)
    assert clock.sleeps == []
    assert len(double.find("DELETE")) == 1


def test_unchanged_object_that_is_not_ready_is_left_alone(api: Any, clock: FakeClock) -> None:
    double, client = api
    manifest = _manifest()
    double.seed(manifest, ready=False)
    double.mode = "never"
    with pytest.raises(DeployError, match="nothing to restore"):
        _apply(client, clock, manifest, timeout_s=4)
    assert not double.find("PUT") and not double.find("DELETE")


def test_restore_of_a_deleted_object_creates_it_again(api: Any) -> None:
    double, client = api
    previous = double.seed(_manifest(3))
    double.objects.clear()
    done = cluster.restore(client, namespace=NAMESPACE, name=NAME, previous=previous)
    assert done == "re-created the previous object"
    (post,) = double.find("POST")
    assert "resourceVersion" not in post.json["metadata"]
    assert double.objects[NAMESPACE, NAME]["spec"] == previous["spec"]


def test_secrets_stay_out_of_logs_and_errors(
    api: Any, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    double, client = api
    double.mode = "never"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(DeployError) as caught:
        _apply(client, clock, _manifest(), timeout_s=4)
    assert "waiting for InferenceService imgclf/digits to become Ready (timeout 4 s)" in (
        caplog.text
    )
    assert TOKEN not in caplog.text
    assert TOKEN not in str(caught.value)
    assert all(TOKEN not in json.dumps(r.headers) for r in double.requests)


def test_a_rejected_token_is_a_deploy_error(tmp_path: Path, clock: FakeClock) -> None:
    with K8sApiDouble(token=TOKEN) as double:
        client = _client(double, tmp_path, token="wrong-token")
        with pytest.raises(DeployError, match=r"cannot apply .* 401 Unauthorized") as caught:
            _apply(client, clock, _manifest())
    assert "wrong-token" not in str(caught.value)
    assert not double.objects


def test_manifest_must_be_an_inference_service(api: Any, clock: FakeClock) -> None:
    double, client = api
    bad = copy.deepcopy(_manifest())
    bad["kind"] = "Deployment"
    with pytest.raises(DeployError, match="InferenceService"):
        _apply(client, clock, bad)
    assert not double.requests


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ({"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "True"}]}, "pending"),
        (
            {
                "observedGeneration": 1,
                "conditions": [{"type": "Ready", "status": "False", "reason": "RevisionFailed"}],
            },
            "pending",
        ),
        ({"observedGeneration": 2, "conditions": [{"type": "Ready", "status": "True"}]}, "ready"),
        ({"conditions": [{"type": "Ready", "status": "True"}]}, "ready"),
        ({"conditions": [{"type": "Ready", "status": "Unknown"}]}, "pending"),
        (
            {"conditions": [{"type": "Ready", "status": "False", "reason": "RevisionMissing"}]},
            "pending",
        ),
        (
            {
                "conditions": [
                    {"type": "PredictorReady", "status": "False", "reason": "ContainerMissing"},
                    {"type": "Ready", "status": "False", "reason": "PredictorNotReady"},
                ]
            },
            "failed",
        ),
        ({"modelStatus": {"transitionStatus": "InvalidSpec"}}, "failed"),
        ({}, "pending"),
    ],
    ids=[
        "stale-ready",
        "stale-failure",
        "ready",
        "ready-without-observed-generation",
        "unknown",
        "rolling-out",
        "predictor-failed",
        "invalid-spec",
        "no-status",
    ],
)
def test_readiness_judges_only_the_applied_generation(
    status: dict[str, Any], expected: str
) -> None:
    state, _ = cluster.readiness({"status": status}, generation=2)
    assert state == expected


# credentials ---------------------------------------------------------------------------


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    return home


def _service_account(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, token: bool) -> Path:
    folder = tmp_path / "serviceaccount"
    folder.mkdir()
    (folder / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    if token:
        (folder / "token").write_text("pod-token")
    monkeypatch.setattr(cluster, "SERVICE_ACCOUNT_DIR", folder)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    return folder


def test_nothing_configured(home: Path) -> None:
    assert not cluster.cluster_configured()
    with pytest.raises(DeployError, match=str(home / ".kube" / "config")):
        cluster.api_client()


def test_default_kubeconfig_in_home(home: Path) -> None:
    write_kubeconfig(home / ".kube" / "config", "http://127.0.0.1:1", token=TOKEN)
    assert cluster.cluster_configured()
    client = cluster.api_client()
    assert client.configuration.host == "http://127.0.0.1:1"


def test_kubeconfig_env_uses_its_first_path(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    write_kubeconfig(second, "http://127.0.0.1:2")
    monkeypatch.setenv("KUBECONFIG", f"{first}:{second}")
    assert not cluster.cluster_configured()
    write_kubeconfig(first, "http://127.0.0.1:1")
    assert cluster.cluster_configured()
    assert cluster.api_client().configuration.host == "http://127.0.0.1:1"


def test_explicit_kubeconfig(home: Path, tmp_path: Path) -> None:
    path = tmp_path / "cfg"
    assert not cluster.cluster_configured(str(path))
    write_kubeconfig(path, "http://127.0.0.1:3")
    assert cluster.cluster_configured(str(path))


def test_in_cluster_credentials(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _service_account(monkeypatch, tmp_path, token=True)
    assert cluster.cluster_configured()
    client = cluster.api_client()
    assert client.configuration.host == "https://10.96.0.1:443"
    assert client.configuration.api_key["authorization"].lower() == "bearer pod-token"
    # A kubeconfig named explicitly still wins over the pod's own account.
    path = write_kubeconfig(tmp_path / "cfg", "http://127.0.0.1:4")
    assert cluster.api_client(str(path)).configuration.host == "http://127.0.0.1:4"


def test_service_host_without_token_is_not_in_cluster(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _service_account(monkeypatch, tmp_path, token=False)
    assert not cluster.cluster_configured()


@pytest.mark.parametrize(
    "text",
    [f"users: [{{user: {{token: {TOKEN}}}}}\n  bad: [", f"users:\n- user: {{token: {TOKEN}}}\n"],
    ids=["not-yaml", "no-context"],
)
def test_unusable_kubeconfig_is_named_without_its_secrets(home: Path, text: str) -> None:
    path = home / ".kube" / "config"
    path.parent.mkdir()
    path.write_text(text)
    with pytest.raises(DeployError, match=str(path)) as caught:
        cluster.api_client()
    assert TOKEN not in str(caught.value)


# the double itself ---------------------------------------------------------------------


def test_double_speaks_like_an_api_server(api: Any) -> None:
    double, client = api
    objects = kubernetes.client.CustomObjectsApi(client)
    args = ("serving.kserve.io", "v1beta1", NAMESPACE, "inferenceservices")
    created = objects.create_namespaced_custom_object(*args, _manifest())
    assert created["metadata"]["generation"] == 1 and created["metadata"]["uid"]
    # A metadata-only merge patch moves resourceVersion, not generation.
    patched = objects.patch_namespaced_custom_object(
        *args, NAME, {"metadata": {"labels": {"team": "vision"}}}
    )
    assert patched["metadata"]["generation"] == 1
    assert patched["metadata"]["labels"]["team"] == "vision"
    assert int(patched["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
    assert double.find("PATCH")[0].headers["Content-Type"] == "application/merge-patch+json"
    stale = {**created, "spec": {"predictor": {"minReplicas": 2}}}
    with pytest.raises(kubernetes.client.ApiException) as conflict:
        objects.replace_namespaced_custom_object(*args, NAME, stale)
    assert (conflict.value.status, json.loads(conflict.value.body)["reason"]) == (409, "Conflict")
    listing = objects.list_namespaced_custom_object(*args)
    assert [o["metadata"]["name"] for o in listing["items"]] == [NAME]
    request = urllib.request.Request(
        f"{double.url}/apis/nothing/here", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(request, timeout=10)
    body = json.loads(missing.value.read())
    assert missing.value.code == 404
    assert (body["kind"], body["apiVersion"], body["status"], body["reason"], body["code"]) == (
        "Status",
        "v1",
        "Failure",
        "NotFound",
        404,
    )
