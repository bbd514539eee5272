"""The deploy step in a cluster: apply the InferenceService, wait for Ready, or roll back.

The API server is ``tests/k8s_api_double.py`` on 127.0.0.1 and the ``kubernetes`` client is
the real one, reached through a kubeconfig file as a user's would be. The models come from
the factory (the server cannot load them), so the smoke test is off: it has its own tests
(tests/lib/serving/test_smoke.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from _model_factory import build_eval_dir, build_model_dir
from imgclf.config import DeployConfig, RegistryConfig
from imgclf.errors import DeployError
from imgclf.fsutil import read_json
from imgclf.registry import ModelRegistry
from imgclf.serving import manifest as kserve
from imgclf.steps import deploy
from k8s_api_double import K8sApiDouble, hide_cluster_credentials, write_kubeconfig

TOKEN = "rollout-bearer-token"
NAME = "digits"
# Ready comes on the first poll in "ready" mode, so this is only a hang guard.
APPLY = DeployConfig(apply=True, smoke_samples=0, ready_timeout_s=60.0)
# "never" mode never becomes Ready: the step gives up after this (no assertion on time).
NEVER_READY = DeployConfig(apply=True, smoke_samples=0, ready_timeout_s=0.5)
NAMESPACE = APPLY.namespace
MODEL_VERSION_LABEL = f"{kserve.LABEL_PREFIX}/model-version"


@pytest.fixture(autouse=True)
def _no_real_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No credentials of this machine (a pod's account, ~/.kube/config) may leak in."""
    hide_cluster_credentials(monkeypatch, tmp_path)


@pytest.fixture
def registry_cfg(tmp_path: Path) -> RegistryConfig:
    return RegistryConfig(uri=str(tmp_path / "registry"), model_name=NAME)


@contextlib.contextmanager
def _cluster(tmp_path: Path, mode: str = "ready") -> Iterator[tuple[K8sApiDouble, str]]:
    """A double in ``mode`` and the path of a kubeconfig that points at it."""
    with K8sApiDouble(token=TOKEN, mode=mode) as double:
        path = write_kubeconfig(tmp_path / f"kubeconfig-{mode}", double.url, token=TOKEN)
        yield double, str(path)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[K8sApiDouble, str]]:
    with _cluster(tmp_path) as pair:
        yield pair


def _deploy(
    tmp_path: Path,
    registry_cfg: RegistryConfig,
    kubeconfig: str | None,
    *,
    seed: int,
    cfg: DeployConfig = APPLY,
) -> dict[str, Any]:
    model_dir = build_model_dir(tmp_path / f"model-{seed}", seed=seed)
    eval_dir = build_eval_dir(tmp_path / f"eval-{seed}", passed=True)
    return deploy.run(
        cfg,
        registry_cfg,
        model_dir=model_dir,
        eval_dir=eval_dir,
        out_dir=tmp_path / "out",
        kubeconfig=kubeconfig,
    )


def _written(tmp_path: Path) -> dict[str, Any]:
    return yaml.safe_load((tmp_path / "out" / deploy.MANIFEST_FILE).read_text())


def _container(manifest: dict[str, Any]) -> dict[str, Any]:
    (container,) = manifest["spec"]["predictor"]["containers"]
    return container


def _env(manifest: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in _container(manifest)["env"]}


def _storage_uri(registry_cfg: RegistryConfig, version: int) -> str:
    return deploy.storage_uri(APPLY, registry_cfg, NAME, version)[0]


def _item(double: K8sApiDouble) -> str:
    return double.path(NAMESPACE, NAME)


# the rollout -----------------------------------------------------------------------------


def test_first_deploy_creates_the_service_and_waits_for_ready(
    tmp_path: Path, registry_cfg: RegistryConfig, api: tuple[K8sApiDouble, str]
) -> None:
    double, kubeconfig = api
    result = _deploy(tmp_path, registry_cfg, kubeconfig, seed=0)

    methods = [(r.method, r.path) for r in double.requests]
    # A read (404), the create, then reads until Ready.
    assert methods[:2] == [("GET", _item(double)), ("POST", double.path(NAMESPACE))]
    assert methods[2:] and all(m == ("GET", _item(double)) for m in methods[2:])
    assert all(r.authorized for r in double.requests)
    (post,) = double.find("POST")
    written = _written(tmp_path)
    assert post.json == written
    assert double.objects[NAMESPACE, NAME]["spec"] == written["spec"]
    assert _env(written)[kserve.PROTOCOL_ENV] == kserve.PROTOCOL_VERSION
    assert _env(written)[kserve.STORAGE_URI_ENV] == _storage_uri(registry_cfg, 1)
    container = _container(written)
    assert container["readinessProbe"]["httpGet"]["path"] == kserve.READY_PATH
    assert container["livenessProbe"]["httpGet"]["path"] == kserve.LIVE_PATH

    saved = read_json(tmp_path / "out" / "deploy.json")
    assert saved == result
    assert saved["applied"]["action"] == "created" and saved["applied"]["ready"] is True
    assert (saved["promoted"], saved["published"], saved["version"]) == (True, True, 1)
    assert ModelRegistry.open(registry_cfg.uri).alias(NAME) == 1


