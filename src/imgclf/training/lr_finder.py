"""The learning-rate range test as a reusable piece: ``imgclf lr-find`` and ``train.lr: auto``.

The sweep trains the real model for a few dozen batches, so it runs on the model the run
will train and then puts every weight (and BatchNorm statistic) back: the training run that
follows starts from the same initialisation as without the sweep.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgclf.fsutil import write_text
from imgclf.training import engine

CURVE_FILE = "lr_find.csv"
PLOT_FILE = "lr_find.png"
CURVE_COLUMNS = ("step", "lr", "loss", "smoothed_loss")


@dataclasses.dataclass(frozen=True)
class LrFindResult:
    """The recorded curve and the suggestion (steepest descent of the smoothed loss)."""

    records: list[dict[str, float]]
    suggested: float
    start_lr: float
    end_lr: float
    num_steps: int


def find_lr(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    groups: list[dict[str, Any]],
    device: torch.device,
    *,
    optimizer: str,
    weight_decay: float,
    start_lr: float,
    end_lr: float,
    num_steps: int,
    smoothing: float = 0.98,
    amp_dtype: torch.dtype | None = None,
    scaler: Any = None,
) -> LrFindResult:
    """Sweep the lr over ``groups`` (their ratios kept) and restore ``model`` afterwards."""
    saved = copy.deepcopy(model.state_dict())
    try:
        sweep = engine.create_optimizer(optimizer, groups, weight_decay=weight_decay)
        records = engine.lr_range_test(
            model,
            loader,
            sweep,
            device,
            start_lr=start_lr,
            end_lr=end_lr,
            num_steps=num_steps,
            smoothing=smoothing,
            amp_dtype=amp_dtype,
            scaler=scaler,
        )
    finally:
        model.load_state_dict(saved)
    suggested = engine.suggest_lr([r["lr"] for r in records], [r["smoothed_loss"] for r in records])
    return LrFindResult(records, suggested, start_lr, end_lr, num_steps)


def write_lr_find(result: LrFindResult, out_dir: Path, chosen: float | None = None) -> None:
    """``lr_find.csv`` and ``lr_find.png`` (the curve, the suggestion and the lr used)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CURVE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.records)
    write_text(out_dir / CURVE_FILE, buf.getvalue())
    _plot(result, out_dir / PLOT_FILE, chosen)


def _plot(result: LrFindResult, path: Path, chosen: float | None) -> None:
    # The object API with an explicit Agg canvas touches no global pyplot state, so plotting
    # works headless and does not change the backend for the rest of the process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = result.records
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([r["lr"] for r in records], [r["loss"] for r in records], alpha=0.3, label="loss")
    ax.plot([r["lr"] for r in records], [r["smoothed_loss"] for r in records], label="smoothed")
    ax.axvline(
        result.suggested, color="red", linestyle="--", label=f"suggested {result.suggested:.2g}"
    )
    if chosen is not None and chosen != result.suggested:
        ax.axvline(chosen, color="green", linestyle=":", label=f"used {chosen:.2g}")
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
