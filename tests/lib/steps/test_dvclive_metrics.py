"""What DVC reads from the steps: DVCLive's per-epoch files from train, and evaluate's flat
``metrics.json`` beside ``report.json`` and ``per_class.csv``.

The resume test runs ``imgclf train --live`` as a subprocess (as the DVC stage does), kills it
once a few epochs are logged, reruns it, and compares the DVCLive files with those of an
uninterrupted run. Timing is never asserted: the tests wait for files to appear.
"""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import pytest

import _train_runs as runs
from _dataset_factory import build_tiny_dataset
from imgclf.config import EvaluateConfig, RegistryConfig, TrainConfig
from imgclf.contracts import (
    EVAL_METRICS_KEYS,
    EVAL_REPORT_FILE,
    METRICS_FILE,
    PER_CLASS_COLUMNS,
    PER_CLASS_FILE,
    read_eval_report,
)
from imgclf.steps import evaluate, train
from imgclf.training.live import EPOCH_METRICS, PLOTS_DIR, SUMMARY_FILE, SUMMARY_KEYS

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_dataset(tmp_path_factory.mktemp("live-data") / "ds")


def _tsv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _live_rows(live: Path) -> dict[str, list[dict[str, str]]]:
    """Every per-epoch file of a DVCLive dir: metric -> its rows."""
    return {name: _tsv(live / PLOTS_DIR / f"{name}.tsv") for name in EPOCH_METRICS}


def _history(model_dir: Path) -> list[dict[str, str]]:
    with (model_dir / "history.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _logged_epochs(live: Path) -> int:
    path = live / PLOTS_DIR / "val_loss.tsv"
    try:
        return max(0, len(path.read_text(encoding="utf-8").splitlines()) - 1)
    except OSError:
        return 0


def test_train_logs_one_dvclive_step_per_epoch(dataset_dir: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(
        model="simple_cnn",
        image_size=12,
        epochs=3,
        min_steps=0,
        batch_size=8,
        lr=1e-2,
        backbone_lr=1e-2,
        patience=0,
        device="cpu",
        num_workers=0,
        checkpoint_dir="",
    )
    live = tmp_path / "live"
    train.run(cfg, dataset_dir=dataset_dir, out_dir=tmp_path / "model", live_dir=live)

    history = _history(tmp_path / "model")
    assert [int(r["epoch"]) for r in history] == [1, 2, 3]
    for name, rows in _live_rows(live).items():
        assert [int(r["step"]) for r in rows] == [1, 2, 3]
        assert [float(r[name]) for r in rows] == [float(h[name]) for h in history]
    summary = json.loads((live / SUMMARY_FILE).read_text(encoding="utf-8"))
    last = history[-1]
    assert summary == {
        **{key: float(last[column]) for key, column in SUMMARY_KEYS.items()},
        "step": 3,
    }
    # a pipeline stage's logger: no dvc.yaml, report or experiment of its own
    assert not (live / "dvc.yaml").exists() and not list(live.glob("report.*"))


def test_resumed_run_logs_the_same_rows_as_an_uninterrupted_one(
    dataset_dir: Path, tmp_path: Path
) -> None:
    reference = tmp_path / "reference"
    reference.mkdir()
    code, stderr = runs.train(
        reference, dataset_dir, reference / "ckpt", extra=["--live", str(reference / "live")]
    )
    assert code == 0, stderr

    root = tmp_path / "resumed"
    root.mkdir()
    live = root / "live"
    code, stderr = runs.start_and_stop(
        root,
        dataset_dir,
        root / "ckpt",
        after=3,
        signum=signal.SIGKILL,
        count=lambda: _logged_epochs(live),
        extra=["--live", str(live)],
    )
    assert code == -signal.SIGKILL, stderr  # killed while training, not finished
    code, stderr = runs.train(root, dataset_dir, root / "ckpt", extra=["--live", str(live)])
    assert code == 0, stderr
    assert "resuming from epoch" in stderr

    expected = _live_rows(reference / "live")
    assert _live_rows(live) == expected
    assert len(expected["val_acc"]) == len(_history(root / "model")) == runs.SETTINGS["epochs"]
    assert (live / SUMMARY_FILE).read_text() == (reference / "live" / SUMMARY_FILE).read_text()


def test_metrics_json_is_flat_and_the_report_holds_the_rest(
    dataset_dir: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    cfg = TrainConfig(model="simple_cnn", image_size=12, epochs=1, min_steps=0, lr=1e-2)
    train.run(cfg, dataset_dir=dataset_dir, out_dir=model)
    out = tmp_path / "eval"
    gate = EvaluateConfig(min_accuracy=0.0, max_regression=0.0, top_k=2, batch_size=16)
    registry = RegistryConfig(uri=str(tmp_path / "registry"))
    result = evaluate.run(gate, registry, dataset_dir=dataset_dir, model_dir=model, out_dir=out)

    metrics = json.loads((out / METRICS_FILE).read_text(encoding="utf-8"))
    assert sorted(metrics) == sorted(EVAL_METRICS_KEYS)
    assert all(v is None or isinstance(v, int | float) for v in metrics.values())
    assert isinstance(metrics["passed"], bool) and metrics["champion_accuracy"] is None

    report = read_eval_report(out)
    assert report == json.loads((out / EVAL_REPORT_FILE).read_text(encoding="utf-8"))
    assert set(report["per_class"]) == set(report["classes"]) == {"p0", "p1", "p2"}
    assert sum(map(sum, report["confusion_matrix"])) == report["num_images"] == 18
    assert report["reasons"] and report["champion"] is None and report["top_k"] == 2
    assert not set(metrics) & set(report)
    assert result == {**metrics, **report}

    with (out / PER_CLASS_FILE).open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == PER_CLASS_COLUMNS and len(rows) == 3
    for row in rows:
        scores = report["per_class"][row["class"]]
        assert float(row["f1"]) == pytest.approx(scores["f1"], abs=1e-6)
        assert int(row["support"]) == scores["support"]
