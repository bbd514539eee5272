"""TRAIN step: fit a classifier on a dataset dir and write a model dir (CONTRACTS.md).

The book's chapter-4 recipe (:mod:`imgclf.training.recipe`) as one function: a model from
the factory, normalisation from the weights or the data, the learning rate from the LR range
test (``lr: auto``), differential rates and freeze-then-unfreeze only for pretrained weights,
a one-cycle schedule over a budget that scales with the data, early stopping on the
validation split, and the best epoch kept. The model dir holds everything serving and
evaluation need: safetensors weights, a ``torch.export`` program with a dynamic batch
dimension, ``model.json`` (inputs, normalisation, classes, chosen lr, lineage, metrics) and
the LR range test's curve. ``lr_find`` runs the range test alone.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgclf import config as config_mod
from imgclf.config import TrainConfig
from imgclf.contracts import (
    DATASET_FILE,
    EXPORT_FILE,
    MODEL_FILE,
    WEIGHTS_FILE,
    read_dataset_info,
    write_model_checksums,
)
from imgclf.data.loader import ManifestDataset, make_loader
from imgclf.errors import DataError
from imgclf.fsutil import atomic_dir, write_json, write_text
from imgclf.training import engine, lr_finder, recipe
from imgclf.training.export import export_program
from imgclf.training.models import (
    check_model_name,
    create_model,
    freeze_backbone,
    param_groups,
    set_backbone_trainable,
)
from imgclf.training.presets import (
    ClassificationPresetEval,
    ClassificationPresetTrain,
    check_augment,
)

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


def _check_names(cfg: TrainConfig) -> None:
    """Refuse unknown names before any work.

    The factories would refuse them too, but only after the pass over the training split for
    the normalisation, and the scheduler only after the LR range test. Numeric ranges are
    checked by :class:`TrainConfig` itself.
    """
    check_model_name(cfg.model)
    check_augment(cfg.augment)
    engine.check_optimizer(cfg.optimizer)
    engine.check_scheduler(cfg.scheduler)


def _check_classes(classes: list[str], dataset_dir: Path) -> None:
    """A classifier needs two classes: with one, every prediction is right by construction,
    and the model would pass every accuracy gate without having learned anything."""
    if len(classes) < 2:
        raise DataError(
            f"{dataset_dir / DATASET_FILE} lists {len(classes)} class(es) {classes}: a "
            "classifier needs at least 2"
        )


def _normalization(cfg: TrainConfig, dataset_dir: Path) -> tuple[list[float], list[float], str]:
    """(mean, std, where from): the pretrained weights' statistics, or the training split's."""
    if recipe.is_pretrained(cfg.pretrained):
        mean, std = recipe.pretrained_normalization(cfg.model, cfg.pretrained)
        return mean, std, f"pretrained weights ({cfg.pretrained})"
    raw = ClassificationPresetEval(size=cfg.image_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    images = (image for image, _ in ManifestDataset(dataset_dir, "train", raw))
    mean, std = recipe.channel_statistics(images)
    return mean, std, "training split"


def _datasets(
    cfg: TrainConfig, dataset_dir: Path, mean: list[float], std: list[float]
) -> tuple[ManifestDataset, ManifestDataset]:
    size = cfg.image_size
    train_tf = ClassificationPresetTrain(size=size, mean=mean, std=std, augment=cfg.augment)
    eval_tf = ClassificationPresetEval(size=size, mean=mean, std=std)
    train_ds = ManifestDataset(dataset_dir, "train", train_tf)
    val_ds = ManifestDataset(dataset_dir, "val", eval_tf)
    for ds in (train_ds, val_ds):
        if len(ds) == 0:
            raise DataError(f"{dataset_dir}/manifest.csv: no usable images in split {ds.split!r}")
    return train_ds, val_ds


class _Setup:
    """Everything a training or LR-finder run shares: device, data, model, rates."""

    def __init__(self, cfg: TrainConfig, dataset_dir: Path) -> None:
        _check_names(cfg)
        self.cfg = cfg
        engine.set_threads(cfg.threads)
        self.device = engine.select_device(cfg.device)
        engine.seed_everything(cfg.seed, self.device)
        self.info = read_dataset_info(dataset_dir)
        self.classes: list[str] = list(self.info["classes"])
        _check_classes(self.classes, dataset_dir)
        self.mean, self.std, self.normalization_source = _normalization(cfg, dataset_dir)
        train_ds, val_ds = _datasets(cfg, dataset_dir, self.mean, self.std)
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
        self.amp_dtype, self.scaler = engine.amp_settings(self.device)
        # Head-only warm-up epochs: only a loaded backbone has features worth protecting.
        pretrained = recipe.is_pretrained(cfg.pretrained)
        self.freeze_epochs = cfg.freeze_epochs if pretrained and not cfg.freeze_backbone else 0

    def find_lr(
        self, *, start_lr: float, end_lr: float, num_steps: int, smoothing: float = 0.98
    ) -> lr_finder.LrFindResult:
        """The LR range test on this set-up, with the backbone as the first epochs see it."""
        if self.cfg.max_steps_per_epoch > 0:  # smoke runs: never sweep longer than training
            num_steps = min(num_steps, max(2, self.cfg.epochs * self.cfg.max_steps_per_epoch))
        ratio = recipe.backbone_rate(1.0, config_mod.AUTO, self.cfg.pretrained)
        with self._backbone_frozen(self.freeze_epochs > 0):
            groups = param_groups(self.model, lr=1.0, backbone_lr=ratio)
            return lr_finder.find_lr(
                self.model,
                self.train_loader,
                groups,
                self.device,
                optimizer=self.cfg.optimizer,
                weight_decay=self.cfg.weight_decay,
                start_lr=start_lr,
                end_lr=end_lr,
                num_steps=num_steps,
                smoothing=smoothing,
                amp_dtype=self.amp_dtype,
                scaler=self.scaler,
            )

    def optimizer(self, lr: float, backbone_lr: float) -> torch.optim.Optimizer:
        """The training optimizer over every trainable group (frozen-at-start ones included)."""
        groups = param_groups(self.model, lr=lr, backbone_lr=backbone_lr)
        return engine.create_optimizer(
            self.cfg.optimizer, groups, weight_decay=self.cfg.weight_decay
        )

    @contextlib.contextmanager
    def _backbone_frozen(self, frozen: bool) -> Iterator[None]:
        if frozen:
            set_backbone_trainable(self.model, False)
        try:
            yield
        finally:
            if frozen:
                set_backbone_trainable(self.model, True)


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


def _fit(
    cfg: TrainConfig, setup: _Setup, optimizer: torch.optim.Optimizer
) -> tuple[list[dict[str, Any]], recipe.EarlyStopping, int]:
    """The epoch loop: train, validate, keep the best weights, stop when val stalls.

    Returns the history, the early-stopping record and the number of epochs planned.
    """
    steps_per_epoch = engine.count_steps(setup.train_loader, cfg.max_steps_per_epoch)
    epochs = recipe.planned_epochs(cfg.epochs, cfg.min_steps, steps_per_epoch)
    if epochs > cfg.epochs:
        log.info(
            "%d steps per epoch: training up to %d epochs to reach train.min_steps=%d",
            steps_per_epoch,
            epochs,
            cfg.min_steps,
        )
    scheduler = engine.create_scheduler(
        cfg.scheduler, optimizer, total_steps=epochs * steps_per_epoch
    )
    history: list[dict[str, Any]] = []
    patience, warmup = recipe.stopping_rules(cfg.patience, cfg.epochs, epochs, cfg.scheduler)
    tracker = recipe.EarlyStopping(patience, warmup)
    if setup.freeze_epochs:
        set_backbone_trainable(setup.model, False)
        log.info("training the head only for the first %d epoch(s)", setup.freeze_epochs)
    for epoch in range(1, epochs + 1):
        if setup.freeze_epochs and epoch == setup.freeze_epochs + 1:
            set_backbone_trainable(setup.model, True)
            log.info("epoch %d: backbone unfrozen (differential learning rates)", epoch)
        train_m = engine.train_one_epoch(
            setup.model,
            setup.train_loader,
            optimizer,
            scheduler,
            setup.device,
            setup.scaler,
            amp_dtype=setup.amp_dtype,
            max_steps=cfg.max_steps_per_epoch,
            desc=f"epoch {epoch}/{epochs}",
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
        if tracker.update(epoch, val_m, setup.model) and epoch < epochs:
            log.info("early stop after epoch %d: val stalled for %d epochs", epoch, tracker.stale)
            break
    set_backbone_trainable(setup.model, True)
    return history, tracker, epochs


def run(cfg: TrainConfig, *, dataset_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Train on ``dataset_dir`` (train/val splits) and write the model dir ``out_dir``.

    The weights of the best validation epoch are the ones saved (see ``EarlyStopping``).
    Returns the ``model.json`` content.
    """
    setup = _Setup(cfg, Path(dataset_dir))
    log.info(
        "training %s on %s: %d train / %d val images, %d classes, normalised with the %s's "
        "mean %s std %s",
        cfg.model,
        setup.device,
        len(setup.train_loader.dataset),  # type: ignore[arg-type]
        len(setup.val_loader.dataset),  # type: ignore[arg-type]
        len(setup.classes),
        setup.normalization_source,
        setup.mean,
        setup.std,
    )
    lr = config_mod.parse_rate(cfg.lr, "lr")
    sweep = steepest = None
    if lr is None:
        start, end = recipe.LR_FIND_RANGE
        sweep = setup.find_lr(
            start_lr=start,
            end_lr=end,
            num_steps=recipe.LR_FIND_STEPS,
            smoothing=recipe.LR_FIND_SMOOTHING,
        )
        lr, steepest = recipe.auto_lr(
            [r["lr"] for r in sweep.records], [r["smoothed_loss"] for r in sweep.records]
        )
        log.info("lr: auto: steepest descent at %.3g, training at %.3g", steepest, lr)
    backbone_lr = recipe.backbone_rate(lr, cfg.backbone_lr, cfg.pretrained)
    history, tracker, planned = _fit(cfg, setup, setup.optimizer(lr, backbone_lr))
    assert tracker.best is not None  # epochs >= 1
    model = setup.model.to("cpu", memory_format=torch.contiguous_format)
    model.load_state_dict(tracker.best_state)
    model.eval()
    rates = {"lr": lr, "backbone_lr": backbone_lr, "lr_source": "auto" if sweep else "train.lr"}
    if sweep is not None:
        rates["lr_steepest"] = steepest
    meta = _model_json(cfg, setup, tracker.best, rates, epochs_run=len(history), planned=planned)
    _write_model_dir(Path(out_dir), model, meta, cfg, history, sweep)
    return meta


