"""Per-epoch training metrics through DVCLive, for ``dvc exp show``, ``dvc plots`` and the
VS Code DVC extension while a run is still training.

The train step (rank 0) logs one DVCLive step per epoch into a dir the DVC stage declares
as its metrics and plots (``cache: false``): ``plots/metrics/<name>.tsv`` for each of
:data:`EPOCH_METRICS` (columns ``step`` = the epoch, and the value) and ``metrics.json``,
the latest epoch's validation scores under :data:`SUMMARY_KEYS`. That summary is kept to
the keys the evaluation's ``metrics.json`` also has, so ``dvc metrics show`` stays one
narrow table (a row per file, a column per distinct key).

DVCLive runs as a pipeline stage's logger only: it neither writes ``dvc.yaml`` nor saves
experiments (``dvc exp run`` does that), and starts from an empty dir; a run resumed from a
checkpoint logs the restored epochs again first, so its files equal an uninterrupted run's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")
"""The history columns logged each epoch, one ``plots/metrics/<name>.tsv`` each."""

SUMMARY_KEYS = {"accuracy": "val_acc", "loss": "val_loss"}
"""``metrics.json`` key -> the history column it holds (the latest epoch's value)."""

SUMMARY_FILE = "metrics.json"
PLOTS_DIR = "plots/metrics"


class EpochLog:
    """A DVCLive logger for one training run, writing into ``live_dir``."""

    def __init__(self, live_dir: Path) -> None:
        from dvclive import Live

        self.dir = Path(live_dir)
        self._live = Live(
            dir=os.fspath(self.dir),
            resume=False,
            report=None,
            save_dvc_exp=False,
            dvcyaml=None,
            monitor_system=False,
        )

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        """Log one history row (``epoch`` and :data:`EPOCH_METRICS`) as DVCLive step ``epoch``
        and rewrite the summary, so a running experiment shows it at once."""
        live = self._live
        live.step = int(row["epoch"])
        for name in EPOCH_METRICS:
            live.log_metric(name, float(row[name]))
        live.summary = {key: float(row[column]) for key, column in SUMMARY_KEYS.items()}
        live.next_step()

    def close(self) -> None:
        """End the DVCLive run (writes the final summary)."""
        self._live.end()
