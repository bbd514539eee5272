"""The default training recipe of the book's chapter 4, made to fit a dataset nobody tuned for.

A fixed set of numbers fits the dataset it was tuned on; the recipe instead derives them from
the data and the starting weights:

- **learning rate**: ``train.lr: auto`` runs the LR range test on the training split and
  takes the rate halfway (on the log scale) between where the smoothed loss falls fastest
  and where it bottoms out, within :data:`AUTO_LR_BOUNDS`. Either end alone misleads on
  some data: the steepest point sits early on a large dataset (digits: a run that ends
  underfitted), "a tenth of the minimum" undershoots on a few hundred images, whose sweep
  revisits the same batches;
- **differential rates only for pretrained weights**: a loaded backbone already knows useful
  features and is fine-tuned at a tenth of the head's rate (``backbone_lr: auto``); a randomly
  initialised one has everything to learn and trains at the head's rate;
- **freeze, then unfreeze**: with pretrained weights the first ``freeze_epochs`` train the new
  head only, so its random gradients do not wreck the backbone's features;
- **a budget that scales with the data**: at least ``min_steps`` optimizer steps, so a
  dataset of a few hundred images trains for more than a handful of updates; ``epochs`` is
  the floor for large datasets, and early stopping on validation ends any run sooner, but
  not while a one-cycle schedule is still warming up, and with a patience that stretches
  with the run (a stretched run's epochs are short and its validation noisier);
- **normalisation from the data**: the pretrained weights' own statistics when weights are
  loaded, the training split's mean/std from scratch; recorded in ``model.json`` so evaluation
  and serving apply exactly what training did.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from imgclf.config import parse_rate
from imgclf.errors import ConfigError
from imgclf.training.engine import ONECYCLE_WARMUP, suggest_lr
from imgclf.training.models import IMAGENET_MEAN, IMAGENET_STD

# The head lr ``lr: auto`` may pick: below, a run learns nothing in its budget; above, the
# one-cycle peak diverges. The range test sweeps wider; its suggestion is clipped to these.
AUTO_LR_BOUNDS = (1e-4, 3e-2)
# What the range test sweeps and for how long: enough points for a smooth curve on a small
# dataset at a fraction of one training run.
LR_FIND_RANGE = (1e-6, 1.0)
LR_FIND_STEPS = 80
LR_FIND_SMOOTHING = 0.9  # the moving average of a short sweep must not lag by half of it
# Backbone rate relative to the head's for pretrained weights (the book's differential rates).
PRETRAINED_BACKBONE_RATIO = 0.1


def is_pretrained(pretrained: str) -> bool:
    """True when the backbone starts from loaded weights (``imagenet`` or a weights file)."""
    return (pretrained.strip() or "none") != "none"


def backbone_rate(head_lr: float, backbone_lr: float | str, pretrained: str) -> float:
    """The backbone's rate: an explicit ``train.backbone_lr``, else a tenth of the head's for
    pretrained weights and the head's own from scratch."""
    explicit = parse_rate(backbone_lr, "backbone_lr")
    if explicit is not None:
        return explicit
    return head_lr * PRETRAINED_BACKBONE_RATIO if is_pretrained(pretrained) else head_lr


def planned_epochs(epochs: int, min_steps: int, steps_per_epoch: int) -> int:
    """Epochs to schedule: ``epochs``, or more when that would be under ``min_steps`` steps."""
    if steps_per_epoch < 1:
        return epochs
    return max(epochs, math.ceil(min_steps / steps_per_epoch))


def auto_lr(lrs: Sequence[float], smoothed_losses: Sequence[float]) -> tuple[float, float]:
    """(rate to train at, steepest-descent rate) from a range test's smoothed curve.

    The rate is the geometric mean of the steepest descent and the loss minimum, inside
    :data:`AUTO_LR_BOUNDS`. The steepest descent is searched only from a tenth of the lower
    bound up: below it the loss barely moves and its noise makes "steepest" arbitrary.
    """
    if not lrs or len(lrs) != len(smoothed_losses):
        raise ConfigError("lr: auto: the range test recorded no usable steps")
    low, high = AUTO_LR_BOUNDS
    at_min = lrs[min(range(len(lrs)), key=lambda i: smoothed_losses[i])]
    moving = [i for i, lr in enumerate(lrs) if lr >= low / 10]
    if len(moving) < 2:
        return low, at_min
    steepest = suggest_lr([lrs[i] for i in moving], [smoothed_losses[i] for i in moving])
    if not all(math.isfinite(v) and v > 0 for v in (steepest, at_min)):
        return low, steepest
    return min(max(math.sqrt(steepest * at_min), low), high), steepest


