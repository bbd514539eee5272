"""TRAIN step: fit a classifier on a dataset dir and write a model dir (CONTRACTS.md).

The book's transfer-learning recipe as one function: a model from the factory (optionally
pretrained, optionally with a frozen backbone), differential learning rates for backbone
and head, a one-cycle schedule, early stopping on the validation split, and the best epoch
kept. The model dir holds everything serving and evaluation need: safetensors weights, a
``torch.export`` program with a dynamic batch dimension, and ``model.json`` describing
inputs, classes, lineage and metrics. ``lr_find`` runs the LR range test of chapter 4.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgclf import config as config_mod
from imgclf.config import TrainConfig
from imgclf.contracts import EXPORT_FILE, MODEL_FILE, WEIGHTS_FILE, read_dataset_info
from imgclf.data.loader import ManifestDataset, make_loader
from imgclf.errors import ConfigError, DataError
from imgclf.fsutil import atomic_dir, write_json, write_text
from imgclf.training import engine
from imgclf.training.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    create_model,
    freeze_backbone,
    param_groups,
)
from imgclf.training.presets import ClassificationPresetEval, ClassificationPresetTrain

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")
# Largest batch the exported program accepts; export needs a finite bound to reason about.
MAX_EXPORT_BATCH = 4096


def _check(cfg: TrainConfig) -> None:
    positive = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "image_size": cfg.image_size}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {value}")
    if cfg.lr <= 0 or cfg.backbone_lr < 0:
        raise ConfigError("train.lr must be > 0 and train.backbone_lr >= 0")


def _datasets(
    cfg: TrainConfig, dataset_dir: Path
) -> tuple[dict[str, Any], ManifestDataset, ManifestDataset]:
    info = read_dataset_info(dataset_dir)
    size = cfg.image_size
    train_tf = ClassificationPresetTrain(
        size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD, augment=cfg.augment
    )
    eval_tf = ClassificationPresetEval(size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    train_ds = ManifestDataset(dataset_dir, "train", train_tf)
    val_ds = ManifestDataset(dataset_dir, "val", eval_tf)
    for ds in (train_ds, val_ds):
        if len(ds) == 0:
            raise DataError(f"{dataset_dir}/manifest.csv: no usable images in split {ds.split!r}")
    return info, train_ds, val_ds


class _Setup:
    """Everything a training or LR-finder run shares: device, data, model, optimizer."""

    def __init__(self, cfg: TrainConfig, dataset_dir: Path) -> None:
        _check(cfg)
        engine.set_threads(cfg.threads)
        self.device = engine.select_device(cfg.device)
        engine.seed_everything(cfg.seed, self.device)
        self.info, train_ds, val_ds = _datasets(cfg, dataset_dir)
        self.classes: list[str] = list(self.info["classes"])
        pin = self.device.type == "cuda"
        # BatchNorm cannot train on a last batch of one image, so drop the ragged tail.
        self.train_loader = make_loader(
            train_ds,
            batch_size=cfg.batch_size,
            shuffle=True,
            num_workers=cfg.num_workers,
            seed=cfg.seed,
            pin_memory=pin,
            drop_last=len(train_ds) > cfg.batch_size,
        )
        self.val_loader = make_loader(
            val_ds,
            batch_size=cfg.batch_size,
            shuffle=False,
            num_workers=cfg.num_workers,
            pin_memory=pin,
        )
        model = create_model(cfg.model, len(self.classes), pretrained=cfg.pretrained)
        if cfg.freeze_backbone:
            freeze_backbone(model)
        self.model = engine.prepare_model(model, self.device)
        groups = param_groups(self.model, lr=cfg.lr, backbone_lr=cfg.backbone_lr)
        self.optimizer = engine.create_optimizer(
            cfg.optimizer, groups, weight_decay=cfg.weight_decay
        )
        self.amp_dtype, self.scaler = engine.amp_settings(self.device)


def _git_commit() -> str:
    """The commit the code came from: $GIT_COMMIT (set in the image), else git, else unknown."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _csv_text(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def export_program(model: nn.Module, input_size: tuple[int, int, int]) -> Any:
    """``torch.export`` the eval-mode CPU model with a dynamic batch dimension.

    The exported program is checked against the eager model on a sample batch before it is
    returned: a serving artifact that disagrees with the weights must never be written.
    """
    sample = torch.randn(2, *input_size)
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    program = torch.export.export(model, (sample,), dynamic_shapes=({0: batch},))
    with torch.no_grad():
        expected = model(sample)
        actual = program.module()(sample)
    if not torch.allclose(expected, actual, atol=1e-4, rtol=1e-4):
        raise RuntimeError("torch.export program disagrees with the eager model")
    return program


