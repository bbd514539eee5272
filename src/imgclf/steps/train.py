"""TRAIN step: fit a classifier on a dataset dir and write a model dir (CONTRACTS.md).

The book's chapter-4 recipe (:mod:`imgclf.training.recipe`) as one function: a model from
the factory, normalisation from the weights or the data, the learning rate from the LR range
test (``lr: auto``), differential rates and freeze-then-unfreeze only for pretrained weights,
a one-cycle schedule over a budget that scales with the data, early stopping on the
validation split, and the best epoch kept. The model dir holds everything serving and
evaluation need: safetensors weights, a ``torch.export`` program with a dynamic batch
dimension, ``model.json`` (inputs, normalisation, classes, chosen lr, lineage, metrics) and
the LR range test's curve. ``lr_find`` runs the range test alone. With a ``live_dir``, each
epoch is also logged through DVCLive (:mod:`imgclf.training.live`) for ``dvc exp show``.

Training is preemption-safe (:mod:`imgclf.training.checkpoint`): checkpoints go to
``train.checkpoint_dir`` every ``train.checkpoint_every_steps`` steps and at each epoch end,
a rerun resumes from the newest valid one of the same run, and SIGTERM stops after the
current batch with a checkpoint and :class:`~imgclf.errors.Preempted` (exit code 75).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as dt
import io
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DistributedSampler

from imgclf import config as config_mod
from imgclf.config import TrainConfig
from imgclf.contracts import (
    DATASET_FILE,
    EXPORT_FILE,
    HISTORY_FILE,
    MODEL_FILE,
    WEIGHTS_FILE,
    read_dataset_info,
    write_model_checksums,
)
from imgclf.data.loader import ManifestDataset, make_loader
from imgclf.data.shard_reader import ShardDataset
from imgclf.data.shard_source import use_shards
from imgclf.errors import DataError, Preempted
from imgclf.fsutil import atomic_dir, write_json, write_text
from imgclf.training import checkpoint, distributed, engine, lr_finder, recipe
from imgclf.training.export import export_program
from imgclf.training.live import EpochLog
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
    checkpoint.check_settings(cfg.checkpoint_every_steps, cfg.keep_checkpoints)


def _check_classes(classes: list[str], dataset_dir: Path) -> None:
    """A classifier needs two classes: with one, every prediction is right by construction,
    and the model would pass every accuracy gate without having learned anything."""
    if len(classes) < 2:
        raise DataError(
            f"{dataset_dir / DATASET_FILE} lists {len(classes)} class(es) {classes}: a "
            "classifier needs at least 2"
        )


def _normalization(
    cfg: TrainConfig, dataset_dir: Path, shards: bool
) -> tuple[list[float], list[float], str]:
    """(mean, std, where from): the pretrained weights' statistics, or the training split's
    (every image once, in manifest order, from the tree or the shards alike)."""
    if recipe.is_pretrained(cfg.pretrained):
        mean, std = recipe.pretrained_normalization(cfg.model, cfg.pretrained)
        return mean, std, f"pretrained weights ({cfg.pretrained})"
    raw = ClassificationPresetEval(size=cfg.image_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    split = ShardDataset if shards else ManifestDataset
    images = (image for image, _ in split(dataset_dir, "train", raw))
    mean, std = recipe.channel_statistics(images)
    return mean, std, "training split"


Split = ManifestDataset | ShardDataset


def _split_size(ds: Split) -> int:
    """Usable images of the split (a ShardDataset's ``len`` is one rank's share)."""
    return ds.total if isinstance(ds, ShardDataset) else len(ds)


def _datasets(
    cfg: TrainConfig,
    dataset_dir: Path,
    mean: list[float],
    std: list[float],
    shards: distributed.Context | None,
) -> tuple[Split, Split]:
    """The train split with augmentation and the val split with the eval transform; read
    from the shards, split across the ranks of ``shards``, when that is given."""
    size = cfg.image_size
    train_tf = ClassificationPresetTrain(size=size, mean=mean, std=std, augment=cfg.augment)
    eval_tf = ClassificationPresetEval(size=size, mean=mean, std=std)
    if shards is None:
        train_ds: Split = ManifestDataset(dataset_dir, "train", train_tf)
        val_ds: Split = ManifestDataset(dataset_dir, "val", eval_tf)
    else:
        ranks = {"rank": shards.rank, "world_size": shards.world_size}
        train_ds = ShardDataset(
            dataset_dir,
            "train",
            train_tf,
            shuffle=True,
            seed=cfg.seed,
            shuffle_buffer=cfg.shuffle_buffer,
            batch_size=cfg.batch_size,
            **ranks,
        )
        val_ds = ShardDataset(dataset_dir, "val", eval_tf, batch_size=cfg.batch_size, **ranks)
    for ds in (train_ds, val_ds):
        if _split_size(ds) == 0:
            raise DataError(f"{dataset_dir}/manifest.csv: no usable images in split {ds.split!r}")
    return train_ds, val_ds


class _Setup:
    """Everything a training or LR-finder run shares: device, data, model, rates.

    Under torchrun (``WORLD_SIZE`` > 1) it is one rank's share: the device of its
    ``LOCAL_RANK``, a DistributedSampler shard of the training split (reshuffled per epoch
    by :meth:`start_epoch`), a shard of the validation split, and ``train_model``, the model
    wrapped in DistributedDataParallel.

    Read from tar shards (``train.data``, see :func:`use_shards`), the datasets order and
    split the samples themselves (:class:`ShardDataset`: shuffle buffer, ranks, workers,
    an order that is a function of seed and epoch), and no sampler is used.
    """

    def __init__(self, cfg: TrainConfig, dataset_dir: Path) -> None:
        _check_names(cfg)
        self.cfg = cfg
        self.ctx = distributed.from_env()
        engine.set_threads(cfg.threads)
        self.device = distributed.init(self.ctx, engine.select_device(cfg.device))
        engine.seed_everything(cfg.seed, self.device)
        self.info = read_dataset_info(dataset_dir)
        self.classes: list[str] = list(self.info["classes"])
        _check_classes(self.classes, dataset_dir)
        self.shards = use_shards(dataset_dir, cfg.data)
        self.mean, self.std, self.normalization_source = _normalization(
            cfg, dataset_dir, self.shards
        )
        train_ds, val_ds = _datasets(
            cfg, dataset_dir, self.mean, self.std, self.ctx if self.shards else None
        )
        self.train_ds, self.num_train, self.num_val = (
            train_ds,
            _split_size(train_ds),
            _split_size(val_ds),
        )
        loading = {
            "num_workers": cfg.num_workers,
            "prefetch_factor": cfg.prefetch_factor,
            "persistent_workers": cfg.persistent_workers,
            "pin_memory": cfg.pin_memory,
            "device_type": self.device.type,
        }
        ctx = self.ctx
        self.train_sampler: DistributedSampler[int] | None = None
        val_sampler = None
        if ctx.enabled and not self.shards:
            self.train_sampler = DistributedSampler(
                train_ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed
            )
            val_sampler = distributed.ShardSampler(val_ds, ctx.rank, ctx.world_size)
        shard = len(train_ds) if self.shards else len(train_ds) // ctx.world_size
        # BatchNorm cannot train on a last batch of one image, so drop the ragged tail.
        self.train_loader = make_loader(
            train_ds,
            batch_size=cfg.batch_size,
            shuffle=not self.shards,  # a ShardDataset shuffles itself
            seed=cfg.seed,
            drop_last=shard > cfg.batch_size,
            sampler=self.train_sampler,
            **loading,
        )
        self.val_loader = make_loader(
            val_ds, batch_size=cfg.batch_size, shuffle=False, sampler=val_sampler, **loading
        )
        model = create_model(cfg.model, len(self.classes), pretrained=cfg.pretrained)
        if cfg.freeze_backbone:
            freeze_backbone(model)
        self.model = engine.prepare_model(model, self.device)
        if ctx.enabled:  # same init everywhere (seeded above), different augmentation per rank
            engine.seed_everything(cfg.seed + ctx.rank, self.device)
        self.train_model = self._wrap()
        self.amp_dtype, self.scaler = engine.amp_settings(self.device)
        # Head-only warm-up epochs: only a loaded backbone has features worth protecting.
        pretrained = recipe.is_pretrained(cfg.pretrained)
        self.freeze_epochs = cfg.freeze_epochs if pretrained and not cfg.freeze_backbone else 0

    def _wrap(self) -> nn.Module:
        """The model as the training loop calls it: DDP-wrapped in a distributed job, and
        compiled with ``train.compile``.

        DDP fixes the set of parameters it synchronises when it is built, so it is built
        again whenever :meth:`set_backbone_trainable` changes that set; its construction
        also broadcasts rank 0's weights, which are every rank's already.
        """
        model = self.model
        if self.ctx.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if self.cfg.compile:  # around DDP, so that its communication hooks are traced too
            model = torch.compile(model)  # type: ignore[assignment]
        return model

    def set_backbone_trainable(self, trainable: bool) -> None:
        """Freeze or unfreeze the backbone (head-only warm-up epochs)."""
        set_backbone_trainable(self.model, trainable)
        self.train_model = self._wrap()

    def start_epoch(self, epoch: int) -> None:
        """Reshuffle the rank shards for ``epoch`` (DistributedSampler's order, like a
        ShardDataset's, is a function of its seed and epoch, so a resumed epoch sees the same
        shards)."""
        if self.train_sampler is not None:
            self.train_sampler.set_epoch(epoch)
        if isinstance(self.train_ds, ShardDataset):
            self.train_ds.set_epoch(epoch)

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


class _Training:
    """The epoch loop of one run: train, validate, keep the best weights, stop when val
    stalls; checkpointed so that a killed or preempted run resumes where it was.

    Checkpoints are written every ``train.checkpoint_every_steps`` optimizer steps and at
    every epoch end, but at most once per ``train.checkpoint_min_interval_s``; SIGTERM (while
    :func:`checkpoint.stop_on_sigterm` is active) always writes one after the current batch
    and raises :class:`Preempted`.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        setup: _Setup,
        optimizer: torch.optim.Optimizer,
        store: checkpoint.CheckpointStore | None,
        extra: dict[str, Any],
        live: EpochLog | None = None,
    ) -> None:
        self.cfg, self.setup, self.optimizer, self.store = cfg, setup, optimizer, store
        self.live = live
        # Stored in every checkpoint (the chosen rates, the LR sweep) so a resumed run does
        # not repeat the LR range test.
        self.extra = extra
        self.steps_per_epoch = engine.count_steps(setup.train_loader, cfg.max_steps_per_epoch)
        self.epochs = recipe.planned_epochs(cfg.epochs, cfg.min_steps, self.steps_per_epoch)
        self.scheduler = engine.create_scheduler(
            cfg.scheduler, optimizer, total_steps=self.epochs * self.steps_per_epoch
        )
        patience, warmup = recipe.stopping_rules(
            cfg.patience, cfg.epochs, self.epochs, cfg.scheduler
        )
        self.tracker = recipe.EarlyStopping(patience, warmup)
        self.history: list[dict[str, Any]] = []
        self.epoch, self.global_step, self.done = 1, 0, False
        self.progress: engine.EpochProgress | None = None
        self.data_order: torch.Tensor | None = None  # loader generator at the epoch's start
        self.stop = checkpoint.StopRequest()
        self.writer = checkpoint.BackgroundWriter(store) if store is not None else None
        self.last_save = time.monotonic()

    @property
    def _generator(self) -> torch.Generator | None:
        return getattr(self.setup.train_loader, "generator", None)

    def fit(self) -> None:
        """Train the remaining epochs (all of them unless :meth:`restore` ran)."""
        cfg, setup = self.cfg, self.setup
        if self.epochs > cfg.epochs and self.epoch == 1:
            log.info(
                "%d steps per epoch: training up to %d epochs to reach train.min_steps=%d",
                self.steps_per_epoch,
                self.epochs,
                cfg.min_steps,
            )
        if setup.freeze_epochs and not self.done and self.epoch <= setup.freeze_epochs:
            setup.set_backbone_trainable(False)
            log.info("training the head only for the first %d epoch(s)", setup.freeze_epochs)
        if self.live is not None:  # a resumed run's epochs, as an uninterrupted run logged them
            for row in self.history:
                self.live.log_epoch(row)
        guard = checkpoint.stop_on_sigterm() if self.store else contextlib.nullcontext()
        try:
            with guard as stop:
                self.stop = stop or self.stop
                while not self.done:
                    self._epoch(self.epoch)
        except BaseException:
            if self.writer is not None:  # finish the last write; the first error is the news
                with contextlib.suppress(Exception):
                    self.writer.close()
            raise
        if self.writer is not None:
            self.writer.close()  # the last checkpoint is complete before anything else
        set_backbone_trainable(setup.model, True)

    def _epoch(self, epoch: int) -> None:
        setup = self.setup
        if setup.freeze_epochs and epoch == setup.freeze_epochs + 1 and self.progress is None:
            setup.set_backbone_trainable(True)
            log.info("epoch %d: backbone unfrozen (differential learning rates)", epoch)
        setup.start_epoch(epoch)
        generator = self._generator
        self.data_order = generator.get_state() if generator is not None else None
        train_m = engine.train_one_epoch(
            setup.train_model,
            setup.train_loader,
            self.optimizer,
            self.scheduler,
            setup.device,
            setup.scaler,
            amp_dtype=setup.amp_dtype,
            max_steps=self.cfg.max_steps_per_epoch,
            desc=f"epoch {epoch}/{self.epochs}",
            progress=self.progress,
            after_step=self._after_step if self.store else None,
        )
        self.progress = None
        val_m = engine.evaluate(
            setup.model,
            setup.val_loader,
            setup.device,
            amp_dtype=setup.amp_dtype,
            max_steps=self.cfg.max_steps_per_epoch,
            desc="val",
        )
        self.history.append(_history_row(epoch, train_m, val_m))
        if self.live is not None:
            self.live.log_epoch(self.history[-1])
        log.info(
            "epoch %d: train loss %.4f acc %.4f | val loss %.4f acc %.4f",
            epoch,
            train_m["loss"],
            train_m["accuracy"],
            val_m["loss"],
            val_m["accuracy"],
        )
        stalled = self.tracker.update(epoch, val_m, setup.model) and epoch < self.epochs
        if stalled:
            log.info(
                "early stop after epoch %d: val stalled for %d epochs", epoch, self.tracker.stale
            )
        self.epoch, self.done = epoch + 1, stalled or epoch >= self.epochs
        # After the last epoch there is nothing left to resume: the model dir comes next.
        if self.store is not None and not self.done:
            stopping = self._stop_requested()
            if stopping or self._due():
                path = self._save(None, final=stopping)
            if stopping:
                raise Preempted(_preempted_message(self.store.where(path)))

    def _stop_requested(self) -> bool:
        """SIGTERM on any rank stops every rank at the same batch (a collective when
        distributed, so every rank calls this at every step)."""
        return distributed.any_rank(self.stop.requested)

    def _after_step(self, progress: engine.EpochProgress) -> None:
        self.global_step += 1
        if self._stop_requested():
            assert self.store is not None
            path = self._save(progress, final=True)
            raise Preempted(_preempted_message(self.store.where(path)))
        every = self.cfg.checkpoint_every_steps
        # The last step of an epoch is left to the epoch-end checkpoint that follows.
        scheduled = every > 0 and self.global_step % every == 0
        if scheduled and progress.step < self.steps_per_epoch and self._due():
            self._save(progress)

    def _due(self) -> bool:
        """Whether ``train.checkpoint_min_interval_s`` has passed since the last checkpoint
        (on any rank, so that all take part in the same checkpoints)."""
        waited = time.monotonic() - self.last_save
        return distributed.any_rank(waited >= self.cfg.checkpoint_min_interval_s)

    def _save(self, progress: engine.EpochProgress | None, *, final: bool = False) -> Path:
        """Checkpoint (rank 0 writes; every rank takes part, handing over its own RNG
        states, data order and partial sums) and return the path.

        The file is written in the background; ``final`` (the run stops: preempted) waits
        until it is complete on every rank's behalf before anyone exits.
        """
        assert self.store is not None
        self.last_save = time.monotonic()
        mine = {
            "progress": _progress_state(progress),
            "rng": engine.rng_states(),
            # mid-epoch: the epoch's start, whose batches are drawn again and dropped on resume
            "data_order": self.data_order if progress else self._generator_state(),
        }
        ranks = distributed.gather(mine)
        if ranks is not None:
            self._write(progress, ranks)
        if final:
            if self.writer is not None:
                self.writer.wait()
            distributed.barrier()  # no rank exits (Preempted) before the file is complete
        return self.store.path_for(self.global_step, epoch_end=progress is None)

    def _write(self, progress: engine.EpochProgress | None, ranks: list[dict[str, Any]]) -> None:
        assert self.store is not None
        scaler = self.setup.scaler
        state = {
            "epoch": self.epoch,
            "step": progress.step if progress else 0,
            "global_step": self.global_step,
            "done": self.done,
            "model": self.setup.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "tracker": checkpoint.tracker_state(self.tracker),
            "history": self.history,
            "ranks": ranks,
            "extra": self.extra,
        }
        assert self.writer is not None
        self.writer.submit(state, global_step=self.global_step, epoch_end=progress is None)

    def _generator_state(self) -> torch.Tensor | None:
        generator = self._generator
        return generator.get_state() if generator is not None else None

    def restore(self, loaded: checkpoint.Loaded) -> None:
        """Continue from ``loaded`` (a checkpoint of this run) instead of from the start."""
        state, setup = loaded.state, self.setup
        setup.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if setup.scaler is not None and state["scaler"] is not None:
            setup.scaler.load_state_dict(state["scaler"])
        checkpoint.restore_tracker(self.tracker, state["tracker"])
        self.history = list(state["history"])
        self.epoch, self.global_step, self.done = (
            state["epoch"],
            state["global_step"],
            state["done"],
        )
        mine = state["ranks"][setup.ctx.rank]
        if mine["progress"] is not None:
            saved = mine["progress"]
            self.progress = engine.EpochProgress(
                loss_sum=saved["loss_sum"].to(setup.device),
                correct=saved["correct"].to(setup.device),
                step=saved["step"],
                images=saved["images"],
            )
        generator = self._generator
        if generator is not None and mine["data_order"] is not None:
            generator.set_state(mine["data_order"])
        engine.set_rng_states(mine["rng"])
        log.info(
            "resuming from epoch %d step %d (checkpoint %s)",
            self.epoch,
            state["step"],
            self.store.where(loaded.path) if self.store else loaded.path,
        )