def stopping_rules(
    patience: int, nominal_epochs: int, planned_epochs: int, scheduler: str
) -> tuple[int, int]:
    """(patience, warm-up epochs) for :class:`EarlyStopping`.

    When ``min_steps`` stretches a run beyond ``epochs``, patience stretches by the same
    factor; no epoch of a one-cycle warm-up counts as stale (the rate is still rising).
    """
    stretch = planned_epochs / max(1, nominal_epochs)
    scaled = math.ceil(patience * stretch) if patience > 0 else patience
    warmup = math.floor(ONECYCLE_WARMUP * planned_epochs) if scheduler == "onecycle" else 0
    return scaled, warmup


def pretrained_normalization(model_name: str, pretrained: str) -> tuple[list[float], list[float]]:
    """Mean/std the pretrained weights were trained with.

    torchvision's weights carry their own transforms; a weights file is assumed to come from
    an ImageNet-trained torchvision model (the convention of every torchvision checkpoint).
    """
    if pretrained.strip() == "imagenet":
        import torchvision

        try:
            preset = torchvision.models.get_model_weights(model_name).DEFAULT.transforms()
            return [float(v) for v in preset.mean], [float(v) for v in preset.std]
        except (ValueError, KeyError, AttributeError):
            pass  # no weights for this name: create_model reports it
    return list(IMAGENET_MEAN), list(IMAGENET_STD)


def channel_statistics(
    images: Iterable[torch.Tensor], *, min_std: float = 1e-3
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over every pixel of ``images`` (C x H x W tensors in [0, 1]).

    Accumulated in float64 sums, so memory does not grow with the dataset. A flat channel
    (all one value) gets ``min_std`` rather than a division by zero.
    """
    total = squares = None
    count = 0
    for image in images:
        flat = image.reshape(image.shape[0], -1).to(torch.float64)
        total = flat.sum(1) if total is None else total + flat.sum(1)
        squares = (flat**2).sum(1) if squares is None else squares + (flat**2).sum(1)
        count += flat.shape[1]
    if total is None or squares is None or count == 0:
        raise ConfigError("no training images to compute the normalisation from")
    mean = total / count
    std = (squares / count - mean**2).clamp_min(0).sqrt().clamp_min(min_std)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


class EarlyStopping:
    """Tracks the best epoch and how long validation has stalled.

    Best epoch = highest val accuracy, ties broken by lower val loss (accuracy is what the
    gate judges). An epoch that neither lowers the val loss nor raises the val accuracy is
    stale; ``patience`` stale epochs in a row stop the run (``patience <= 0`` never stops).
    The first ``warmup_epochs`` never count as stale (see :func:`stopping_rules`).
    """

    def __init__(self, patience: int, warmup_epochs: int = 0) -> None:
        self.patience = patience
        self.warmup_epochs = warmup_epochs
        self.best: dict[str, float] | None = None
        self.best_state: dict[str, torch.Tensor] = {}
        self.lowest_loss, self.highest_acc, self.stale = math.inf, -math.inf, 0

    def update(self, epoch: int, val: dict[str, Any], model: torch.nn.Module) -> bool:
        """Record one epoch's val metrics (and weights if best); True means stop now."""
        key = (val["accuracy"], -val["loss"])
        if self.best is None or key > (self.best["accuracy"], -self.best["loss"]):
            self.best = {"accuracy": val["accuracy"], "loss": val["loss"], "epoch": epoch}
            # A CPU copy: the device copy keeps training, and CPU memory is the cheaper one.
            self.best_state = {
                k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
            }
        improved = val["loss"] < self.lowest_loss or val["accuracy"] > self.highest_acc
        self.stale = 0 if improved or epoch <= self.warmup_epochs else self.stale + 1
        self.lowest_loss = min(self.lowest_loss, val["loss"])
        self.highest_acc = max(self.highest_acc, val["accuracy"])
        return self.patience > 0 and self.stale >= self.patience