def test_second_model_replaces_the_spec(
    tmp_path: Path, registry_cfg: RegistryConfig, api: tuple[K8sApiDouble, str]
) -> None:
    double, kubeconfig = api
    _deploy(tmp_path, registry_cfg, kubeconfig, seed=0)
    result = _deploy(tmp_path, registry_cfg, kubeconfig, seed=1)

    (put,) = double.find("PUT", _item(double))
    assert put.json["metadata"]["labels"][MODEL_VERSION_LABEL] == "2"
    assert _env(put.json)[kserve.STORAGE_URI_ENV] == _storage_uri(registry_cfg, 2)
    assert put.json["spec"] == _written(tmp_path)["spec"]
    assert result["applied"]["action"] == "patched"
    assert (result["promoted"], result["version"]) == (True, 2)
    stored = double.objects[NAMESPACE, NAME]
    assert stored["metadata"]["labels"][MODEL_VERSION_LABEL] == "2"
    assert ModelRegistry.open(registry_cfg.uri).alias(NAME) == 2


def test_never_ready_restores_spec_and_alias(
    tmp_path: Path, registry_cfg: RegistryConfig, api: tuple[K8sApiDouble, str]
) -> None:
    double, kubeconfig = api
    _deploy(tmp_path, registry_cfg, kubeconfig, seed=0)
    (post,) = double.find("POST")
    reg = ModelRegistry.open(registry_cfg.uri)
    alias_before = reg.alias_doc(NAME)
    double.mode = "never"

    with pytest.raises(DeployError) as caught:
        _deploy(tmp_path, registry_cfg, kubeconfig, seed=1, cfg=NEVER_READY)

    message = str(caught.value)
    assert f"InferenceService {NAMESPACE}/{NAME}" in message
    assert "RevisionMissing" in message and "restored previous spec" in message
    assert reg.alias_doc(NAME) == alias_before
    rollout, restore = double.find("PUT", _item(double))
    assert rollout.json["metadata"]["labels"][MODEL_VERSION_LABEL] == "2"
    assert _env(rollout.json)[kserve.STORAGE_URI_ENV] == _storage_uri(registry_cfg, 2)
    assert restore.json["spec"] == post.json["spec"]
    assert restore.json["metadata"]["labels"][MODEL_VERSION_LABEL] == "1"
    assert double.objects[NAMESPACE, NAME]["spec"] == post.json["spec"]

    saved = read_json(tmp_path / "out" / "deploy.json")
    assert saved["promoted"] is False and saved["canary"] is None
    assert saved["applied"] == {"error": message}
    assert saved["version"] == 1
    assert "rollout failed" in saved["reasons"][-1]


def test_never_ready_leaves_a_manifest_of_what_serves(
    tmp_path: Path, registry_cfg: RegistryConfig, api: tuple[K8sApiDouble, str]
) -> None:
    double, kubeconfig = api
    _deploy(tmp_path, registry_cfg, kubeconfig, seed=0)
    double.mode = "never"
    with pytest.raises(DeployError):
        _deploy(tmp_path, registry_cfg, kubeconfig, seed=1, cfg=NEVER_READY)
    saved = read_json(tmp_path / "out" / "deploy.json")
    # The module docstring: deploy.json's version is "the version the manifest serves", and
    # `kubectl apply -f` on the output "re-asserts what is serving".
    assert saved["storage_uri"] == _storage_uri(registry_cfg, saved["version"])
    assert _written(tmp_path)["metadata"]["labels"][MODEL_VERSION_LABEL] == "1"


def test_never_ready_first_deploy_deletes_what_it_created(
    tmp_path: Path, registry_cfg: RegistryConfig
) -> None:
    with _cluster(tmp_path, mode="never") as (double, kubeconfig), pytest.raises(DeployError):
        _deploy(tmp_path, registry_cfg, kubeconfig, seed=0, cfg=NEVER_READY)
    assert [r.method for r in double.requests if r.method != "GET"] == ["POST", "DELETE"]
    assert double.objects == {}
    reg = ModelRegistry.open(registry_cfg.uri)
    assert reg.alias_doc(NAME) is None
    saved = read_json(tmp_path / "out" / "deploy.json")
    assert (saved["promoted"], saved["version"]) == (False, None)
    assert "error" in saved["applied"]


