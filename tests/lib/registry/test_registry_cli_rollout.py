"""``imgclf registry promote|rollback`` in a cluster: canary, finish, rollback, undo.

The API server is ``tests/k8s_api_double.py``; the CLI reaches it through ``--kubeconfig``
with the real ``kubernetes`` client. The registry holds two factory models (versions 1 and
2, nothing here serves them), the alias starts at version 1 and the double already serves
version 1's InferenceService, as after a first deploy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from _model_factory import build_model_dir
from imgclf.cli import main
from imgclf.config import DeployConfig, RegistryConfig
from imgclf.errors import ConfigError, DeployError, RegistryError
from imgclf.registry import ModelRegistry
from imgclf.serving import manifest as kserve
from imgclf.steps import deploy
from k8s_api_double import K8sApiDouble, hide_cluster_credentials, write_kubeconfig

TOKEN = "cli-bearer-token"
NAME = "digits"
METRICS = {"accuracy": 0.97, "passed": True}
# Ready comes on the first poll in "ready" mode; "never" mode gives up after this.
DEPLOY = DeployConfig(apply=True, ready_timeout_s=1.0)
NAMESPACE = DEPLOY.namespace
MODEL_VERSION_LABEL = f"{kserve.LABEL_PREFIX}/model-version"


@dataclasses.dataclass
class Setup:
    """The registry, the double serving version 1 and the flags every command gets."""

    reg: ModelRegistry
    registry: RegistryConfig
    double: K8sApiDouble
    kubeconfig: str
    params: Path

    def flags(self, params: Path | None = None) -> list[str]:
        return ["--params", str(params or self.params), "--kubeconfig", self.kubeconfig]

    def manifest(self, version: int, canary_percent: int | None = None) -> dict[str, Any]:
        return deploy.manifest_for(DEPLOY, self.registry, self.reg, version, canary_percent)[0]

    def puts(self) -> list[dict[str, Any]]:
        return [r.json for r in self.double.find("PUT", self.double.path(NAMESPACE, NAME))]

    def stored(self) -> dict[str, Any]:
        return self.double.objects[NAMESPACE, NAME]


@pytest.fixture(autouse=True)
def _no_real_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No credentials of this machine (a pod's account, ~/.kube/config) may leak in."""
    hide_cluster_credentials(monkeypatch, tmp_path)


def _params(path: Path, registry: RegistryConfig, deploy_section: dict[str, Any]) -> Path:
    registry_section = dataclasses.asdict(registry)
    path.write_text(yaml.safe_dump({"registry": registry_section, "deploy": deploy_section}))
    return path


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    registry = RegistryConfig(uri=str(tmp_path / "registry"), model_name=NAME)
    reg = ModelRegistry.open(registry.uri)
    for seed in (0, 1):
        model_dir = build_model_dir(tmp_path / f"model-{seed}", seed=seed)
        reg.publish(NAME, model_dir, METRICS, {"dataset_hash": "d" * 64})
    reg.promote(NAME, 1)
    params = _params(
        tmp_path / "params.yaml",
        registry,
        {"apply": DEPLOY.apply, "ready_timeout_s": DEPLOY.ready_timeout_s},
    )
    with K8sApiDouble(token=TOKEN) as double:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", double.url, token=TOKEN)
        ctx = Setup(reg, registry, double, str(kubeconfig), params)
        double.seed(ctx.manifest(1))
        yield ctx


def _env(manifest: dict[str, Any]) -> dict[str, str]:
    (container,) = manifest["spec"]["predictor"]["containers"]
    return {e["name"]: e["value"] for e in container["env"]}


def _serves(manifest: dict[str, Any], setup: Setup, version: int) -> bool:
    uri = deploy.storage_uri(DEPLOY, setup.registry, NAME, version)[0]
    labels = manifest["metadata"]["labels"]
    return _env(manifest)[kserve.STORAGE_URI_ENV] == uri and labels[MODEL_VERSION_LABEL] == str(
        version
    )


