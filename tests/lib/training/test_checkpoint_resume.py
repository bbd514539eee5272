"""Preemption-safe training: checkpoints, resume after SIGKILL, SIGTERM, corrupt files.

The train command runs in a subprocess like a KFP task or a DVC stage would run it, on CPU
with ``num_workers: 0``, where a resumed run must end with the same weights as an
uninterrupted one. Timing is never asserted: the tests wait for checkpoint files to appear.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import _train_runs as runs
from _dataset_factory import build_tiny_dataset
from imgclf.config import TrainConfig, to_dict
from imgclf.errors import ConfigError, Preempted
from imgclf.training import checkpoint, engine

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_dataset(tmp_path_factory.mktemp("ckpt-data") / "ds")


@pytest.fixture(scope="module")
def reference(dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model dir of an uninterrupted run (same seed and settings)."""
    root = tmp_path_factory.mktemp("reference")
    code, stderr = runs.train(root, dataset_dir, root / "checkpoints")
    assert code == 0, stderr
    assert "resuming" not in stderr
    # A completed run removes its checkpoints.
    assert not (root / "checkpoints").exists() or not any((root / "checkpoints").iterdir())
    return root / "model"


@pytest.fixture(scope="module")
def preempted(dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, Path]:
    """A run sent SIGTERM mid-training once two checkpoints existed."""
    root = tmp_path_factory.mktemp("preempted")
    checkpoints = root / "checkpoints"
    code, stderr = runs.start_and_stop(
        root, dataset_dir, checkpoints, after=2, signum=signal.SIGTERM
    )
    return code, stderr, checkpoints


def test_sigkill_then_rerun_resumes_and_matches_an_uninterrupted_run(
    dataset_dir: Path, reference: Path, tmp_path: Path
) -> None:
    checkpoints = tmp_path / "checkpoints"
    code, stderr = runs.start_and_stop(
        tmp_path, dataset_dir, checkpoints, after=1, signum=signal.SIGKILL
    )
    assert code == -signal.SIGKILL, stderr  # killed while training, not finished
    assert not (tmp_path / "model" / "model.json").exists()

    code, stderr = runs.train(tmp_path, dataset_dir, checkpoints)
    assert code == 0, stderr
    assert "resuming from epoch" in stderr and "(checkpoint " in stderr
    assert runs.result(tmp_path / "model") == runs.result(reference)
    assert not checkpoints.exists() or not any(checkpoints.glob("*.pt"))


@pytest.mark.s3
def test_checkpoints_on_s3_outlive_the_process_and_resume_it(
    dataset_dir: Path,
    reference: Path,
    tmp_path: Path,
    s3_env: dict[str, str],
    s3_uri: str,
    s3_store: Any,
) -> None:
    """A KFP retry runs in a new pod: only what is on the object store survives."""
    location = f"{s3_uri}/checkpoints/run-7"

    def uploaded() -> int:
        return sum(key.endswith(checkpoint.SIDECAR_SUFFIX) for key in s3_store.list("checkpoints"))

    code, stderr = runs.start_and_stop(
        tmp_path, dataset_dir, location, after=1, signum=signal.SIGKILL, count=uploaded
    )
    assert code == -signal.SIGKILL, stderr

    code, stderr = runs.train(tmp_path, dataset_dir, location)
    assert code == 0, stderr
    assert f"from {location}" in stderr  # fetched the checkpoints
    assert "resuming from epoch" in stderr and f"(checkpoint {location}/" in stderr
    assert runs.result(tmp_path / "model") == runs.result(reference)
    assert s3_store.list("checkpoints") == []  # a completed run removes its own


