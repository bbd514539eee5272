"""Where a step reads a dataset's samples from: the ``images/`` tree or the tar shards,
local or under ``s3://`` (``train.data``).

Kept apart from :mod:`imgclf.data.shard_reader` (the torch dataset) so that the CLI can stage
a dataset without importing torch. :func:`dataset_input` stages a remote dataset that has
shards by downloading only its ``manifest.csv``, ``dataset.json`` and ``shards.json``; the
local dir then names the dataset URI in ``.shards-uri``, and every shard reader opened on it
streams the shards from there, in the DataLoader workers and the ranks of a distributed job
alike (they are handed the dir, nothing else).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from imgclf.config import AUTO, DATA_MODES
from imgclf.contracts import (
    DATASET_FILE,
    IMAGES_DIR,
    MANIFEST_FILE,
    SHARDS_FILE,
    SUCCESS_FILE,
    marker_files,
)
from imgclf.data.shards import read_index
from imgclf.errors import DataError, StorageError
from imgclf.fsutil import files_not_matching
from imgclf.storage import is_remote, open_store
from imgclf.storage.staging import local_input

REMOTE_SHARDS_FILE = ".shards-uri"
"""In a dir staged by :func:`dataset_input`: the dataset URI the shards are read from."""


def check_data_mode(data: str) -> None:
    """Refuse an unknown ``train.data``."""
    if data not in DATA_MODES:
        raise DataError(f"train.data={data!r} is unknown; choices: {', '.join(DATA_MODES)}")


def use_shards(dataset_dir: Path, data: str = AUTO) -> bool:
    """Whether to read ``dataset_dir`` from its shards (``train.data``).

    ``auto``: the ``images/`` tree when the dir has one, else the shards (a dataset written
    without images, or a remote one staged by :func:`dataset_input`). ``images`` and
    ``shards`` insist, and a dataset without that layout is a DataError.
    """
    check_data_mode(data)
    root = Path(dataset_dir)
    images, shards = (root / IMAGES_DIR).is_dir(), (root / SHARDS_FILE).is_file()
    if data == "shards" and not shards:
        raise DataError(f"{root}: train.data=shards but the dataset has no {SHARDS_FILE}")
    if data == "images" and not images and shards:
        raise DataError(
            f"{root}: train.data=images but the dataset has no {IMAGES_DIR}/ (only shards); "
            "use auto or shards"
        )
    return data == "shards" or (data == AUTO and shards and not images)


@dataclasses.dataclass(frozen=True)
class ShardRef:
    """One shard of a split, as ``shards.json`` lists it, with where to read it."""

    url: str
    samples: int
    bytes: int
    sha256: str
    first: int
    """Position in the split of the shard's first sample."""


def shard_refs(dataset_dir: Path, split: str) -> list[ShardRef]:
    """The shards of ``split``: under ``dataset_dir``, or under the URI a staged dir names."""
    root = Path(dataset_dir)
    index = read_index(root)
    remote = root / REMOTE_SHARDS_FILE
    base = remote.read_text(encoding="utf-8").strip() if remote.is_file() else None
    refs, first = [], 0
    for entry in index["splits"][split]["shards"]:
        url = f"{base}/{entry['name']}" if base else str(root / entry["name"])
        refs.append(ShardRef(url, entry["samples"], entry["bytes"], entry["sha256"], first))
        first += entry["samples"]
    return refs


@contextlib.contextmanager
def dataset_input(uri: str | Path, data: str = AUTO) -> Iterator[Path]:
    """A local dataset dir for a step, like :func:`~imgclf.storage.staging.local_input`,
    except that a remote dataset with shards is streamed instead of downloaded.

    With ``data`` ``auto`` or ``shards`` and a remote dataset holding ``shards.json``, only
    ``manifest.csv``, ``dataset.json`` and ``shards.json`` are downloaded (checked against the
    ``_SUCCESS`` marker's sha256s), and the dir names the dataset URI, so that
    :class:`~imgclf.data.shard_reader.ShardDataset` streams the shards from there. Otherwise
    the whole tree is staged as before (``images``, or a dataset without shards).
    """
    check_data_mode(data)
    if not is_remote(uri) or data == "images":
        with local_input(uri) as local:
            yield local
        return
    text = str(uri).rstrip("/")
    store = open_store(text)
    if not store.exists(SHARDS_FILE):
        if data == "shards":
            raise DataError(f"{text}: train.data=shards but the dataset has no {SHARDS_FILE}")
        with local_input(uri) as local:
            yield local
        return
    if not store.exists(SUCCESS_FILE):
        raise StorageError(
            f"{text}: no {SUCCESS_FILE} marker; the step that writes it failed or did not "
            "finish (or wrote elsewhere): run it again"
        )
    tmp = Path(tempfile.mkdtemp(prefix="imgclf-in-"))
    try:
        names = (MANIFEST_FILE, DATASET_FILE, SHARDS_FILE)
        for name in names:
            store.download_file(name, tmp / name)
        _check_marker(store.read_bytes(SUCCESS_FILE), tmp, names, text)
        (tmp / REMOTE_SHARDS_FILE).write_text(text + "\n", encoding="utf-8")
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_marker(raw: bytes, root: Path, names: Sequence[str], uri: str) -> None:
    """The staged files are the ones the ``_SUCCESS`` marker lists (an empty marker, from an
    older writer, lists none)."""
    if not raw.strip():
        return
    try:
        listed = marker_files(json.loads(raw))
    except (ValueError, TypeError, AttributeError, KeyError):
        raise StorageError(f"{uri}/{SUCCESS_FILE}: not a valid marker") from None
    expected = {name: listed.get(name, "") for name in names}
    bad = files_not_matching(root, expected)
    if bad:
        raise StorageError(
            f"{uri}: {', '.join(bad)} differ from the {SUCCESS_FILE} entries; the dataset was "
            "probably rewritten while it was read: run the step again"
        )
