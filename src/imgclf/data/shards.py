"""A dataset dir's splits as tar shards in the WebDataset layout, with their index.

A dataset of millions of files is slow to copy, list, upload and read file by file: every
file costs a request or a directory lookup, whatever its size. Shards hold the same
samples in a few hundred large files that S3 moves at bandwidth and a loader reads
sequentially. The layout (``docs/CONTRACTS.md``, "Shards") is fixed:

``shards/<split>-<NNNNNN>.tar``
    plain uncompressed USTAR tar, members with mtime 0, uid/gid 0, no owner names and mode
    0644, so the same dataset always gives the same bytes. The split's samples in manifest
    order, undecodable files (rows with an ``error``) left out. Sample ``i`` of a split
    (from 0) has the key ``f"{i:08d}"`` and three members, in this order:
    ``<key>.<ext>`` (the stored image's bytes exactly, ``ext`` its lowercased suffix:
    ``jpg``, ``png``, ``webp``), ``<key>.cls`` (the label's index in ``classes``, ASCII
    decimal) and ``<key>.json`` (``{"label", "path", "sha256"}``: the manifest's path, the
    class name and the manifest's sha256, UTF-8).
``shards.json``
    ``{"format": "webdataset", "version": 1, "classes": [...], "splits": {split:
    {"samples": n, "shards": [{"name", "samples", "bytes", "sha256"}, ...]}}}``, every split
    present (``samples`` 0 and no shards when empty); written last, atomically.

A new shard starts when the next sample would take the current one's file size (end-of-
archive blocks and record padding included) past ``shard_bytes``; a shard holds at least
one sample, so only a single sample larger than the limit makes a larger shard.
"""

from __future__ import annotations

import array
import csv
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from imgclf.contracts import (
    DATASET_FILE,
    SHARDS_DIR,
    SHARDS_FILE,
    SHARDS_FORMAT,
    SHARDS_VERSION,
    SPLITS,
    manifest_file,
    read_dataset_info,
    read_json_object,
    sample_key,
    shard_name,
    shard_order,
)
from imgclf.errors import DataError
from imgclf.fsutil import write_json

_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_END_OF_ARCHIVE = 2 * _BLOCK
_RESERVED_EXTS = ("cls", "json")
_READ_CHUNK = 1 << 20


def member_bytes(size: int) -> int:
    """Bytes a member of ``size`` bytes takes in a USTAR archive: header + padded data."""
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


