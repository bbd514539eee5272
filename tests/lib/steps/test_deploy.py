"""The deploy step: gate on ``passed``, publish once per model, move the alias, render KServe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from _k8s_schema import schema_path, validate_custom_resource
from _model_factory import build_eval_dir, build_model_dir
from imgclf import contracts
from imgclf.config import DeployConfig, RegistryConfig
from imgclf.errors import DataError
from imgclf.fsutil import read_json, sha256_file
from imgclf.registry import ModelRegistry
from imgclf.steps import deploy

CRD = schema_path("kserve.serving.kserve.io_inferenceservices.yaml")
# The smoke test and the rollout have their own tests (test_deploy_rollout.py); these are
# about the registry and the manifest, on models the factory writes without a server.
PVC = DeployConfig(storage_uri_prefix="pvc://imgclf-models", smoke_samples=0, apply=False)


@pytest.fixture
def registry_cfg(tmp_path: Path) -> RegistryConfig:
    return RegistryConfig(uri=str(tmp_path / "registry"), model_name="digits")


def _run(
    tmp_path: Path,
    registry_cfg: RegistryConfig,
    *,
    seed: int = 0,
    passed: bool = True,
    cfg: DeployConfig = PVC,
    reasons: tuple[str, ...] = (),
) -> dict:
    model_dir = build_model_dir(tmp_path / f"model-{seed}", seed=seed)
    eval_dir = build_eval_dir(tmp_path / f"eval-{seed}-{passed}", passed=passed, reasons=reasons)
    return deploy.run(
        cfg, registry_cfg, model_dir=model_dir, eval_dir=eval_dir, out_dir=tmp_path / "out"
    )


def test_passed_model_is_published_promoted_and_rendered(
    tmp_path: Path, registry_cfg: RegistryConfig
) -> None:
    result = _run(tmp_path, registry_cfg)
    reg = ModelRegistry.open(registry_cfg.uri)
    assert (result["promoted"], result["published"], result["version"]) == (True, True, 1)
    assert reg.alias("digits", "production") == 1
    info = reg.get("digits", 1)
    assert info.model_sha256 == sha256_file(tmp_path / "model-0" / "model.safetensors")
    assert info.lineage["git_commit"] and info.lineage["dataset_hash"] == "d" * 64
    assert info.metrics["passed"] is True

    out = tmp_path / "out"
    assert read_json(out / "deploy.json") == result
    assert read_json(out / "config.json")["deploy"]["storage_uri_prefix"] == "pvc://imgclf-models"
    assert result["storage_uri"] == "pvc://imgclf-models/models/digits/1/model"
    assert result["manifest"] == "inferenceservice.yaml"
    assert "comment" not in result
    manifest = yaml.safe_load((out / "inferenceservice.yaml").read_text())
    validate_custom_resource(manifest, CRD)
    env = {e["name"]: e["value"] for e in manifest["spec"]["predictor"]["containers"][0]["env"]}
    assert env["STORAGE_URI"] == result["storage_uri"]
    assert manifest["metadata"]["labels"]["imgclf.io/model-version"] == "1"
    assert manifest["metadata"]["annotations"]["imgclf.io/model-sha256"] == info.model_sha256


def test_failed_gate_publishes_and_promotes_nothing(
    tmp_path: Path, registry_cfg: RegistryConfig
) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "inferenceservice.yaml").write_text("stale: true\n")
    result = _run(tmp_path, registry_cfg, passed=False, reasons=("accuracy 0.5 < 0.95",))
    reg = ModelRegistry.open(registry_cfg.uri)
    assert reg.store.list("") == []
    assert reg.alias("digits") is None
    assert result["promoted"] is False and result["published"] is False
    assert result["version"] is None and result["manifest"] is None
    assert result["reasons"] == ["accuracy 0.5 < 0.95"]
    assert read_json(tmp_path / "out" / "deploy.json") == result
    assert not (tmp_path / "out" / "inferenceservice.yaml").exists()


def test_failed_gate_renders_current_production(
    tmp_path: Path, registry_cfg: RegistryConfig
) -> None:
    _run(tmp_path, registry_cfg, seed=0)
    result = _run(tmp_path, registry_cfg, seed=1, passed=False, reasons=("regressed",))
    reg = ModelRegistry.open(registry_cfg.uri)
    assert [i.version for i in reg.list_versions("digits")] == [1]
    assert reg.alias("digits") == 1
    assert (result["promoted"], result["version"]) == (False, 1)
    manifest = yaml.safe_load((tmp_path / "out" / "inferenceservice.yaml").read_text())
    assert manifest["metadata"]["labels"]["imgclf.io/model-version"] == "1"


def test_each_model_file_is_hashed_once(
    tmp_path: Path, registry_cfg: RegistryConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[str] = []

    def counting_sha256(path: Path) -> str:
        hashed.append(Path(path).name)
        return sha256_file(path)

    monkeypatch.setattr(contracts, "sha256_file", counting_sha256)
    result = _run(tmp_path, registry_cfg)
    assert result["published"] is True
    assert sorted(hashed) == ["history.csv", "model.json", "model.safetensors"]


def test_rerun_with_same_model_does_not_duplicate(
    tmp_path: Path, registry_cfg: RegistryConfig
) -> None:
    _run(tmp_path, registry_cfg, seed=0)
    _run(tmp_path, registry_cfg, seed=1)
    again = _run(tmp_path, registry_cfg, seed=1)
    reg = ModelRegistry.open(registry_cfg.uri)
    assert [i.version for i in reg.list_versions("digits")] == [1, 2]
    assert (again["promoted"], again["published"], again["version"]) == (True, False, 2)
    doc = reg.alias_doc("digits")
    assert doc is not None and (doc["version"], doc["previous"]) == (2, 1)


def test_published_but_unpromoted_version_is_reused(
    tmp_path: Path, registry_cfg: RegistryConfig
) -> None:
    model_dir = build_model_dir(tmp_path / "model-0", seed=0)
    reg = ModelRegistry.open(registry_cfg.uri)
    reg.publish("digits", model_dir, {"accuracy": 0.97}, {})  # a run that died before promote
    result = _run(tmp_path, registry_cfg, seed=0)
    assert (result["published"], result["version"]) == (False, 1)
    assert reg.alias("digits") == 1
    assert [i.version for i in reg.list_versions("digits")] == [1]


def test_rolled_back_weights_are_not_repromoted_by_a_rerun(
    tmp_path: Path, registry_cfg: RegistryConfig
) -> None:
    _run(tmp_path, registry_cfg, seed=0)
    _run(tmp_path, registry_cfg, seed=1)
    reg = ModelRegistry.open(registry_cfg.uri)
    reg.rollback("digits")
    result = _run(tmp_path, registry_cfg, seed=1)
    assert (result["promoted"], result["version"]) == (False, 1)
    assert "rolled back" in result["reasons"][-1]
    assert reg.alias("digits") == 1


def test_local_registry_without_prefix_uses_file_uri(
    tmp_path: Path, registry_cfg: RegistryConfig
) -> None:
    result = _run(tmp_path, registry_cfg, cfg=DeployConfig(smoke_samples=0, apply=False))
    expected = (tmp_path / "registry").resolve().as_uri() + "/models/digits/1/model"
    assert result["storage_uri"] == expected
    assert "local use only" in result["comment"]


def test_s3_registry_is_served_from_the_bucket() -> None:
    uri, comment = deploy.storage_uri(
        PVC, RegistryConfig(uri="s3://mlops/imgclf/", model_name="digits"), "digits", 4
    )
    assert (uri, comment) == ("s3://mlops/imgclf/models/digits/4/model", None)


def test_metrics_without_passed_flag_is_rejected(
    tmp_path: Path, registry_cfg: RegistryConfig
) -> None:
    model_dir = build_model_dir(tmp_path / "model", seed=0)
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    (eval_dir / "metrics.json").write_text(json.dumps({"accuracy": 0.99}))
    with pytest.raises(DataError, match="passed"):
        deploy.run(
            PVC, registry_cfg, model_dir=model_dir, eval_dir=eval_dir, out_dir=tmp_path / "o"
        )
    assert not (tmp_path / "o").exists()
