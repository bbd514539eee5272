"""The deploy smoke test: the candidate on the real server, compared with evaluate's answers.

Every test starts ``imgclf serve`` in a subprocess on the session's tiny trained model
(``served_model``), so the server, its loader and both protocols are the real ones. Latency
limits are either generous (a slow machine must pass) or impossible (any machine must fail):
no assertion depends on how fast this machine is.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import ServedModel
from imgclf.config import DeployConfig, RegistryConfig, ServeConfig
from imgclf.contracts import WEIGHTS_FILE, read_eval_predictions
from imgclf.fsutil import read_json
from imgclf.registry import ModelRegistry
from imgclf.serving.smoke import markdown, run_smoke_test
from imgclf.steps import deploy

NAME = "digits"
# Generous: only a hang guard and a limit no healthy machine reaches.
HANG_GUARD_S = 300.0
GENEROUS_P95_MS = 60_000.0
SMOKE = DeployConfig(
    smoke_samples=64, smoke_p95_ms=GENEROUS_P95_MS, smoke_timeout_s=HANG_GUARD_S, apply=False
)


def _corrupted_copy(model_dir: Path, dest: Path) -> Path:
    """A copy of ``model_dir`` with one byte of the weights flipped (checksums.json kept)."""
    shutil.copytree(model_dir, dest)
    weights = dest / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    return dest


def _smoke(served: ServedModel, cfg: DeployConfig = SMOKE, model_dir: Path | None = None) -> dict:
    return run_smoke_test(
        model_dir or served.model_dir,
        served.dataset_dir,
        served.eval_dir,
        name=NAME,
        deploy=cfg,
        serve=ServeConfig(),
    )


def test_good_model_passes(served_model: ServedModel) -> None:
    report = _smoke(served_model)
    assert report["passed"] is True, report["reasons"]
    assert report["reasons"] == [] and report["mismatches"] == []
    test_rows = len(read_eval_predictions(served_model.eval_dir))
    assert report["samples"] == min(SMOKE.smoke_samples, test_rows) == 24
    assert report["v2_checked"] > 0
    assert isinstance(report["p50_ms"], float) and isinstance(report["p95_ms"], float)
    assert 0 <= report["p50_ms"] <= report["p95_ms"]
    assert report["p95_limit_ms"] == GENEROUS_P95_MS
    assert "log_tail" not in report
    page = markdown(report, name=NAME)
    assert "PASSED" in page and "FAILED" not in page


def test_modified_weights_stop_the_server(served_model: ServedModel, tmp_path: Path) -> None:
    broken = _corrupted_copy(served_model.model_dir, tmp_path / "model")
    report = _smoke(served_model, model_dir=broken)
    assert report["passed"] is False
    assert any("the server exited" in reason for reason in report["reasons"])
    assert any(WEIGHTS_FILE in line for line in report["log_tail"])
    assert "p95_ms" not in report
    page = markdown(report, name=NAME)
    assert "FAILED" in page and WEIGHTS_FILE in page


def test_impossible_latency_limit_fails(served_model: ServedModel) -> None:
    cfg = DeployConfig(smoke_samples=4, smoke_p95_ms=0.001, smoke_timeout_s=HANG_GUARD_S)
    report = _smoke(served_model, cfg)
    assert report["passed"] is False
    assert report["mismatches"] == []
    (reason,) = report["reasons"]
    assert "deploy.smoke_p95_ms" in reason


def test_deploy_promotes_only_what_passes_the_smoke_test(
    served_model: ServedModel, tmp_path: Path
) -> None:
    registry = RegistryConfig(uri=str(tmp_path / "registry"), model_name=NAME)
    cfg = DeployConfig(
        smoke_samples=8, smoke_p95_ms=GENEROUS_P95_MS, smoke_timeout_s=HANG_GUARD_S, apply=False
    )

    def run(model_dir: Path, out: str) -> dict:
        return deploy.run(
            cfg,
            registry,
            model_dir=model_dir,
            eval_dir=served_model.eval_dir,
            out_dir=tmp_path / out,
            dataset_dir=served_model.dataset_dir,
        )

    good = run(served_model.model_dir, "out-good")
    assert (good["promoted"], good["published"], good["version"]) == (True, True, 1)
    assert good["smoke"]["passed"] is True
    assert "PASSED" in (tmp_path / "out-good" / deploy.SMOKE_REPORT).read_text()

    broken = _corrupted_copy(served_model.model_dir, tmp_path / "broken-model")
    bad = run(broken, "out-bad")
    assert (bad["promoted"], bad["published"], bad["version"]) == (False, False, 1)
    saved = read_json(tmp_path / "out-bad" / "deploy.json")
    assert saved == bad and saved["smoke"]["passed"] is False
    assert any(r.startswith("smoke test: the server exited") for r in saved["reasons"])
    assert "FAILED" in (tmp_path / "out-bad" / deploy.SMOKE_REPORT).read_text()
    reg = ModelRegistry.open(registry.uri)
    assert reg.alias(NAME) == 1
    assert [info.version for info in reg.list_versions(NAME)] == [1]


def test_no_samples_skips_the_smoke_test(served_model: ServedModel, tmp_path: Path) -> None:
    registry = RegistryConfig(uri=str(tmp_path / "registry"), model_name=NAME)
    cfg = DeployConfig(smoke_samples=0, apply=False)
    result = deploy.run(
        cfg,
        registry,
        model_dir=served_model.model_dir,
        eval_dir=served_model.eval_dir,
        out_dir=tmp_path / "out",
    )
    assert result["smoke"] == {"passed": True, "skipped": True, "reasons": []}
    assert result["promoted"] is True
    assert not (tmp_path / "out" / deploy.SMOKE_REPORT).exists()


def test_a_dataset_without_the_evaluated_images_is_one_line(
    served_model: ServedModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from imgclf.cli import main

    code = main(
        [
            "deploy", "--dataset", str(tmp_path / "elsewhere"),
            "--model", str(served_model.model_dir), "--eval", str(served_model.eval_dir),
            "--out", str(tmp_path / "deploy"), "--registry", str(tmp_path / "registry"),
            "--set", "apply=false",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "elsewhere" in err[0] and "not found" in err[0]
    assert not (tmp_path / "deploy").exists() and not (tmp_path / "registry").exists()
