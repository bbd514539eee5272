"""The files the steps hand to each other, defined once (see docs/CONTRACTS.md).

Every step, the registry, the data loader and the test factories read and write the dataset,
model, evaluation and registry-marker formats through this module, so a column, a file name
or the dataset hash cannot drift between a writer and its readers. It sits at the bottom of
the layering and imports only the standard library, :mod:`imgclf.errors` and
:mod:`imgclf.fsutil`, so anything may import it without pulling in torch, pandas or GX.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from imgclf.errors import DataError
from imgclf.fsutil import sha256_file, write_json

# -- dataset dir (ingest -> validate, train, evaluate) -------------------------------------

SPLITS = ("train", "val", "test")
"""Split names, in output order; images live under ``images/<split>/<class>/``."""

IMAGES_DIR = "images"
MANIFEST_FILE = "manifest.csv"
DATASET_FILE = "dataset.json"

MANIFEST_COLUMNS = (
    "path",
    "label",
    "split",
    "width",
    "height",
    "mode",
    "bytes",
    "sha256",
    "stored",
    "conversion",
    "error",
)
"""Columns of ``manifest.csv``, in order."""

MANIFEST_NUMERIC_COLUMNS = ("width", "height", "bytes")
"""The manifest columns holding integers; every other column is text (a label may be "3")."""


@dataclasses.dataclass(frozen=True, slots=True)  # slots: ingest holds one per image
class ManifestRow:
    """One line of ``manifest.csv``; width/height/mode are None for undecodable files."""

    path: str
    label: str
    split: str
    width: int | None
    height: int | None
    mode: str | None
    bytes: int
    sha256: str
    error: str = ""
    stored: str = "kept"
    """``kept``: the source file's own bytes; ``converted``: re-encoded by ingest."""
    conversion: str = ""
    """Why a converted file was converted (``mode CMYK``, ``exif-orientation 6``, ...)."""

    def as_csv(self) -> dict[str, str]:
        """The row as CSV text fields (None becomes an empty cell)."""
        values = (getattr(self, name) for name in MANIFEST_COLUMNS)
        return {
            k: "" if v is None else str(v) for k, v in zip(MANIFEST_COLUMNS, values, strict=True)
        }


SHARDS_DIR = "shards"
SHARDS_FILE = "shards.json"
SHARDS_FORMAT = "webdataset"
SHARDS_VERSION = 2  # 2: samples in shard_order, seeded by shards.json order_seed
"""A dataset dir's tar shards (``shards/<split>-<NNNNNN>.tar``) and their index
(``shards.json``); the layout is in docs/CONTRACTS.md, writer and index reader in
:mod:`imgclf.data.shards`."""


def shard_name(split: str, index: int) -> str:
    """Where shard ``index`` (from 0) of ``split`` lives, relative to the dataset dir."""
    return f"{SHARDS_DIR}/{split}-{index:06d}.tar"


def sample_key(position: int) -> str:
    """The key of a split's sample at 0-based ``position``: the stem of its tar members."""
    return f"{position:08d}"


def image_path(split: str, label: str, name: str) -> str:
    """Where an image lives, relative to the dataset dir (POSIX), as the manifest records it."""
    return f"{IMAGES_DIR}/{split}/{label}/{name}"


def write_manifest(path: Path, rows: Iterable[ManifestRow]) -> None:
    """Write ``manifest.csv`` with :data:`MANIFEST_COLUMNS` (UTF-8, ``\\n`` line ends)."""
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(row.as_csv())


def _dataset_file(dataset_dir: str | Path, name: str) -> Path:
    """``dataset_dir/name``; DataError naming it when missing, so the user reruns ingest."""
    path = Path(dataset_dir) / name
    if not path.is_file():
        raise DataError(
            f"{path}: not found; is {dataset_dir} a dataset dir written by `imgclf ingest`?"
        )
    return path


def read_manifest(
    dataset_dir: str | Path, required: Collection[str] = ("path", "label", "split")
) -> list[dict[str, str]]:
    """The rows of ``manifest.csv`` as text, in file order (row ``i`` is on line ``i + 2``).

    Only ``required`` columns must be present: a reader names what it uses, so a manifest
    missing an unrelated column is still readable (validate reports the full column set).
    """
    path = manifest_file(dataset_dir)
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        absent = set(required) - set(reader.fieldnames or [])
        if absent:
            raise DataError(f"{path}: missing column(s) {', '.join(sorted(absent))}")
        return list(reader)


def manifest_file(dataset_dir: str | Path) -> Path:
    """The path of ``manifest.csv`` for readers with their own parser (pandas in validate)."""
    return _dataset_file(dataset_dir, MANIFEST_FILE)


def compute_dataset_hash(rows: Iterable[ManifestRow | Mapping[str, Any]]) -> str:
    """sha256 of the sorted ``path,label,split,sha256`` lines joined by newlines (UTF-8).

    Identifies the dataset's content and labelling independently of file timestamps or
    manifest column order; accepts manifest rows or dicts read back from ``manifest.csv``.
    """
    lines = []
    for row in rows:
        r = row.as_csv() if isinstance(row, ManifestRow) else row
        lines.append(f"{r['path']},{r['label']},{r['split']},{r['sha256']}")
    return hashlib.sha256("\n".join(sorted(lines)).encode("utf-8")).hexdigest()


