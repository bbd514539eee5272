"""Training checkpoints, and SIGTERM as a request to stop after the current batch.

A checkpoint holds everything the rest of a run depends on: model, optimizer, scheduler and
grad-scaler state, the early-stopping record and history, epoch and step, every RNG state and
the data order (the loader generator's state at the start of the epoch, plus the batches
done). A run resumed from it ends with the same weights as an uninterrupted one (bit for bit
on CPU with ``num_workers: 0``, where the deterministic kernels are on).

Files, in the checkpoint dir (``train.checkpoint_dir``; never the model dir, which the step
replaces as a whole):

- ``<key>-<global step>-<mid|end>.pt``: the state, saved by ``torch.save`` to a temp file and
  renamed into place; loaded with ``torch.load(weights_only=True)``, so it holds only
  tensors and plain types;
- ``<same name>.json``: the sidecar (run key, position, sha256 of the ``.pt``), written last
  and atomically: a checkpoint without one, or whose bytes no longer match it, is skipped.

``<key>`` is the run key: a hash of the dataset hash and every train setting except the
checkpoint ones, so a changed dataset or config starts fresh instead of resuming a run it
does not belong to. Only the newest ``train.keep_checkpoints`` of a run are kept, and a run
that completes removes its own (its model dir is then the result; a later identical run
trains again rather than resuming a finished one). Checkpoints of other run keys are left
alone: the dir may be shared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pickle
import signal
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from imgclf.errors import ConfigError
from imgclf.fsutil import read_json, sha256_file, write_json
from imgclf.training.recipe import EarlyStopping

log = logging.getLogger(__name__)

FORMAT = 1
CHECKPOINT_SUFFIX = ".pt"
SIDECAR_SUFFIX = ".json"
# Settings that say where and how often to checkpoint, not what is trained.
NOT_IN_RUN_KEY = frozenset({"checkpoint_dir", "checkpoint_every_steps", "keep_checkpoints"})
_KEY_CHARS = 16


def check_settings(every_steps: int, keep: int) -> None:
    """Refuse checkpoint settings that cannot work (before any training)."""
    if every_steps < 0:
        raise ConfigError(f"train.checkpoint_every_steps={every_steps}: must be >= 0")
    if keep < 1:
        raise ConfigError(f"train.keep_checkpoints={keep}: must be >= 1")


def run_key(dataset_hash: str, params: Mapping[str, Any]) -> str:
    """The identity of a run: same dataset and same train settings, same key."""
    settings = {k: v for k, v in params.items() if k not in NOT_IN_RUN_KEY}
    text = json.dumps({"dataset": dataset_hash, "train": settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A verified checkpoint: its file and its state."""

    path: Path
    state: dict[str, Any]