class _EarlyStopping:
    """Tracks the best epoch and how long validation has stalled.

    Best epoch = highest val accuracy, ties broken by lower val loss (accuracy is what the
    gate judges). An epoch that neither lowers the val loss nor raises the val accuracy is
    stale; ``patience`` stale epochs in a row stop the run (``patience <= 0`` never stops).
    """

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best: dict[str, float] | None = None
        self.best_state: dict[str, torch.Tensor] = {}
        self.lowest_loss, self.highest_acc, self.stale = math.inf, -math.inf, 0

    def update(self, epoch: int, val: dict[str, Any], model: nn.Module) -> bool:
        """Record one epoch's val metrics (and weights if best); True means stop now."""
        key = (val["accuracy"], -val["loss"])
        if self.best is None or key > (self.best["accuracy"], -self.best["loss"]):
            self.best = {"accuracy": val["accuracy"], "loss": val["loss"], "epoch": epoch}
            # A CPU copy: the device copy keeps training, and CPU memory is the cheaper one.
            self.best_state = {
                k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
            }
        improved = val["loss"] < self.lowest_loss or val["accuracy"] > self.highest_acc
        self.stale = 0 if improved else self.stale + 1
        self.lowest_loss = min(self.lowest_loss, val["loss"])
        self.highest_acc = max(self.highest_acc, val["accuracy"])
        return self.patience > 0 and self.stale >= self.patience


def _history_row(epoch: int, train_m: dict[str, Any], val_m: dict[str, Any]) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "train_loss": round(train_m["loss"], 6),
        "train_acc": round(train_m["accuracy"], 6),
        "val_loss": round(val_m["loss"], 6),
        "val_acc": round(val_m["accuracy"], 6),
        "lr": train_m["lr"],
        "seconds": round(train_m["seconds"] + val_m["seconds"], 3),
    }


def _fit(cfg: TrainConfig, setup: _Setup) -> tuple[list[dict[str, Any]], _EarlyStopping]:
    """The epoch loop: train, validate, keep the best weights, stop when val stalls."""
    steps_per_epoch = engine.count_steps(setup.train_loader, cfg.max_steps_per_epoch)
    scheduler = engine.create_scheduler(
        cfg.scheduler, setup.optimizer, total_steps=cfg.epochs * steps_per_epoch
    )
    history: list[dict[str, Any]] = []
    tracker = _EarlyStopping(cfg.patience)
    for epoch in range(1, cfg.epochs + 1):
        train_m = engine.train_one_epoch(
            setup.model,
            setup.train_loader,
            setup.optimizer,
            scheduler,
            setup.device,
            setup.scaler,
            amp_dtype=setup.amp_dtype,
            max_steps=cfg.max_steps_per_epoch,
            desc=f"epoch {epoch}/{cfg.epochs}",
        )
        val_m = engine.evaluate(
            setup.model,
            setup.val_loader,
            setup.device,
            amp_dtype=setup.amp_dtype,
            max_steps=cfg.max_steps_per_epoch,
            desc="val",
        )
        history.append(_history_row(epoch, train_m, val_m))
        log.info(
            "epoch %d: train loss %.4f acc %.4f | val loss %.4f acc %.4f",
            epoch,
            train_m["loss"],
            train_m["accuracy"],
            val_m["loss"],
            val_m["accuracy"],
        )
        if tracker.update(epoch, val_m, setup.model) and epoch < cfg.epochs:
            log.info("early stop after epoch %d: val stalled for %d epochs", epoch, tracker.stale)
            break
    return history, tracker