def test_conflict_once_is_retried(tmp_path: Path, registry_cfg: RegistryConfig) -> None:
    with _cluster(tmp_path, mode="conflict_once") as (double, kubeconfig):
        _deploy(tmp_path, registry_cfg, kubeconfig, seed=0)
        result = _deploy(tmp_path, registry_cfg, kubeconfig, seed=1)
    first, retried = double.find("PUT", _item(double))
    assert first.json["spec"] == retried.json["spec"] == _written(tmp_path)["spec"]
    assert double.conflicts_left == 0
    assert (result["applied"]["action"], result["promoted"], result["version"]) == (
        "patched",
        True,
        2,
    )
    assert ModelRegistry.open(registry_cfg.uri).alias(NAME) == 2


def test_canary_keeps_the_alias_and_splits_traffic(
    tmp_path: Path, registry_cfg: RegistryConfig, api: tuple[K8sApiDouble, str]
) -> None:
    double, kubeconfig = api
    _deploy(tmp_path, registry_cfg, kubeconfig, seed=0)
    canary_cfg = DeployConfig(apply=True, smoke_samples=0, ready_timeout_s=60.0, canary_percent=10)
    result = _deploy(tmp_path, registry_cfg, kubeconfig, seed=1, cfg=canary_cfg)

    doc = ModelRegistry.open(registry_cfg.uri).alias_doc(NAME)
    assert doc is not None and doc["version"] == 1
    assert (doc["canary"]["version"], doc["canary"]["percent"]) == (2, 10)
    assert result["canary"] == {"version": 2, "percent": 10}
    assert (result["promoted"], result["published"], result["version"]) == (False, True, 1)
    (put,) = double.find("PUT", _item(double))
    assert put.json["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert _env(put.json)[kserve.STORAGE_URI_ENV] == _storage_uri(registry_cfg, 2)
    assert put.json["spec"] == _written(tmp_path)["spec"]
    assert result["applied"]["action"] == "patched"


# when not to apply -----------------------------------------------------------------------


def test_apply_false_never_calls_the_cluster(
    tmp_path: Path,
    registry_cfg: RegistryConfig,
    api: tuple[K8sApiDouble, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    double, kubeconfig = api
    cfg = DeployConfig(apply=False, smoke_samples=0)
    with caplog.at_level(logging.INFO, logger=deploy.__name__):
        result = _deploy(tmp_path, registry_cfg, kubeconfig, seed=0, cfg=cfg)
    assert double.requests == []
    assert read_json(tmp_path / "out" / "deploy.json")["applied"] is None
    assert (result["promoted"], result["version"]) == (True, 1)
    assert "no Kubernetes cluster configured" in caplog.text


def test_apply_auto_without_credentials_does_not_apply(
    tmp_path: Path, registry_cfg: RegistryConfig, api: tuple[K8sApiDouble, str]
) -> None:
    double, _ = api
    cfg = DeployConfig(apply="auto", smoke_samples=0)
    assert not deploy.should_apply(cfg)
    result = _deploy(tmp_path, registry_cfg, None, seed=0, cfg=cfg)
    assert double.requests == []
    assert result["applied"] is None and result["promoted"] is True
    assert (tmp_path / "out" / deploy.MANIFEST_FILE).is_file()


def test_apply_auto_with_a_kubeconfig_applies(
    tmp_path: Path, registry_cfg: RegistryConfig, api: tuple[K8sApiDouble, str]
) -> None:
    double, kubeconfig = api
    cfg = DeployConfig(apply="auto", smoke_samples=0, ready_timeout_s=60.0)
    result = _deploy(tmp_path, registry_cfg, kubeconfig, seed=0, cfg=cfg)
    assert result["applied"]["action"] == "created"
    assert len(double.find("POST")) == 1


def test_never_ready_canary_is_dropped(
    tmp_path: Path, registry_cfg: RegistryConfig, api: tuple[K8sApiDouble, str]
) -> None:
    double, kubeconfig = api
    _deploy(tmp_path, registry_cfg, kubeconfig, seed=0)
    (post,) = double.find("POST")
    reg = ModelRegistry.open(registry_cfg.uri)
    alias_before = reg.alias_doc(NAME)
    double.mode = "never"
    canary_cfg = DeployConfig(apply=True, smoke_samples=0, ready_timeout_s=0.5, canary_percent=10)
    with pytest.raises(DeployError):
        _deploy(tmp_path, registry_cfg, kubeconfig, seed=1, cfg=canary_cfg)
    assert reg.alias_doc(NAME) == alias_before
    canary, restore = double.find("PUT", _item(double))
    assert canary.json["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert restore.json["spec"] == post.json["spec"]
    saved = read_json(tmp_path / "out" / "deploy.json")
    assert (saved["promoted"], saved["canary"], saved["version"]) == (False, None, 1)