def archive_bytes(content: int) -> int:
    """File size of a tar whose members take ``content`` bytes, as :mod:`tarfile` closes it:
    two zero blocks, then padding to a whole record (10240 bytes)."""
    return -(-(content + _END_OF_ARCHIVE) // _RECORD) * _RECORD


class _HashingSink:
    """A write-only file object that hashes and counts what passes through to ``fh``."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._fh.write(data)
        self.digest.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class _ShardWriter:
    """One shard being written: to a hidden temp name, hashed as written, renamed on close."""

    def __init__(self, dataset_dir: Path, name: str) -> None:
        self.name = name
        self.path = dataset_dir / name
        self.tmp = self.path.with_name(f".{self.path.name}.part")
        self.fh = open(self.tmp, "wb")  # noqa: SIM115 (closed in close/abort)
        self.sink = _HashingSink(self.fh)
        self.tar = tarfile.TarFile(fileobj=self.sink, mode="w", format=tarfile.USTAR_FORMAT)  # type: ignore[arg-type]
        self.samples = 0
        self.content = 0

    def fits(self, size: int, limit: int) -> bool:
        """Whether a sample whose members take ``size`` bytes may still go into this shard."""
        return self.samples == 0 or archive_bytes(self.content + size) <= limit

    def add(self, members: list[tuple[str, bytes]]) -> None:
        for name, data in members:
            self.tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
            self.content += member_bytes(len(data))
        self.samples += 1

    def close(self) -> dict[str, Any]:
        """Finish the archive, move it into place; its entry for ``shards.json``."""
        self.tar.close()
        self.fh.close()
        os.replace(self.tmp, self.path)
        return {
            "name": self.name,
            "samples": self.samples,
            "bytes": self.sink.size,
            "sha256": self.sink.digest.hexdigest(),
        }

    def abort(self) -> None:
        self.fh.close()
        self.tmp.unlink(missing_ok=True)


class _Manifest:
    """The manifest read one row at a time, each row with the byte offset it starts at, and
    read again at such an offset: so the shards can be written in a shuffled order while
    only an array of offsets (8 bytes a row) is held, never the rows themselves."""

    def __init__(self, fh: BinaryIO, path: Path) -> None:
        self.fh, self.path = fh, path
        self.fh.seek(0)
        self.fields = next(csv.reader(self._lines()), [])
        absent = {"path", "label", "split", "sha256", "error"} - set(self.fields)
        if absent:
            raise DataError(f"{path}: missing column(s) {', '.join(sorted(absent))}")

    def _lines(self) -> Iterator[str]:
        self.consumed = self.fh.tell()
        for raw in self.fh:  # csv asks for lines one record at a time, never ahead
            self.consumed += len(raw)
            yield raw.decode("utf-8")

    def rows(self) -> Iterator[tuple[int, dict[str, str]]]:
        """(offset, row) for every row after the header, in file order."""
        self.fh.seek(0)
        lines = self._lines()
        reader = csv.reader(lines)
        next(reader, None)
        while True:
            start = self.consumed
            record = next(reader, None)
            if record is None:
                return
            yield start, dict(zip(self.fields, record, strict=False))

    def row_at(self, offset: int) -> dict[str, str]:
        """The row starting at byte ``offset`` (one that :meth:`rows` reported)."""
        self.fh.seek(offset)
        record = next(csv.reader(self._lines()))
        return dict(zip(self.fields, record, strict=False))


def _sample(
    dataset_dir: Path, row: dict[str, str], key: str, label: int
) -> list[tuple[str, bytes]]:
    """The members of one sample, its image read from the dataset dir and checked."""
    image = dataset_dir / row["path"]
    ext = Path(row["path"]).suffix.lower().lstrip(".")
    if not ext or ext in _RESERVED_EXTS:
        raise DataError(f"{image}: suffix {ext!r} cannot name an image member of a shard")
    try:
        data = image.read_bytes()
    except OSError as exc:
        raise DataError(f"{image}: cannot read it to write shards: {exc}") from None
    if hashlib.sha256(data).hexdigest() != row["sha256"]:
        raise DataError(f"{image}: content differs from the manifest's sha256; rerun ingest")
    meta = {"path": row["path"], "label": row["label"], "sha256": row["sha256"]}
    return [
        (f"{key}.{ext}", data),
        (f"{key}.cls", str(label).encode("ascii")),
        (f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")),
    ]


def write_shards(
    dataset_dir: str | Path, *, shard_bytes: int, progress: bool = True, seed: int = 0
) -> dict[str, Any]:
    """Write ``shards/`` and ``shards.json`` of a dataset dir from its manifest and images;
    returns the index.

    Each split's samples go in :func:`~imgclf.contracts.shard_order` (seeded by ``seed``),
    not in the class-grouped manifest order, so that every shard mixes every class. The
    manifest's usable rows are held as small records (path, label, sha256); image bytes
    only one sample at a time, besides the tar writer's buffer. Any earlier ``shards.json``
    is removed first and stale shards of an earlier write are deleted before the new index
    is written.
    """
    from tqdm import tqdm

    if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes < 1:
        raise DataError(f"shard_bytes: expected a positive integer, got {shard_bytes!r}")
    root = Path(dataset_dir)
    info = read_dataset_info(root)
    classes = [str(c) for c in info["classes"]]
    label_index = {c: i for i, c in enumerate(classes)}
    (root / SHARDS_FILE).unlink(missing_ok=True)
    (root / SHARDS_DIR).mkdir(exist_ok=True)
    open_shards: dict[str, _ShardWriter] = {}
    done: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)
    total = info.get("num_images", 0) - info.get("num_errors", 0)
    manifest_path = manifest_file(root)
    manifest_fh = open(manifest_path, "rb")  # noqa: SIM115 (closed in the finally below)
    offsets: dict[str, array.array[int]] = {s: array.array("q") for s in SPLITS}
    try:
        manifest = _Manifest(manifest_fh, manifest_path)
        for offset, row in manifest.rows():
            if row["error"] or row["split"] not in counts:
                continue  # undecodable, or a split validate reports: nothing to train on
            if row["label"] not in label_index:
                raise DataError(
                    f"{manifest_path}: label {row['label']!r} of {row['path']} is "
                    f"not among the classes of {root / DATASET_FILE}"
                )
            offsets[row["split"]].append(offset)
    except BaseException:
        manifest_fh.close()
        raise
    ordered = (
        (split, manifest.row_at(rows[i]))
        for split, rows in offsets.items()
        for i in shard_order(len(rows), seed)
    )
    try:
        with tqdm(
            total=total, desc="shards", unit="img", disable=None if progress else True
        ) as bar:
            for split, row in ordered:
                members = _sample(root, row, sample_key(counts[split]), label_index[row["label"]])
                size = sum(member_bytes(len(data)) for _, data in members)
                writer = open_shards.get(split)
                if writer is not None and not writer.fits(size, shard_bytes):
                    done[split].append(open_shards.pop(split).close())
                    writer = None
                if writer is None:
                    writer = open_shards[split] = _ShardWriter(
                        root, shard_name(split, len(done[split]))
                    )
                writer.add(members)
                counts[split] += 1
                bar.update()
        for split in SPLITS:
            if split in open_shards:
                done[split].append(open_shards.pop(split).close())
    finally:
        manifest_fh.close()
        for writer in open_shards.values():
            writer.abort()
    names = {entry["name"] for entries in done.values() for entry in entries}
    for path in (root / SHARDS_DIR).iterdir():
        if f"{SHARDS_DIR}/{path.name}" not in names and path.is_file():
            path.unlink()
    index = {
        "format": SHARDS_FORMAT,
        "version": SHARDS_VERSION,
        "order_seed": seed,
        "classes": classes,
        "splits": {s: {"samples": counts[s], "shards": done[s]} for s in SPLITS},
    }
    write_json(root / SHARDS_FILE, index)
    return index


def read_index(dataset_dir: str | Path) -> dict[str, Any]:
    """``shards.json`` of a dataset dir, checked against the format; DataError naming it."""
    path = Path(dataset_dir) / SHARDS_FILE
    if not path.is_file():
        raise DataError(
            f"{path}: not found; the dataset has no shards (rerun ingest with ingest.shards: true)"
        )
    index = read_json_object(path)
    if index.get("format") != SHARDS_FORMAT or index.get("version") != SHARDS_VERSION:
        raise DataError(
            f"{path}: format {index.get('format')!r} version {index.get('version')!r}; this "
            f"imgclf reads {SHARDS_FORMAT!r} version {SHARDS_VERSION} (rerun ingest)"
        )
    classes = index.get("classes")
    splits = index.get("splits")
    if not isinstance(classes, list) or not classes:
        raise DataError(f"{path}: 'classes' must be a non-empty list")
    if not isinstance(splits, dict) or set(splits) != set(SPLITS):
        raise DataError(f"{path}: 'splits' must hold exactly {', '.join(SPLITS)}")
    for split, entry in splits.items():
        _check_split(path, split, entry)
    return index


def _check_split(path: Path, split: str, entry: Any) -> None:
    shards = entry.get("shards") if isinstance(entry, dict) else None
    samples = entry.get("samples") if isinstance(entry, dict) else None
    if not isinstance(shards, list) or not isinstance(samples, int) or isinstance(samples, bool):
        raise DataError(f"{path}: splits.{split} needs an integer 'samples' and a 'shards' list")
    for shard in shards:
        ok = (
            isinstance(shard, dict)
            and isinstance(shard.get("name"), str)
            and shard["name"].startswith(f"{SHARDS_DIR}/")
            and ".." not in shard["name"].split("/")
            and all(isinstance(shard.get(k), int) for k in ("samples", "bytes"))
            and isinstance(shard.get("sha256"), str)
        )
        if not ok:
            raise DataError(f"{path}: splits.{split}: malformed shard entry {shard!r}")
    if sum(s["samples"] for s in shards) != samples:
        raise DataError(f"{path}: splits.{split}: 'samples' is not the sum over its shards")


def verify_shards(dataset_dir: str | Path) -> None:
    """Check every shard's size and sha256 against ``shards.json``; DataError naming the
    first shard that is missing or differs."""
    root = Path(dataset_dir)
    index = read_index(root)
    for split in SPLITS:
        for shard in index["splits"][split]["shards"]:
            path = root / shard["name"]
            if not path.is_file():
                raise DataError(f"{path}: shard listed in {root / SHARDS_FILE} is missing")
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                while chunk := fh.read(_READ_CHUNK):
                    digest.update(chunk)
            if path.stat().st_size != shard["bytes"] or digest.hexdigest() != shard["sha256"]:
                raise DataError(
                    f"{path}: size or sha256 differs from {root / SHARDS_FILE}; the shard is "
                    "corrupt or was replaced (rerun ingest)"
                )
