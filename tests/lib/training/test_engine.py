"""Engine: device choice, factories, reproducible CPU training, exact evaluation metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _dataset_factory import build_tiny_dataset
from imgclf.data.loader import ManifestDataset, make_loader
from imgclf.errors import ConfigError
from imgclf.training import engine
from imgclf.training.models import create_model, param_groups
from imgclf.training.presets import ClassificationPresetEval, ClassificationPresetTrain

pytestmark = pytest.mark.timeout(120)


def test_select_device() -> None:
    assert engine.select_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert engine.select_device("auto").type == expected
    with pytest.raises(ConfigError, match=r"train.device='tpu'.*auto, cpu, cuda"):
        engine.select_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        engine.select_device("cuda")
    assert engine.amp_settings(torch.device("cpu")) == (None, None)


def test_optimizer_and_scheduler_factories() -> None:
    model = create_model("simple_cnn", 3)
    groups = param_groups(model, lr=1e-2, backbone_lr=1e-3)
    with pytest.raises(ConfigError, match=r"train.optimizer='lion'.*adamw, sgd"):
        engine.create_optimizer("lion", groups)
    sgd = engine.create_optimizer("sgd", groups, weight_decay=0.0)
    assert isinstance(sgd, torch.optim.SGD)
    optimizer = engine.create_optimizer("adamw", groups, weight_decay=1e-4)
    assert isinstance(optimizer, torch.optim.AdamW)
    with pytest.raises(ConfigError, match=r"train.scheduler='step'.*onecycle, cosine, none"):
        engine.create_scheduler("step", optimizer, total_steps=10)
    assert engine.create_scheduler("none", optimizer, total_steps=10) is None

    scheduler = engine.create_scheduler("onecycle", optimizer, total_steps=10)
    peaks = [0.0, 0.0]
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        peaks = [max(p, g["lr"]) for p, g in zip(peaks, optimizer.param_groups, strict=True)]
    # Each group peaks at its own configured rate: differential LRs survive the schedule.
    assert peaks == pytest.approx([1e-3, 1e-2], rel=0.05)


def _run_two_steps(dataset_dir: Path, seed: int) -> dict[str, torch.Tensor]:
    device = torch.device("cpu")
    engine.seed_everything(seed, device)
    dataset = ManifestDataset(dataset_dir, "train", ClassificationPresetTrain(size=12))
    loader = make_loader(dataset, batch_size=8, shuffle=True, seed=seed)
    model = create_model("simple_cnn", 3)
    optimizer = engine.create_optimizer("adamw", param_groups(model, lr=1e-2, backbone_lr=1e-3))
    scheduler = engine.create_scheduler("onecycle", optimizer, total_steps=2)
    metrics = engine.train_one_epoch(model, loader, optimizer, scheduler, device, max_steps=2)
    assert metrics["images"] == 16
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["loss"] > 0
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_seeded_cpu_training_is_reproducible(tmp_path: Path) -> None:
    dataset_dir = build_tiny_dataset(tmp_path / "ds", per_split={"train": 8, "val": 2, "test": 2})
    first = _run_two_steps(dataset_dir, seed=11)
    second = _run_two_steps(dataset_dir, seed=11)
    other = _run_two_steps(dataset_dir, seed=12)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_training_lowers_the_loss(tmp_path: Path) -> None:
    dataset_dir = build_tiny_dataset(tmp_path / "ds", per_split={"train": 16, "val": 2, "test": 2})
    device = torch.device("cpu")
    engine.seed_everything(0, device)
    loader = make_loader(
        ManifestDataset(dataset_dir, "train", ClassificationPresetEval(size=12)),
        batch_size=16,
        shuffle=True,
    )
    model = create_model("simple_cnn", 3)
    optimizer = engine.create_optimizer("adamw", param_groups(model, lr=1e-2, backbone_lr=1e-2))
    losses = [
        engine.train_one_epoch(model, loader, optimizer, None, device)["loss"] for _ in range(8)
    ]
    assert losses[-1] < 0.5 * losses[0]


class _FixedPredictions(nn.Module):
    """Logits that rank classes by a fixed table row per input (the input holds the row id)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0].long()]


def test_evaluate_metrics_are_exact() -> None:
    # Rows: logits for 4 images over 3 classes; targets 0, 1, 2, 2.
    table = torch.tensor(
        [
            [3.0, 2.0, 1.0],  # top1=0 (right)
            [3.0, 2.0, 1.0],  # top1=0, top2 has 1 (right at k=2)
            [1.0, 3.0, 2.0],  # top1=1, top2 has 2 (right at k=2)
            [3.0, 2.0, 1.0],  # top1=0, 2 is ranked last (wrong at k=2)
        ]
    )
    inputs = torch.arange(4, dtype=torch.float32)[:, None]
    targets = torch.tensor([0, 1, 2, 2])
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=3)
    result = engine.evaluate(
        _FixedPredictions(table), loader, torch.device("cpu"), top_k=2, keep_outputs=True
    )
    assert result["accuracy"] == pytest.approx(0.25)
    assert result["top_k"] == 2
    assert result["top_k_accuracy"] == pytest.approx(0.75)
    expected_loss = nn.functional.cross_entropy(table, targets).item()
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert result["predictions"] == [0, 0, 1, 0]
    assert result["targets"] == [0, 1, 2, 2]
    assert result["images"] == 4
    capped = engine.evaluate(_FixedPredictions(table), loader, torch.device("cpu"), top_k=10)
    assert capped["top_k"] == 3
    assert capped["top_k_accuracy"] == 1.0


def test_suggest_lr_picks_steepest_descent() -> None:
    lrs = [10.0 ** (-6 + i * 0.5) for i in range(12)]
    losses = [2.3, 2.3, 2.3, 2.29, 2.2, 1.8, 1.0, 0.8, 0.7, 0.75, 1.5, 4.0]
    # Steepest drop is between 1.8 and 1.0 (lrs[5] -> lrs[6]); gradients are central.
    assert engine.suggest_lr(lrs, losses) in (lrs[5], lrs[6])
    with pytest.raises(ConfigError):
        engine.suggest_lr([1e-3], [1.0])


def test_lr_range_test_sweeps_geometrically(tmp_path: Path) -> None:
    dataset_dir = build_tiny_dataset(tmp_path / "ds", per_split={"train": 4, "val": 2, "test": 2})
    device = torch.device("cpu")
    engine.seed_everything(0, device)
    loader = make_loader(
        ManifestDataset(dataset_dir, "train", ClassificationPresetEval(size=12)),
        batch_size=4,
        shuffle=True,
    )
    model = create_model("simple_cnn", 3)
    optimizer = engine.create_optimizer("adamw", param_groups(model, lr=1e-3, backbone_lr=1e-4))
    records = engine.lr_range_test(
        model, loader, optimizer, device, start_lr=1e-5, end_lr=1e-1, num_steps=9
    )
    assert len(records) == 9  # 3 batches per pass: the loader is cycled
    assert records[0]["lr"] == pytest.approx(1e-5)
    assert records[-1]["lr"] == pytest.approx(1e-1)
    # the backbone group keeps its 1:10 ratio to the head
    assert optimizer.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[1]["lr"] / 10)