def _progress_state(progress: engine.EpochProgress | None) -> dict[str, Any] | None:
    """An epoch's progress as checkpoint content, its sums on the CPU (they travel between
    ranks, and a checkpoint must load on a machine without this GPU)."""
    if progress is None:
        return None
    return {
        "loss_sum": progress.loss_sum.detach().cpu(),
        "correct": progress.correct.detach().cpu(),
        "step": progress.step,
        "images": progress.images,
    }


def _preempted_message(path: str) -> str:
    return (
        f"preempted (SIGTERM): stopped after the current batch; checkpoint {path} written, "
        "run the same command again to resume"
    )


def _checkpoints(cfg: TrainConfig, setup: _Setup) -> checkpoint.CheckpointStore | None:
    """This run's checkpoint store, or None when ``train.checkpoint_dir`` is empty (off)."""
    if not cfg.checkpoint_dir:
        return None
    key = checkpoint.run_key(
        str(setup.info.get("hash", "")), config_mod.to_dict(cfg), world_size=setup.ctx.world_size
    )
    return checkpoint.CheckpointStore.open(cfg.checkpoint_dir, key, keep=cfg.keep_checkpoints)


def _choose_rates(
    cfg: TrainConfig, setup: _Setup
) -> tuple[dict[str, Any], lr_finder.LrFindResult | None]:
    """The head and backbone rates (the LR range test for ``lr: auto``) and the sweep."""
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
    rates = {"lr": lr, "backbone_lr": backbone_lr, "lr_source": "auto" if sweep else "train.lr"}
    if sweep is not None:
        rates["lr_steepest"] = steepest
    return rates, sweep


