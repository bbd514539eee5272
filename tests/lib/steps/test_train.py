"""TRAIN step and LR finder on tiny learnable datasets (12x12 patterns, a few steps)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _dataset_factory import build_tiny_dataset
from imgclf.config import TrainConfig
from imgclf.errors import ConfigError, DataError
from imgclf.steps import train
from imgclf.training.models import load_model_dir

pytestmark = pytest.mark.timeout(180)

TINY = TrainConfig(
    model="simple_cnn",
    image_size=12,
    min_steps=0,
    epochs=2,
    batch_size=8,
    lr=1e-2,
    backbone_lr=1e-2,
    threads=0,
    augment="none",
)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_dataset(tmp_path_factory.mktemp("tiny") / "ds")


@pytest.fixture(scope="module")
def trained(dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("train") / "model"
    meta = train.run(TINY, dataset_dir=dataset_dir, out_dir=out)
    return out, meta


def test_train_writes_the_model_dir(trained: tuple[Path, dict], dataset_dir: Path) -> None:
    out, meta = trained
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "model.pt2", "model.json", "history.csv", "config.json"} <= names
    on_disk = json.loads((out / "model.json").read_text())
    assert on_disk == json.loads(json.dumps(meta))
    dataset = json.loads((dataset_dir / "dataset.json").read_text())
    assert meta["architecture"] == "simple_cnn"
    assert meta["classes"] == dataset["classes"] and meta["num_classes"] == 3
    assert meta["input_size"] == [3, 12, 12]
    assert meta["dataset_hash"] == dataset["hash"]
    assert meta["params"]["model"] == "simple_cnn" and meta["params"]["epochs"] == 2
    assert meta["git_commit"]
    assert len(meta["mean"]) == 3 and len(meta["std"]) == 3
    assert meta["metrics"]["epochs_run"] == 2
    assert 0.0 <= meta["metrics"]["best_val_accuracy"] <= 1.0
    assert json.loads((out / "config.json").read_text()) == dataclasses.asdict(TINY)
    with open(out / "history.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(train.HISTORY_COLUMNS)
    assert [int(r["epoch"]) for r in rows] == [1, 2]


def test_exported_program_matches_eager_with_any_batch(trained: tuple[Path, dict]) -> None:
    out, _ = trained
    model, meta = load_model_dir(out)
    program = torch.export.load(out / "model.pt2")
    for batch in (1, 5):
        x = torch.randn(batch, *meta["input_size"])
        with torch.no_grad():
            expected = model(x)
        actual = program.module()(x)
        assert actual.shape == (batch, 3)
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_load_model_dir_round_trip(trained: tuple[Path, dict]) -> None:
    out, meta = trained
    model, loaded_meta = load_model_dir(out)
    assert loaded_meta == json.loads(json.dumps(meta))
    assert not model.training
    saved = load_file(str(out / "model.safetensors"))
    assert saved.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_load_model_dir_rejects_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"model\.json: missing"):
        load_model_dir(tmp_path)


def test_tiny_patterns_are_learned(dataset_dir: Path, tmp_path: Path) -> None:
    cfg = dataclasses.replace(TINY, epochs=6, patience=0)
    meta = train.run(cfg, dataset_dir=dataset_dir, out_dir=tmp_path / "model")
    assert meta["metrics"]["best_val_accuracy"] >= 0.9


def test_resnet18_default_path_exports(dataset_dir: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(image_size=16, epochs=1, min_steps=0, batch_size=8, max_steps_per_epoch=1)
    meta = train.run(cfg, dataset_dir=dataset_dir, out_dir=tmp_path / "model")
    assert meta["architecture"] == "resnet18"
    program = torch.export.load(tmp_path / "model" / "model.pt2")
    model, _ = load_model_dir(tmp_path / "model")
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), atol=1e-4, rtol=1e-4)


def test_early_stopping_when_validation_stalls(dataset_dir: Path, tmp_path: Path) -> None:
    # A learning rate far below float resolution leaves the weights, hence val, unchanged.
    cfg = dataclasses.replace(
        TINY,
        epochs=6,
        patience=2,
        optimizer="sgd",
        lr=1e-30,
        backbone_lr=0.0,
        weight_decay=0.0,
        scheduler="none",
    )
    meta = train.run(cfg, dataset_dir=dataset_dir, out_dir=tmp_path / "model")
    assert meta["metrics"]["epochs_run"] == 3
    assert meta["metrics"]["stopped_early"] is True
    assert meta["metrics"]["best_epoch"] == 1


def test_failed_run_leaves_previous_output(dataset_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("previous run")
    with pytest.raises(ConfigError, match=r"train\.augment='wild'"):
        train.run(dataclasses.replace(TINY, augment="wild"), dataset_dir=dataset_dir, out_dir=out)
    assert (out / "keep.txt").read_text() == "previous run"


def test_missing_dataset_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"dataset\.json: not found"):
        train.run(TINY, dataset_dir=tmp_path / "nothing", out_dir=tmp_path / "model")


def test_lr_find_writes_curve_and_plot(dataset_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "lr"
    result = train.lr_find(TINY, dataset_dir=dataset_dir, out_dir=out, num_steps=12)
    assert result["plot"] == str(out / "lr_find.png")
    assert result["curve"] == str(out / "lr_find.csv")
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "lr_find.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert 2 <= len(rows) <= 12
    lrs = [float(r["lr"]) for r in rows]
    assert lrs == sorted(lrs)
    assert lrs[0] <= result["suggested_lr"] <= lrs[-1]
    assert (out / "config.json").is_file()


def test_same_seed_gives_identical_weights(dataset_dir: Path, tmp_path: Path) -> None:
    cfg = dataclasses.replace(TINY, augment="light", max_steps_per_epoch=2)
    for name in ("a", "b"):
        train.run(cfg, dataset_dir=dataset_dir, out_dir=tmp_path / name)
    first = load_file(str(tmp_path / "a" / "model.safetensors"))
    second = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_training_starts_from_a_weights_file(
    trained: tuple[Path, dict], dataset_dir: Path, tmp_path: Path
) -> None:
    source, _ = trained
    # SGD at lr 1e-30 cannot move the weights: the saved model must equal the file it began from.
    cfg = dataclasses.replace(
        TINY,
        pretrained=str(source / "model.safetensors"),
        epochs=1,
        optimizer="sgd",
        lr=1e-30,
        backbone_lr=0.0,
        weight_decay=0.0,
        scheduler="none",
    )
    meta = train.run(cfg, dataset_dir=dataset_dir, out_dir=tmp_path / "model")
    assert meta["params"]["pretrained"].endswith("model.safetensors")
    before = load_file(str(source / "model.safetensors"))
    after = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_model_files_follow_the_umask(trained: tuple[Path, dict]) -> None:
    # Serving containers read the model as another user: no file may be stricter than umask.
    mask = os.umask(0)
    os.umask(mask)
    for path in trained[0].iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path.name


@pytest.mark.slow  # torch.compile builds C++ kernels for the CPU: tens of seconds
def test_compile_trains_and_writes_the_same_model_dir_layout(
    trained: tuple[Path, dict], dataset_dir: Path, tmp_path: Path
) -> None:
    plain_dir, _ = trained
    cfg = dataclasses.replace(TINY, compile=True, epochs=1, checkpoint_dir="")
    meta = train.run(cfg, dataset_dir=dataset_dir, out_dir=tmp_path / "model")
    assert meta["params"]["compile"] is True
    # The saved weights are the plain module's: no torch.compile wrapper prefix in the keys.
    compiled = load_file(tmp_path / "model" / "model.safetensors")
    assert set(compiled) == set(load_file(plain_dir / "model.safetensors"))
    model, _ = load_model_dir(tmp_path / "model")
    assert model(torch.zeros(2, *meta["input_size"])).shape == (2, meta["num_classes"])