def test_sigterm_writes_a_checkpoint_and_exits_with_the_preempted_code(
    preempted: tuple[int, str, Path],
) -> None:
    code, stderr, checkpoints = preempted
    assert code == Preempted.exit_code == 75, stderr
    assert "preempted (SIGTERM)" in stderr
    found = runs.sidecars(checkpoints)
    assert len(found) == runs.SETTINGS["keep_checkpoints"]  # older ones pruned
    newest = checkpoints / found[-1]["file"]
    assert newest.is_file() and str(newest) in stderr
    assert not list(checkpoints.glob(".*.tmp"))


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(
    preempted: tuple[int, str, Path], dataset_dir: Path, reference: Path, tmp_path: Path
) -> None:
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(preempted[2], checkpoints)
    previous, newest = runs.sidecars(checkpoints)[-2:]
    data = (checkpoints / newest["file"]).read_bytes()
    (checkpoints / newest["file"]).write_bytes(data[: len(data) // 2])

    code, stderr = runs.train(tmp_path, dataset_dir, checkpoints)
    assert code == 0, stderr
    assert f"{newest['file']} is corrupt or truncated" in stderr
    assert (
        f"resuming from epoch {previous['epoch']} step {previous['step']} "
        f"(checkpoint {checkpoints / previous['file']})" in stderr
    )
    assert runs.result(tmp_path / "model") == runs.result(reference)


def test_a_changed_config_starts_fresh(
    preempted: tuple[int, str, Path], dataset_dir: Path, tmp_path: Path
) -> None:
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(preempted[2], checkpoints)
    before = sorted(p.name for p in checkpoints.iterdir())

    code, stderr = runs.train(tmp_path, dataset_dir, checkpoints, lr=0.02, epochs=1)
    assert code == 0, stderr
    assert "resuming" not in stderr
    assert "belong to another run" in stderr
    # The other run's checkpoints are left alone.
    assert sorted(p.name for p in checkpoints.iterdir()) == before


def test_run_key_ignores_only_the_checkpoint_settings() -> None:
    base = to_dict(TrainConfig())
    key = checkpoint.run_key("h", base)
    moved = {**base, "checkpoint_dir": "elsewhere", "checkpoint_every_steps": 5}
    assert checkpoint.run_key("h", moved) == key
    assert checkpoint.run_key("h", {**base, "lr": 0.5}) != key
    assert checkpoint.run_key("other", base) != key


def test_rng_states_survive_a_weights_only_load(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    torch.save(engine.rng_states(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    engine.set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


@pytest.mark.parametrize(("every", "keep"), [(-1, 2), (10, 0)])
def test_checkpoint_settings_are_checked(every: int, keep: int) -> None:
    with pytest.raises(ConfigError, match=r"train\.(checkpoint_every_steps|keep_checkpoints)"):
        checkpoint.check_settings(every, keep)


def test_in_process_preemption_with_auto_lr_resumes_without_a_new_sweep(
    dataset_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imgclf.steps import train

    cfg = dataclasses.replace(
        TrainConfig(**{**runs.SETTINGS, "epochs": 2, "lr": "auto", "backbone_lr": "auto"}),
        checkpoint_dir=str(tmp_path / "checkpoints"),
    )
    reference = train.run(
        dataclasses.replace(cfg, checkpoint_dir=str(tmp_path / "reference-checkpoints")),
        dataset_dir=dataset_dir,
        out_dir=tmp_path / "reference",
    )
    handler = signal.getsignal(signal.SIGTERM)
    save = checkpoint.CheckpointStore.save

    def save_then_preempt(self: checkpoint.CheckpointStore, *args: Any, **kwargs: Any) -> Path:
        path = save(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # as the kubelet would, mid-training
        return path

    with monkeypatch.context() as patched:
        patched.setattr(checkpoint.CheckpointStore, "save", save_then_preempt)
        with pytest.raises(Preempted, match="run the same command again"):
            train.run(cfg, dataset_dir=dataset_dir, out_dir=tmp_path / "model")
    assert signal.getsignal(signal.SIGTERM) == handler  # the previous handler is back

    def no_sweep(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a resumed run must reuse the checkpoint's learning rates")

    monkeypatch.setattr(train._Setup, "find_lr", no_sweep)
    meta = train.run(cfg, dataset_dir=dataset_dir, out_dir=tmp_path / "model")
    assert meta["training"] == reference["training"]
    assert meta["metrics"] == reference["metrics"]
    assert runs.result(tmp_path / "model") == runs.result(tmp_path / "reference")
    # The epoch cut in half reports the same train loss and accuracy (only seconds differ).
    assert _history(tmp_path / "model") == _history(tmp_path / "reference")


def _history(model_dir: Path) -> list[dict[str, str]]:
    with open(model_dir / "history.csv", encoding="utf-8") as fh:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]


@pytest.mark.parametrize(("interval", "expect_saves"), [(0.0, True), (3600.0, False)])
def test_scheduled_checkpoints_wait_for_the_min_interval(
    dataset_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    interval: float,
    expect_saves: bool,
) -> None:
    """Every step and epoch end is a checkpoint opportunity; the interval decides."""
    from imgclf.steps import train

    saved: list[int] = []
    save = checkpoint.CheckpointStore.save

    def counting(self: checkpoint.CheckpointStore, *args: Any, **kwargs: Any) -> Path:
        saved.append(kwargs["global_step"])
        return save(self, *args, **kwargs)

    monkeypatch.setattr(checkpoint.CheckpointStore, "save", counting)
    cfg = TrainConfig(
        **{
            **runs.SETTINGS,
            "epochs": 2,
            "checkpoint_every_steps": 1,
            "checkpoint_min_interval_s": interval,
            "checkpoint_dir": str(tmp_path / "checkpoints"),
        }
    )
    train.run(cfg, dataset_dir=dataset_dir, out_dir=tmp_path / "model")
    assert bool(saved) is expect_saves, saved