class CheckpointStore:
    """The checkpoints of one run (``key``) in ``directory``."""

    def __init__(self, directory: Path, key: str, *, keep: int) -> None:
        self.directory = Path(directory)
        self.key = key
        self.keep = keep

    def save(self, state: dict[str, Any], *, global_step: int, epoch_end: bool) -> Path:
        """Write ``state`` atomically, then its sidecar, then drop the oldest beyond ``keep``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{self.key[:_KEY_CHARS]}-{global_step:09d}-{'end' if epoch_end else 'mid'}"
        path = self.directory / f"{name}{CHECKPOINT_SUFFIX}"
        tmp = self.directory / f".{name}{CHECKPOINT_SUFFIX}.tmp"
        with open(tmp, "wb") as fh:
            torch.save({**state, "format": FORMAT, "run_key": self.key}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        sidecar = {
            "format": FORMAT,
            "file": path.name,
            "sha256": sha256_file(path),
            "bytes": path.stat().st_size,
            "run_key": self.key,
            "epoch": state["epoch"],
            "step": state["step"],
            "global_step": global_step,
            "epoch_end": epoch_end,
        }
        write_json(self.directory / f"{name}{SIDECAR_SUFFIX}", sidecar)
        for old in self._sidecars()[: -self.keep]:
            _remove(old)
        log.debug("checkpoint written: %s", path)
        return path

    def latest(self) -> Loaded | None:
        """The newest checkpoint of this run that verifies and loads; None starts fresh."""
        sidecars = self._sidecars()
        if not sidecars:
            if any(self.directory.glob(f"*{SIDECAR_SUFFIX}")):
                log.info(
                    "checkpoints in %s belong to another run (the dataset or the train "
                    "settings changed): starting fresh",
                    self.directory,
                )
            return None
        for meta_path, meta in reversed(sidecars):
            loaded = self._load(meta_path, meta)
            if loaded is not None:
                return loaded
        log.warning("no usable checkpoint in %s: starting fresh", self.directory)
        return None

    def remove_all(self) -> None:
        """Delete this run's checkpoints (the run completed)."""
        for meta_path, _ in self._sidecars():
            _remove((meta_path, {}))
        with contextlib.suppress(OSError):  # left in place while other runs' files are there
            self.directory.rmdir()

    def _load(self, meta_path: Path, meta: dict[str, Any]) -> Loaded | None:
        path = self.directory / str(meta.get("file", ""))
        if not path.is_file():
            log.warning("checkpoint %s is missing: trying the previous one", path)
            return None
        if sha256_file(path) != meta.get("sha256"):
            log.warning(
                "checkpoint %s is corrupt or truncated (sha256 differs from %s): skipped, "
                "trying the previous one",
                path,
                meta_path.name,
            )
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
            log.warning("checkpoint %s does not load (%s): trying the previous one", path, exc)
            return None
        if state.get("format") != FORMAT or state.get("run_key") != self.key:
            log.warning("checkpoint %s is not this run's: trying the previous one", path)
            return None
        return Loaded(path, state)

    def _sidecars(self) -> list[tuple[Path, dict[str, Any]]]:
        """This run's sidecars, oldest first."""
        found = []
        for meta_path in self.directory.glob(f"{self.key[:_KEY_CHARS]}-*{SIDECAR_SUFFIX}"):
            try:
                meta = read_json(meta_path)
            except (OSError, ValueError):
                log.warning("checkpoint sidecar %s is unreadable: ignored", meta_path)
                continue
            if isinstance(meta, dict) and meta.get("run_key") == self.key:
                found.append((meta_path, meta))
        return sorted(found, key=lambda m: (m[1].get("global_step", 0), m[1].get("epoch_end")))


def _remove(sidecar: tuple[Path, dict[str, Any]]) -> None:
    """Delete a checkpoint, sidecar first: a sidecar never names a file already gone."""
    meta_path, _ = sidecar
    target = meta_path.with_suffix(CHECKPOINT_SUFFIX)
    meta_path.unlink(missing_ok=True)
    target.unlink(missing_ok=True)


def tracker_state(tracker: EarlyStopping) -> dict[str, Any]:
    """The early-stopping record as checkpoint content."""
    return {
        "best": tracker.best,
        "best_state": tracker.best_state,
        "lowest_loss": tracker.lowest_loss,
        "highest_acc": tracker.highest_acc,
        "stale": tracker.stale,
    }


def restore_tracker(tracker: EarlyStopping, state: Mapping[str, Any]) -> None:
    """Put back what :func:`tracker_state` returned."""
    tracker.best = state["best"]
    tracker.best_state = dict(state["best_state"])
    tracker.lowest_loss = state["lowest_loss"]
    tracker.highest_acc = state["highest_acc"]
    tracker.stale = state["stale"]


@dataclasses.dataclass
class StopRequest:
    """Set by SIGTERM while :func:`stop_on_sigterm` is active."""

    requested: bool = False


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[StopRequest]:
    """While the block runs, SIGTERM sets ``requested`` instead of ending the process.

    Kubernetes preempts a pod with SIGTERM and a grace period: the training loop checks the
    flag after every optimizer step, writes a checkpoint and exits with
    :class:`~imgclf.errors.Preempted`'s code. The previous handler (the CLI's, which ends a
    step command at once) is put back on exit. Only the main thread can install handlers;
    elsewhere nothing is installed and the request never comes. Forked DataLoader workers
    inherit the handler; in them SIGTERM keeps its default meaning, so torch can stop them.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    owner = os.getpid()

    def handle(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        request.requested = True

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield request
    finally:
        # None: a handler not installed from Python, which Python cannot put back
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