def run(cfg: TrainConfig, *, dataset_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Train on ``dataset_dir`` (train/val splits) and write the model dir ``out_dir``.

    The weights of the best validation epoch are the ones saved (see ``_EarlyStopping``).
    Returns the ``model.json`` content.
    """
    setup = _Setup(cfg, Path(dataset_dir))
    log.info(
        "training %s on %s: %d train / %d val images, %d classes",
        cfg.model,
        setup.device,
        len(setup.train_loader.dataset),  # type: ignore[arg-type]
        len(setup.val_loader.dataset),  # type: ignore[arg-type]
        len(setup.classes),
    )
    history, tracker = _fit(cfg, setup)
    assert tracker.best is not None  # epochs >= 1
    model = setup.model.to("cpu", memory_format=torch.contiguous_format)
    model.load_state_dict(tracker.best_state)
    model.eval()
    meta = _model_json(cfg, setup, tracker.best, epochs_run=len(history))
    _write_model_dir(Path(out_dir), model, meta, cfg, history)
    return meta


def _model_json(
    cfg: TrainConfig,
    setup: _Setup,
    best: dict[str, float],
    *,
    epochs_run: int,
) -> dict[str, Any]:
    import torchvision

    return {
        "architecture": cfg.model,
        "classes": setup.classes,
        "num_classes": len(setup.classes),
        "input_size": [3, cfg.image_size, cfg.image_size],
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "dataset_hash": setup.info.get("hash", ""),
        "params": config_mod.to_dict(cfg),
        "git_commit": _git_commit(),
        "metrics": {
            "best_val_accuracy": best["accuracy"],
            "best_val_loss": best["loss"],
            "best_epoch": int(best["epoch"]),
            "epochs_run": epochs_run,
            "stopped_early": epochs_run < cfg.epochs,
        },
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "trained_on": str(setup.device),
        "files": {"weights": WEIGHTS_FILE, "export": EXPORT_FILE},
    }


def _write_model_dir(
    out_dir: Path,
    model: nn.Module,
    meta: dict[str, Any],
    cfg: TrainConfig,
    history: list[dict[str, Any]],
) -> None:
    from safetensors.torch import save

    program = export_program(model, tuple(meta["input_size"]))
    with atomic_dir(out_dir) as tmp:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        # Serialised in memory and written with a plain open(): safetensors' own save_file
        # leaves a 0600 file, which a serving container running as another user cannot read.
        (tmp / WEIGHTS_FILE).write_bytes(save(state, metadata={"architecture": cfg.model}))
        torch.export.save(program, tmp / EXPORT_FILE)
        write_json(tmp / MODEL_FILE, meta)
        write_text(tmp / "history.csv", _csv_text(history, HISTORY_COLUMNS))
        write_json(tmp / "config.json", config_mod.to_dict(cfg))
    log.info("model dir written to %s", out_dir)


def lr_find(
    cfg: TrainConfig,
    *,
    dataset_dir: Path,
    out_dir: Path,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
) -> dict[str, Any]:
    """Run the LR range test with the training set-up of ``cfg``; suggest a head lr.

    The sweep applies to the head lr; the backbone keeps its ``backbone_lr / lr`` ratio.
    With ``cfg.max_steps_per_epoch`` set (CI runs), the sweep is capped at the training
    budget ``epochs * max_steps_per_epoch`` steps. Writes ``lr_find.csv`` (step, lr, loss,
    smoothed_loss), ``lr_find.png`` and ``config.json`` into ``out_dir``.
    """
    setup = _Setup(cfg, Path(dataset_dir))
    if cfg.max_steps_per_epoch > 0:
        num_steps = min(num_steps, max(2, cfg.epochs * cfg.max_steps_per_epoch))
    records = engine.lr_range_test(
        setup.model,
        setup.train_loader,
        setup.optimizer,
        setup.device,
        start_lr=start_lr,
        end_lr=end_lr,
        num_steps=num_steps,
        amp_dtype=setup.amp_dtype,
        scaler=setup.scaler,
    )
    lrs = [r["lr"] for r in records]
    suggested = engine.suggest_lr(lrs, [r["smoothed_loss"] for r in records])
    log.info("lr finder: %d steps, suggested lr %.3g", len(records), suggested)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_text(tmp / "lr_find.csv", _csv_text(records, ("step", "lr", "loss", "smoothed_loss")))
        _plot_lr_curve(records, suggested, tmp / "lr_find.png")
        write_json(
            tmp / "config.json",
            {
                **config_mod.to_dict(cfg),
                "lr_find": {"start_lr": start_lr, "end_lr": end_lr, "num_steps": num_steps},
            },
        )
    return {
        "suggested_lr": suggested,
        "plot": str(out_dir / "lr_find.png"),
        "curve": str(out_dir / "lr_find.csv"),
    }


def _plot_lr_curve(records: list[dict[str, float]], suggested: float, path: Path) -> None:
    # The object API with an explicit Agg canvas touches no global pyplot state, so plotting
    # works headless and does not change the backend for the rest of the process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([r["lr"] for r in records], [r["loss"] for r in records], alpha=0.3, label="loss")
    ax.plot([r["lr"] for r in records], [r["smoothed_loss"] for r in records], label="smoothed")
    ax.axvline(suggested, color="red", linestyle="--", label=f"suggested {suggested:.2g}")
    ax.set_xscale("log")
    # Diverged losses (often 10x the start) would flatten the interesting part of the curve.
    smoothed = [r["smoothed_loss"] for r in records]
    lowest = smoothed.index(min(smoothed))
    ax.set_ylim(0, 1.3 * max(smoothed[: lowest + 1]))
    ax.set_xlabel("learning rate (head)")
    ax.set_ylabel("training loss")
    ax.set_title("LR range test")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