def test_canary_finish_and_rollback(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["registry", "promote", NAME, "2", "--canary", "10", *setup.flags()]) == 0
    out = capsys.readouterr().out
    assert "canary: version 2 at 10%" in out and "Ready" in out
    doc = setup.reg.alias_doc(NAME)
    assert doc is not None and doc["version"] == 1
    assert (doc["canary"]["version"], doc["canary"]["percent"]) == (2, 10)
    (canary,) = setup.puts()
    assert canary["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert _serves(canary, setup, 2)
    assert setup.stored()["spec"] == setup.manifest(2, 10)["spec"]

    assert main(["registry", "promote", NAME, "--finish", *setup.flags()]) == 0
    capsys.readouterr()
    doc = setup.reg.alias_doc(NAME)
    assert doc is not None and (doc["version"], doc["previous"]) == (2, 1)
    assert "canary" not in doc
    finish = setup.puts()[-1]
    assert "canaryTrafficPercent" not in finish["spec"]["predictor"]
    assert _serves(finish, setup, 2)

    assert main(["registry", "rollback", NAME, *setup.flags()]) == 0
    assert "alias 'production' -> version 1" in capsys.readouterr().out
    assert setup.reg.alias(NAME) == 1
    rollback = setup.puts()[-1]
    assert _serves(rollback, setup, 1)
    assert rollback["spec"] == setup.manifest(1)["spec"]
    assert len(setup.puts()) == 3


def test_rollback_drops_a_running_canary(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["registry", "promote", NAME, "2", "--canary", "25", *setup.flags()]) == 0
    assert main(["registry", "rollback", NAME, *setup.flags()]) == 0
    capsys.readouterr()
    doc = setup.reg.alias_doc(NAME)
    assert doc is not None and "canary" not in doc
    assert (doc["version"], doc["rolled_back_from"]) == (1, 2)
    _, rollback = setup.puts()
    assert rollback["spec"] == setup.manifest(1)["spec"]
    assert "canaryTrafficPercent" not in rollback["spec"]["predictor"]
    assert _serves(setup.stored(), setup, 1)


def test_never_ready_restores_the_alias(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    before = setup.reg.alias_doc(NAME)
    setup.double.mode = "never"
    code = main(["registry", "promote", NAME, "2", *setup.flags()])
    assert code == DeployError.exit_code != 0
    captured = capsys.readouterr()
    assert setup.reg.alias_doc(NAME) == before
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and f"InferenceService {NAMESPACE}/{NAME}" in err[0]
    assert "restored to version 1" in captured.out
    rollout, restore = setup.puts()
    assert _serves(rollout, setup, 2)
    assert restore["spec"] == setup.manifest(1)["spec"]
    assert setup.stored()["spec"] == setup.manifest(1)["spec"]


def test_without_a_cluster_only_the_manifest_is_written(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = _params(tmp_path / "no-cluster.yaml", setup.registry, {"apply": False})
    out = tmp_path / "out.yaml"
    flags = ["--manifest", str(out), *setup.flags(params)]
    assert main(["registry", "promote", NAME, "2", *flags]) == 0
    assert setup.double.requests == []
    assert "nothing applied" in capsys.readouterr().out
    written = yaml.safe_load(out.read_text())
    assert written == setup.manifest(2)
    assert setup.reg.alias(NAME) == 2


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (["--finish"], RegistryError, "no canary to finish"),
        ([], ConfigError, "give the version"),
        (["2", "--finish"], ConfigError, "--finish takes no version"),
        (["2", "--canary", "0"], ConfigError, "--canary 0"),
    ],
    ids=["finish-without-canary", "no-version", "finish-with-version", "canary-zero"],
)
def test_bad_promote_usage_changes_nothing(
    setup: Setup,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    error: type[Exception],
    message: str,
) -> None:
    before = setup.reg.alias_doc(NAME)
    code = main(["registry", "promote", NAME, *args, *setup.flags()])
    assert code == error.exit_code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert setup.reg.alias_doc(NAME) == before
    assert setup.double.requests == []


def test_promoting_the_serving_version_ends_a_running_canary(tmp_path: Path) -> None:
    from imgclf.registry import ModelRegistry

    reg = ModelRegistry.open(tmp_path / "reg")
    for seed in (0, 1):
        reg.publish("digits", build_model_dir(tmp_path / f"m{seed}", seed=seed), {}, {})
    reg.promote("digits", 1)
    assert reg.start_canary("digits", 2, 10)["canary"]["version"] == 2
    doc = reg.promote("digits", 1)
    assert "canary" not in doc and doc["version"] == 1
    assert "canary" not in (reg.alias_doc("digits") or {})
