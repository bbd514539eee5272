"""End to end with the real DVC: a copy of this repo, `imgclf data ensure`, `dvc repro`.

These are the README's demo steps on a fresh checkout (no data/, no DVC cache, no remote),
with tiny training settings so they fit in CI.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from _repo_copy import clone_repo, sh

pytestmark = pytest.mark.slow


def test_fresh_clone_demo_runs_and_second_repro_is_a_no_op(tmp_path: Path) -> None:
    repo = clone_repo(tmp_path, min_accuracy=0.0)
    ensured = sh(repo, "imgclf", "data", "ensure")
    assert "matches data.dvc" in ensured.stdout
    assert sh(repo, "git", "status", "--porcelain", "data.dvc").stdout == ""

    sh(repo, "dvc", "repro")
    dataset = json.loads((repo / "out/dataset/dataset.json").read_text())
    assert dataset["num_images"] == 1797 and dataset["num_errors"] == 0
    assert (repo / "out/validation/data_docs/index.html").is_file()
    model = json.loads((repo / "out/model/model.json").read_text())
    assert model["dataset_hash"] == dataset["hash"]
    metrics = json.loads((repo / "out/eval/metrics.json").read_text())
    assert metrics["passed"] is True and 0.0 <= metrics["accuracy"] <= 1.0
    deploy = json.loads((repo / "out/deploy/deploy.json").read_text())
    assert deploy["promoted"] is True and deploy["version"] == 1
    listing = sh(repo, "imgclf", "registry", "list").stdout
    assert "production" in listing

    again = sh(repo, "dvc", "repro")
    assert "didn't change, skipping" in again.stdout
    assert "Running stage" not in again.stdout

    shown = json.loads(sh(repo, "dvc", "metrics", "show", "--json").stdout)
    flat = json.dumps(shown)
    assert '"accuracy"' in flat and "out/eval/metrics.json" in flat
    plots = json.loads(sh(repo, "dvc", "plots", "show", "--json").stdout)["data"]
    assert {"Confusion matrix", "Loss", "Accuracy"} <= set(plots)
    rendered = json.dumps(plots)
    assert '"actual"' in rendered and '"val_loss"' in rendered and '"val_acc"' in rendered

    exp = sh(repo, "dvc", "exp", "run", "-S", "train.epochs=1")
    assert "Running stage 'train'" in exp.stdout
    assert "Running stage 'ingest'" not in exp.stdout


def _jpeg_bytes(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="JPEG")
    return buf.getvalue()


def test_bad_dataset_stops_before_training_without_traceback(tmp_path: Path) -> None:
    repo = clone_repo(tmp_path, min_accuracy=0.0)
    data = repo / "data"
    for split, n in {"train": 12, "val": 6, "test": 6}.items():
        for label in ("cat", "fish"):
            folder = data / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                shade = (i * 19 + (split == "val") * 7 + (split == "test") * 11) % 250
                base = (shade, 40, 200) if label == "cat" else (200, shade, 40)
                Image.new("RGB", (16, 16), base).save(folder / f"{label}_{i}.png")
    (data / "train/cat/truncated.jpg").write_bytes(_jpeg_bytes((9, 9, 9))[:200])
    (data / "val/fish/empty.png").write_bytes(b"")
    shutil.copy(data / "train/fish/fish_3.png", data / "test/fish/leaked.png")

    res = sh(repo, "dvc", "repro", check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "Traceback" not in out
    for name in ("truncated.jpg", "empty.png", "leaked.png"):
        assert name in out, out
    assert "images_decodable" in out and "no_leakage_between_splits" in out
    assert not (repo / "out/model").exists()
    assert not (repo / "registry").exists()
    report = json.loads((repo / "out/validation/report.json").read_text())
    assert report["blocking_success"] is False