def write_dataset(
    dataset_dir: Path,
    rows: Sequence[ManifestRow],
    *,
    source: str,
    image_format: str,
    seed: int,
    split: Mapping[str, float],
) -> dict[str, Any]:
    """Write ``manifest.csv`` and ``dataset.json`` for images already in place; returns the
    ``dataset.json`` content.

    ``split`` is the ratios the split was drawn with; counts cover the known splits only,
    since an image in any other split is a defect that validate reports.
    """
    write_manifest(dataset_dir / MANIFEST_FILE, rows)
    classes = sorted({r.label for r in rows})
    tally = Counter((r.split, r.label) for r in rows)
    record = {
        "classes": classes,
        "counts": {s: {c: tally[(s, c)] for c in classes} for s in SPLITS},
        "num_images": len(rows),
        "num_errors": sum(1 for r in rows if r.error),
        "source": source,
        "hash": compute_dataset_hash(rows),
        "image_format": image_format,
        "seed": seed,
        "split": dict(split),
    }
    write_json(dataset_dir / DATASET_FILE, record)
    return record


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from ``path`` (which exists); DataError naming it when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


def read_dataset_info(dataset_dir: str | Path) -> dict[str, Any]:
    """``dataset.json`` of a dataset dir, checked to list at least one class."""
    path = _dataset_file(dataset_dir, DATASET_FILE)
    info = read_json_object(path)
    if not isinstance(info.get("classes"), list) or not info["classes"]:
        raise DataError(f"{path}: 'classes' must be a non-empty list")
    return info


def read_dataset_hash(dataset_dir: str | Path) -> str:
    """The content hash ingest recorded in ``dataset.json`` (not recomputed: reading the
    manifest's sha256s back would trust the same files anyway, at the cost of a full read)."""
    path = _dataset_file(dataset_dir, DATASET_FILE)
    value = read_json_object(path).get("hash")
    if not isinstance(value, str) or not value:
        raise DataError(f"{path}: has no 'hash'; rerun ingest")
    return value


# -- model dir (train -> evaluate, deploy, registry) -----------------------------------------

MODEL_FILE = "model.json"
HISTORY_FILE = "history.csv"  # per-epoch train/val loss and accuracy, in the model dir
WEIGHTS_FILE = "model.safetensors"
EXPORT_FILE = "model.pt2"  # torch.export program for other runtimes; imgclf serve loads safetensors


def read_model_json(model_dir: str | Path) -> dict[str, Any]:
    """``model.json`` of a model dir (architecture, classes, input size, dataset hash, ...)."""
    path = Path(model_dir) / MODEL_FILE
    if not path.is_file():
        raise DataError(f"{path}: model metadata not found")
    return read_json_object(path)


def model_dir_files(model_dir: Path) -> dict[str, Path]:
    """Relative POSIX path -> file of everything that makes up a model dir.

    Hidden files (temp files, editor droppings) are not part of the model: they are neither
    published nor listed with a checksum.
    """
    files = {}
    for path in sorted(Path(model_dir).rglob("*")):
        rel = path.relative_to(model_dir)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            files[rel.as_posix()] = path
    return files


def model_dir_checksums(model_dir: Path) -> dict[str, str]:
    """Relative POSIX path -> sha256 of every file of a model dir (the registry marker's list)."""
    return {rel: sha256_file(path) for rel, path in model_dir_files(model_dir).items()}


CHECKSUMS_FILE = "checksums.json"
"""A model dir's own record of its files' sha256, written last by train.

The registry's ``READY`` marker lives beside the model dir, not in it, so a model server
given only the dir (KServe's storage initializer copies just ``.../model`` to
``/mnt/models``) checks the files against this record instead."""


def write_model_checksums(model_dir: Path) -> dict[str, str]:
    """Record the sha256 of every file of ``model_dir`` in its ``checksums.json``."""
    files = {
        rel: sha
        for rel, sha in model_dir_checksums(Path(model_dir)).items()
        if rel != CHECKSUMS_FILE
    }
    write_json(Path(model_dir) / CHECKSUMS_FILE, {"files": files})
    return files


def read_model_checksums(model_dir: Path) -> dict[str, str]:
    """The ``{relative path: sha256}`` a model dir's ``checksums.json`` records."""
    path = Path(model_dir) / CHECKSUMS_FILE
    if not path.is_file():
        raise DataError(
            f"{path}: missing; the model dir carries no checksums to verify (retrain it, or "
            "serve the version from the registry)"
        )
    files = read_json_object(path).get("files")
    if not isinstance(files, dict) or not files:
        raise DataError(f"{path}: expected {{'files': {{path: sha256}}}}")
    return {str(k): str(v) for k, v in files.items()}


