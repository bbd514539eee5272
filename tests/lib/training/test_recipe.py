"""The default recipe: rates from scratch vs pretrained, lr: auto, a budget that scales with the
data, normalisation from the weights or the data (tiny learnable datasets, a few steps)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from _dataset_factory import build_tiny_dataset
from imgclf import config
from imgclf.config import TrainConfig
from imgclf.errors import ConfigError
from imgclf.steps import train
from imgclf.training import recipe
from imgclf.training.models import IMAGENET_MEAN, IMAGENET_STD

pytestmark = pytest.mark.timeout(300)

TINY = TrainConfig(
    model="simple_cnn",
    image_size=12,
    epochs=1,
    min_steps=0,
    batch_size=8,
    augment="none",
    patience=0,
)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_dataset(tmp_path_factory.mktemp("recipe") / "ds")


def _model_json(model_dir: Path) -> dict:
    return json.loads((model_dir / "model.json").read_text())


def test_rates_are_differential_only_for_pretrained_weights() -> None:
    assert recipe.backbone_rate(0.01, "auto", "none") == 0.01
    assert recipe.backbone_rate(0.01, "auto", "imagenet") == pytest.approx(0.001)
    assert recipe.backbone_rate(0.01, "auto", "/weights/resnet.safetensors") == pytest.approx(0.001)
    assert recipe.backbone_rate(0.01, 0.002, "none") == 0.002  # an explicit override wins
    assert recipe.backbone_rate(0.01, "5e-4", "imagenet") == 5e-4  # YAML's 5e-4 is a string


@pytest.mark.parametrize("bad", ["fast", "nan", "-1"])
def test_a_bad_rate_names_the_setting(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"train\.lr="):
        recipe.parse_rate(bad, "lr")


def test_params_take_auto_or_a_number() -> None:
    build = config.build
    assert build(TrainConfig, {"lr": "auto"}, "params.yaml:train").lr == "auto"
    assert build(TrainConfig, {"lr": 0.01}, "params.yaml:train").lr == 0.01
    assert build(TrainConfig, {"lr": 1}, "params.yaml:train").lr == 1.0
    with pytest.raises(ConfigError, match=r"params\.yaml:train\.lr"):
        build(TrainConfig, {"lr": [1]}, "params.yaml:train")


def test_min_steps_extends_a_small_datasets_epochs() -> None:
    assert recipe.planned_epochs(8, 150, 19) == 8  # digits: 8 epochs are already 152 steps
    assert recipe.planned_epochs(8, 150, 3) == 50  # 252 training images at batch 64
    assert recipe.planned_epochs(8, 0, 3) == 8


def test_channel_statistics_match_torch() -> None:
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 5, 7, generator=generator) * (i + 1) / 4 for i in range(4)]
    mean, std = recipe.channel_statistics(iter(images))
    stacked = torch.stack(images).transpose(0, 1).reshape(3, -1).double()
    assert mean == pytest.approx(stacked.mean(1).tolist(), abs=1e-6)
    assert std == pytest.approx(stacked.std(1, unbiased=False).tolist(), abs=1e-6)
    flat_mean, flat_std = recipe.channel_statistics(iter([torch.full((1, 2, 2), 0.5)]))
    assert flat_mean == [0.5] and flat_std == [1e-3]  # a flat channel never divides by zero


def test_min_steps_trains_a_tiny_dataset_for_more_epochs(dataset_dir: Path, tmp_path: Path) -> None:
    cfg = dataclasses.replace(TINY, lr=1e-2, epochs=1, min_steps=9, max_steps_per_epoch=2)
    meta = train.run(cfg, dataset_dir=dataset_dir, out_dir=tmp_path / "m")
    assert meta["training"]["epochs_planned"] == 5  # ceil(9 steps / 2 per epoch)
    assert meta["metrics"]["epochs_run"] == 5
    rows = (tmp_path / "m" / "history.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 5


def test_lr_auto_picks_a_finite_rate_in_range_and_records_it(
    dataset_dir: Path, tmp_path: Path
) -> None:
    cfg = dataclasses.replace(TINY, lr="auto", epochs=2, max_steps_per_epoch=6)
    meta = train.run(cfg, dataset_dir=dataset_dir, out_dir=tmp_path / "m")
    chosen = meta["training"]
    low, high = recipe.AUTO_LR_BOUNDS
    assert chosen["lr_source"] == "auto" and math.isfinite(chosen["lr"])
    assert low <= chosen["lr"] <= high
    start, end = recipe.LR_FIND_RANGE
    assert start <= chosen["lr_steepest"] <= end
    assert chosen["backbone_lr"] == chosen["lr"]  # from scratch: one rate for all
    assert _model_json(tmp_path / "m")["training"] == chosen
    assert (tmp_path / "m" / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((tmp_path / "m" / "lr_find.csv").read_text().splitlines()) > 2


def test_from_scratch_normalises_with_the_training_split(dataset_dir: Path, tmp_path: Path) -> None:
    meta = train.run(dataclasses.replace(TINY, lr=1e-2), dataset_dir=dataset_dir, out_dir=tmp_path)
    assert meta["normalization"] == "training split"
    assert meta["mean"] != list(IMAGENET_MEAN) and len(meta["mean"]) == 3
    assert all(0.0 < s < 1.0 for s in meta["std"])
    assert meta["training"]["freeze_epochs"] == 0  # nothing to protect in a random backbone


def test_pretrained_weights_keep_their_statistics_freeze_first_and_train_slower(
    dataset_dir: Path, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    train.run(dataclasses.replace(TINY, lr=1e-2), dataset_dir=dataset_dir, out_dir=source)
    cfg = dataclasses.replace(
        TINY,
        lr=1e-2,
        pretrained=str(source / "model.safetensors"),
        epochs=2,
        freeze_epochs=1,
        max_steps_per_epoch=2,
    )
    meta = train.run(cfg, dataset_dir=dataset_dir, out_dir=tmp_path / "tuned")
    assert meta["normalization"].startswith("pretrained weights")
    assert (meta["mean"], meta["std"]) == (list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert meta["training"]["backbone_lr"] == pytest.approx(1e-3)
    assert meta["training"]["freeze_epochs"] == 1


def test_auto_lr_sits_between_the_steepest_descent_and_the_minimum() -> None:
    lrs = [10 ** (e / 4) for e in range(-24, 1)]  # 1e-6 .. 1, four points a decade
    # a noisy dip at 5.6e-6 (where the lr moves nothing), the steepest real fall at 3.2e-3,
    # the minimum at 3.2e-2, then divergence
    losses = [2.0, 2.0, 2.6, 2.0, 1.4] + [2.0] * 7
    losses += [1.95, 1.9, 1.6, 1.2, 1.0, 0.9, 0.8, 0.9, 1.5, 2.5, 4.0, 6.0, 9.0]
    lr, steepest = recipe.auto_lr(lrs, losses)
    assert steepest == pytest.approx(10 ** (-10 / 4))
    assert lr == pytest.approx(math.sqrt(steepest * 10 ** (-6 / 4)))
    low, high = recipe.AUTO_LR_BOUNDS
    assert recipe.auto_lr(lrs, [2.0] * 24 + [1.0])[0] == high  # minimum at 1: clipped
    assert recipe.auto_lr(lrs[:3], [2.0, 1.0, 1.5])[0] == low  # too few points above 1e-5
    with pytest.raises(ConfigError, match="no usable steps"):
        recipe.auto_lr([], [])


def test_early_stopping_waits_out_the_warm_up_and_stretches_with_the_run() -> None:
    assert recipe.stopping_rules(3, 8, 8, "onecycle") == (3, 2)
    assert recipe.stopping_rules(3, 8, 100, "onecycle") == (38, 30)
    assert recipe.stopping_rules(3, 8, 100, "cosine") == (38, 0)
    assert recipe.stopping_rules(0, 8, 100, "onecycle")[0] == 0  # 0: never stop early
    model = torch.nn.Linear(2, 2)
    tracker = recipe.EarlyStopping(patience=2, warmup_epochs=3)
    worse = [{"accuracy": 0.5, "loss": 1.0}] + [{"accuracy": 0.4, "loss": 2.0}] * 5
    stops = [tracker.update(epoch, val, model) for epoch, val in enumerate(worse, start=1)]
    assert stops == [False, False, False, False, True, True]  # stale from epoch 4 on only