def _model_json(
    cfg: TrainConfig,
    setup: _Setup,
    best: dict[str, float],
    rates: dict[str, Any],
    *,
    epochs_run: int,
    planned: int,
) -> dict[str, Any]:
    import torchvision

    return {
        "architecture": cfg.model,
        "classes": setup.classes,
        "num_classes": len(setup.classes),
        "input_size": [3, cfg.image_size, cfg.image_size],
        "mean": setup.mean,
        "std": setup.std,
        "normalization": setup.normalization_source,
        "dataset_hash": setup.info.get("hash", ""),
        "params": config_mod.to_dict(cfg),
        "training": {**rates, "epochs_planned": planned, "freeze_epochs": setup.freeze_epochs},
        "git_commit": _git_commit(),
        "metrics": {
            "best_val_accuracy": best["accuracy"],
            "best_val_loss": best["loss"],
            "best_epoch": int(best["epoch"]),
            "epochs_run": epochs_run,
            "stopped_early": epochs_run < planned,
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
    sweep: lr_finder.LrFindResult | None,
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
        if sweep is not None:
            lr_finder.write_lr_find(sweep, tmp, chosen=meta["training"]["lr"])
        write_model_checksums(tmp)
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

    The sweep applies to the head lr; the backbone keeps the recipe's ratio (a tenth for
    pretrained weights, equal from scratch). With ``cfg.max_steps_per_epoch`` set (CI runs),
    the sweep is capped at the training budget ``epochs * max_steps_per_epoch`` steps.
    Writes ``lr_find.csv`` (step, lr, loss, smoothed_loss), ``lr_find.png`` and
    ``config.json`` into ``out_dir``.
    """
    setup = _Setup(cfg, Path(dataset_dir))
    sweep = setup.find_lr(start_lr=start_lr, end_lr=end_lr, num_steps=num_steps)
    log.info("lr finder: %d steps, suggested lr %.3g", len(sweep.records), sweep.suggested)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        lr_finder.write_lr_find(sweep, tmp)
        write_json(
            tmp / "config.json",
            {
                **config_mod.to_dict(cfg),
                "lr_find": {"start_lr": start_lr, "end_lr": end_lr, "num_steps": sweep.num_steps},
            },
        )
    return {
        "suggested_lr": sweep.suggested,
        "plot": str(out_dir / lr_finder.PLOT_FILE),
        "curve": str(out_dir / lr_finder.CURVE_FILE),
    }