# -- evaluation dir (evaluate -> deploy) -------------------------------------------------------

METRICS_FILE = "metrics.json"
"""Flat scalars only (:data:`EVAL_METRICS_KEYS`), so that ``dvc metrics show`` fits a terminal."""
EVAL_METRICS_KEYS = (
    "accuracy",
    "loss",
    "macro_f1",
    "top_k_accuracy",
    "passed",
    "champion_accuracy",
)
"""The keys of the evaluation's ``metrics.json``: numbers, the boolean gate, and the
champion's accuracy (None when there is no champion or it is unknown)."""
EVAL_REPORT_FILE = "report.json"
"""Beside ``metrics.json``: ``top_k``, ``num_images``, ``classes``, ``per_class``
(``{class: {precision, recall, f1, support}}``), ``confusion_matrix`` (rows actual, columns
predicted, in ``classes`` order), ``reasons`` (the gate's), ``champion`` (``{version,
accuracy, source}`` or None), ``model`` and ``dataset_hash``."""
PER_CLASS_FILE = "per_class.csv"
"""One row per class, for ``dvc plots`` (a bar chart per metric)."""
PER_CLASS_COLUMNS = ("class", "precision", "recall", "f1", "support")
PREDICTIONS_FILE = "predictions.csv"
"""One row per test image: the deploy smoke test asks the server about the same files."""
PREDICTIONS_COLUMNS = ("path", "actual", "predicted", "probability")


def read_eval_predictions(eval_dir: str | Path) -> list[dict[str, str]]:
    """The evaluation's ``predictions.csv`` rows (path relative to the dataset dir)."""
    path = Path(eval_dir) / PREDICTIONS_FILE
    if not path.is_file():
        raise DataError(f"{path}: per-image predictions not found (rerun evaluate)")
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if rows and set(PREDICTIONS_COLUMNS) - set(rows[0]):
        raise DataError(f"{path}: expected columns {', '.join(PREDICTIONS_COLUMNS)}")
    return rows


def read_eval_metrics(eval_dir: str | Path) -> dict[str, Any]:
    """The evaluation's ``metrics.json``, checked to carry the boolean ``passed`` gate."""
    path = Path(eval_dir) / METRICS_FILE
    if not path.is_file():
        raise DataError(f"{path}: evaluation metrics not found")
    metrics = read_json_object(path)
    if not isinstance(metrics.get("passed"), bool):
        raise DataError(f"{path}: missing the boolean 'passed' flag")
    return metrics


def read_eval_report(eval_dir: str | Path) -> dict[str, Any]:
    """The evaluation's ``report.json`` (per-class scores, the gate's reasons, the champion)."""
    path = Path(eval_dir) / EVAL_REPORT_FILE
    if not path.is_file():
        raise DataError(f"{path}: evaluation report not found (rerun evaluate)")
    report = read_json_object(path)
    if not isinstance(report.get("reasons"), list):
        raise DataError(f"{path}: missing the list of gate 'reasons'")
    return report


# -- publish markers -----------------------------------------------------------------------
# A store cannot write many objects atomically, so a published tree (a step's output with its
# `_SUCCESS`, a registry version with its `READY`) counts only once its marker, written last,
# lists every file with its sha256; readers check what they download against that list.

SUCCESS_FILE = "_SUCCESS"
"""Written last into a step output on a store (see :mod:`imgclf.storage.staging`)."""


def publish_marker(files: Mapping[str, str], published_at: str) -> dict[str, Any]:
    """The marker of a published tree: ``{relative path: sha256}`` and when it was written."""
    return {"files": dict(files), "published_at": published_at}


READY_FILE = "READY"
"""Written last into a registry version; a version without it does not exist."""


def ready_marker(version: int, created_at: str, files: Mapping[str, str]) -> dict[str, Any]:
    """The ``READY`` content: every published file with its sha256, the weights' one apart
    (it identifies the model, so a rerun of deploy finds a version it already published)."""
    return {
        "version": version,
        "created_at": created_at,
        "files": dict(files),
        "model_sha256": files.get(WEIGHTS_FILE),
    }


def marker_files(marker: Mapping[str, Any]) -> dict[str, str]:
    """The ``{relative path: sha256}`` a ``READY`` or ``_SUCCESS`` marker lists (empty for a
    bare marker)."""
    return {str(k): str(v) for k, v in (marker.get("files") or {}).items()}


def shard_order(count: int, seed: int) -> list[int]:
    """The split positions (manifest order) in the order the shards hold them.

    The manifest is grouped by class; shards written in that order would give a streaming
    reader, whose shuffle buffer mixes only a few thousand samples at a time, batches of one
    or two classes. So the writer permutes each split with this seeded shuffle (the seed is
    ``order_seed`` in ``shards.json``), and the reader maps shard position ``i`` back to the
    manifest row ``shard_order(n, seed)[i]``. ``random.Random``'s shuffle is stable across
    Python versions, so both ends agree.
    """
    import random

    order = list(range(count))
    random.Random(seed).shuffle(order)
    return order
