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

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from imgclf.errors import ConfigError, ImgclfError
from imgclf.fsutil import read_json, sha256_file, write_json
from imgclf.storage import Store, is_remote, open_store
from imgclf.training.recipe import EarlyStopping

log = logging.getLogger(__name__)

FORMAT = 2  # 2: per-rank RNG states, data order and partial sums under "ranks"
CHECKPOINT_SUFFIX = ".pt"
SIDECAR_SUFFIX = ".json"
# Settings that say where and how often to checkpoint, not what is trained.
NOT_IN_RUN_KEY = frozenset(
    {"checkpoint_dir", "checkpoint_every_steps", "checkpoint_min_interval_s", "keep_checkpoints"}
)
_KEY_CHARS = 16


def check_settings(every_steps: int, keep: int) -> None:
    """Refuse checkpoint settings that cannot work (before any training)."""
    if every_steps < 0:
        raise ConfigError(f"train.checkpoint_every_steps={every_steps}: must be >= 0")
    if keep < 1:
        raise ConfigError(f"train.keep_checkpoints={keep}: must be >= 1")


def run_key(dataset_hash: str, params: Mapping[str, Any], *, world_size: int = 1) -> str:
    """The identity of a run: same dataset, train settings and process count, same key.

    The process count belongs to it because it decides each rank's shard of every epoch: a
    checkpoint of a 2-process run cannot continue as a 4-process one.
    """
    settings = {k: v for k, v in params.items() if k not in NOT_IN_RUN_KEY}
    identity: dict[str, Any] = {"dataset": dataset_hash, "train": settings}
    if world_size > 1:  # one process keeps the keys it always had
        identity["world_size"] = world_size
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A verified checkpoint: its file and its state."""

    path: Path
    state: dict[str, Any]


class CheckpointStore:
    """The checkpoints of one run (``key``) in ``directory``, mirrored to ``remote``.

    With a ``remote`` store (an ``s3://`` checkpoint location, keyed by the KFP run id so
    that a retried task finds its first attempt's checkpoints), ``directory`` is this
    process's scratch copy: every checkpoint is written there first, then uploaded, the
    ``.pt`` before its sidecar, so that the remote never holds a sidecar naming a file not
    yet complete. :meth:`latest` first downloads the run's newest checkpoints.
    """

    def __init__(
        self,
        directory: Path,
        key: str,
        *,
        keep: int,
        remote: Store | None = None,
        remote_uri: str = "",
    ) -> None:
        self.directory = Path(directory)
        self.key = key
        self.keep = keep
        self.remote = remote
        self.remote_uri = remote_uri.rstrip("/")

    @classmethod
    def open(cls, location: str, key: str, *, keep: int) -> CheckpointStore:
        """The store for ``train.checkpoint_dir``: a local dir, or ``s3://bucket/prefix``
        with a scratch dir of this process in the temp dir."""
        if not is_remote(location):
            return cls(Path(location), key, keep=keep)
        scratch = Path(tempfile.mkdtemp(prefix="imgclf-checkpoints-"))
        return cls(scratch, key, keep=keep, remote=open_store(location), remote_uri=location)

    def where(self, path: Path) -> str:
        """``path`` as a user finds it: the remote URI when there is one."""
        return f"{self.remote_uri}/{path.name}" if self.remote is not None else str(path)

    def path_for(self, global_step: int, *, epoch_end: bool) -> Path:
        """Where the checkpoint at ``global_step`` goes."""
        return self.directory / f"{self._name(global_step, epoch_end)}{CHECKPOINT_SUFFIX}"

    def _name(self, global_step: int, epoch_end: bool) -> str:
        return f"{self.key[:_KEY_CHARS]}-{global_step:09d}-{'end' if epoch_end else 'mid'}"

    def save(self, state: dict[str, Any], *, global_step: int, epoch_end: bool) -> Path:
        """Write ``state`` atomically, then its sidecar, then drop the oldest beyond ``keep``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        name = self._name(global_step, epoch_end)
        path = self.path_for(global_step, epoch_end=epoch_end)
        tmp = self.directory / f".{name}{CHECKPOINT_SUFFIX}.tmp"
        with open(tmp, "wb") as raw:
            fh = _HashingWriter(raw)  # the sha256 as the bytes go out: no second read
            torch.save({**state, "format": FORMAT, "run_key": self.key}, fh)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
        sidecar = {
            "format": FORMAT,
            "file": path.name,
            "sha256": fh.sha256.hexdigest(),
            "bytes": fh.size,
            "run_key": self.key,
            "epoch": state["epoch"],
            "step": state["step"],
            "global_step": global_step,
            "epoch_end": epoch_end,
        }
        sidecar_path = self.directory / f"{name}{SIDECAR_SUFFIX}"
        write_json(sidecar_path, sidecar)
        if self.remote is not None:
            self.remote.upload_file(path, path.name)
            self.remote.upload_file(sidecar_path, sidecar_path.name)
        for old in self._sidecars()[: -self.keep]:
            self._remove(old)
        log.debug("checkpoint written: %s", path)
        return path

    def latest(self) -> Loaded | None:
        """The newest checkpoint of this run that verifies and loads; None starts fresh."""
        if self.remote is not None:
            self._download()
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
            self._remove((meta_path, {}))
        if self.remote is not None:  # and what an earlier attempt left that this one never saw
            prefix = self.key[:_KEY_CHARS]
            left = [k for k in self.remote.list() if k.startswith(prefix)]
            for key in sorted(left, key=lambda k: not k.endswith(SIDECAR_SUFFIX)):
                self.remote.delete(key)
            shutil.rmtree(self.directory, ignore_errors=True)
            return
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

    def _remove(self, sidecar: tuple[Path, dict[str, Any]]) -> None:
        """Delete a checkpoint, sidecar first: a sidecar never names a file already gone."""
        meta_path, _ = sidecar
        target = meta_path.with_suffix(CHECKPOINT_SUFFIX)
        if self.remote is not None:
            self.remote.delete(meta_path.name)
            self.remote.delete(target.name)
        meta_path.unlink(missing_ok=True)
        target.unlink(missing_ok=True)

    def _download(self) -> None:
        """Copy this run's newest ``keep`` checkpoints from the remote into ``directory``.

        A sidecar is fetched with its ``.pt``; a pair that fails to download (a file deleted
        meanwhile) is skipped, and :meth:`latest` checks every file's sha256 as for local
        checkpoints, so a truncated upload falls back to the previous checkpoint.
        """
        assert self.remote is not None
        prefix = self.key[:_KEY_CHARS]
        names = sorted(
            key
            for key in self.remote.list()
            if key.startswith(prefix) and key.endswith(SIDECAR_SUFFIX)
        )
        for name in names[-self.keep :]:
            target = Path(name).with_suffix(CHECKPOINT_SUFFIX).name
            try:
                self.remote.download_file(target, self.directory / target)
                self.remote.download_file(name, self.directory / name)
            except ImgclfError as exc:
                log.warning(
                    "checkpoint %s/%s not downloaded (%s): skipped", self.remote_uri, name, exc
                )
        if names:
            log.info(
                "fetched %d checkpoint(s) from %s", min(len(names), self.keep), self.remote_uri
            )

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


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes what passes through to ``target``."""

    def __init__(self, target: BinaryIO) -> None:
        self.target = target
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha256.update(view)
        self.target.write(view)
        self.size += len(view)
        return len(view)


def snapshot(state: Any) -> Any:
    """A copy of ``state`` that training can no longer change: every tensor cloned to the
    CPU (the live parameters and optimizer moments are updated in place by the next step)."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: snapshot(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(snapshot(value) for value in state)
    return state


class BackgroundWriter:
    """Writes checkpoints on a thread while training goes on.

    A resnet18 checkpoint (weights, the best epoch's weights, two Adam moments) is ~180 MB:
    written, synced and hashed in the training loop it costs about a second per save, a
    third of a small epoch on a CPU. Here the loop only pays :func:`snapshot`; the file is
    written behind it. One write at a time: :meth:`submit` first waits for the previous one,
    so a slow disk slows training rather than piling up snapshots in memory. :meth:`wait`
    (before a preempted run exits, and before the run removes its checkpoints) returns once
    the last one is complete, and raises its error if it failed.
    """

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self._pending: concurrent.futures.Future[Path] | None = None

    def submit(self, state: dict[str, Any], *, global_step: int, epoch_end: bool) -> None:
        """Start writing a snapshot of ``state`` (to ``store.path_for`` the same step)."""
        self.wait()
        frozen = snapshot(state)
        self._pending = self._pool.submit(
            self.store.save, frozen, global_step=global_step, epoch_end=epoch_end
        )

    def wait(self) -> None:
        """Block until the write in flight (if any) is complete."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Finish the write in flight and stop the thread."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


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