def run(
    cfg: TrainConfig, *, dataset_dir: Path, out_dir: Path, live_dir: Path | None = None
) -> dict[str, Any]:
    """Train on ``dataset_dir`` (train/val splits) and write the model dir ``out_dir``.

    The weights of the best validation epoch are the ones saved (see ``EarlyStopping``).
    With ``train.checkpoint_dir`` set, the run resumes from its newest valid checkpoint
    there, and removes its checkpoints once the model dir is written. Returns the
    ``model.json`` content; raises :class:`Preempted` on SIGTERM during training.

    Started by torchrun (see :mod:`imgclf.steps.train_launch`), it is one rank of a
    DistributedDataParallel job: every rank trains on its shard, and rank 0 alone chooses
    the learning rate, writes checkpoints and writes ``out_dir``.

    With ``live_dir``, rank 0 logs every epoch there through DVCLive (the DVC stage's
    per-epoch metrics and plots); ``history.csv`` in the model dir holds the same rows.
    """
    try:
        return _run(cfg, Path(dataset_dir), Path(out_dir), live_dir)
    finally:
        distributed.shutdown()


def _run(
    cfg: TrainConfig, dataset_dir: Path, out_dir: Path, live_dir: Path | None
) -> dict[str, Any]:
    setup = _Setup(cfg, dataset_dir)
    log.info(
        "training %s on %s: %d train / %d val images%s, %d classes, normalised with the %s's "
        "mean %s std %s",
        cfg.model,
        setup.device,
        setup.num_train,
        setup.num_val,
        " (from shards)" if setup.shards else "",
        len(setup.classes),
        setup.normalization_source,
        setup.mean,
        setup.std,
    )
    store = _checkpoints(cfg, setup)
    loaded = store.latest() if store is not None else None
    if loaded is not None:
        rates = dict(loaded.state["extra"]["rates"])
        saved_sweep = loaded.state["extra"]["sweep"]
        sweep = lr_finder.LrFindResult(**saved_sweep) if saved_sweep else None
    else:
        # one LR range test (rank 0's), so that every rank trains at the same rates
        chosen = _choose_rates(cfg, setup) if setup.ctx.is_main else None
        rates, sweep = distributed.broadcast(chosen)
    extra = {"rates": rates, "sweep": dataclasses.asdict(sweep) if sweep else None}
    optimizer = setup.optimizer(rates["lr"], rates["backbone_lr"])
    live = EpochLog(Path(live_dir)) if live_dir is not None and setup.ctx.is_main else None
    training = _Training(cfg, setup, optimizer, store, extra, live)
    if loaded is not None:
        training.restore(loaded)
    training.fit()
    if live is not None:
        live.close()
    tracker = training.tracker
    assert tracker.best is not None  # epochs >= 1
    model = setup.model.to("cpu", memory_format=torch.contiguous_format)
    model.load_state_dict(tracker.best_state)
    model.eval()
    meta = _model_json(
        cfg, setup, tracker.best, rates, epochs_run=len(training.history), planned=training.epochs
    )
    if setup.ctx.is_main:
        _write_model_dir(out_dir, model, meta, cfg, training.history, sweep)
        if store is not None:
            store.remove_all()
    distributed.barrier()
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
        "world_size": setup.ctx.world_size,
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
        write_text(tmp / HISTORY_FILE, _csv_text(history, HISTORY_COLUMNS))
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
