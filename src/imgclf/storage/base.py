"""The :class:`Store` protocol and the URI dispatch shared by every backend."""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Protocol, runtime_checkable

from imgclf.contracts import READY_FILE, publish_marker


@runtime_checkable
class Store(Protocol):
    """A tree of objects addressed by ``/``-separated keys relative to the store's root.

    Writes of single objects are atomic for readers (temp + rename locally, a single PUT on
    S3). Multi-object publishes (a model version) are made atomic one level up, by writing a
    marker object last and only trusting prefixes that have it.
    """

    uri: str

    def exists(self, key: str) -> bool:
        """True if an object exists at ``key``."""
        ...

    def list(self, prefix: str = "", recursive: bool = True) -> list[str]:
        """Keys under ``prefix`` (sorted); non-recursive lists one level, dirs end with '/'."""
        ...

    def read_bytes(self, key: str) -> bytes:
        """The object's content; StorageError naming the key if it is missing."""
        ...

    def write_bytes(self, key: str, data: bytes) -> None:
        """Create or replace one object atomically."""
        ...

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Create ``key`` holding ``data`` only if no object exists there; True if this call
        created it, False if it already existed (or another writer holds it).

        Of any number of concurrent callers on one key, at most one ever gets True, and
        readers never see partial content. It is what lets writers that do not know of each
        other (two deploys, two hosts) agree on who owns a name, such as a version number.
        """
        ...

    def upload_file(self, path: Path, key: str) -> None:
        """Copy a local file to ``key``."""
        ...

    def download_file(self, key: str, path: Path) -> None:
        """Copy ``key`` to a local file (written to a temp name, then renamed)."""
        ...

    def upload_tree(
        self, local_dir: Path, prefix: str, *, sha256s: Mapping[str, str] | None = None
    ) -> list[str]:
        """Copy a local directory tree under ``prefix``; returns the keys written.

        ``sha256s`` (relative path -> hex digest) are hashes the caller already has: a store
        that records each object's sha256 uses them instead of reading the file once more.
        """
        ...

    def download_tree(self, prefix: str, local_dir: Path) -> list[Path]:
        """Copy every object under ``prefix`` into ``local_dir``; returns the files written."""
        ...

    def delete(self, key_or_prefix: str, recursive: bool = False) -> None:
        """Remove one object, or everything under a prefix when ``recursive``."""
        ...

    def content_sha256(self, key: str) -> str:
        """The sha256 of the bytes stored at ``key`` now, read in chunks; StorageError naming
        the key if it is missing.

        Always computed from the content, never taken from stored metadata: integrity checks
        compare it with what a marker recorded at publish time, and metadata is rewritten by
        whoever replaces the object, so it cannot vouch for the bytes.
        """
        ...

    def modified_times(self, prefix: str = "") -> dict[str, _dt.datetime]:
        """Last-modified time (timezone-aware UTC) of every key :meth:`list` returns under
        ``prefix``, from one listing; used to tell abandoned writes from running ones."""
        ...


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``); raises ValueError for other schemes."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri}")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    return bucket, prefix.strip("/")


def is_remote(uri: str | Path) -> bool:
    """True for URIs that need an object store rather than the local filesystem."""
    return str(uri).startswith("s3://")


def publish_tree(store: Store, local_dir: Path, prefix: str, marker: str = READY_FILE) -> list[str]:
    """Upload ``local_dir`` under ``prefix`` and write ``prefix/marker`` last; returns the keys.

    Many objects cannot be written atomically, so readers must trust only prefixes that carry
    the marker: a publish interrupted half-way (a crash, the store going down) leaves a prefix
    without it. Any old marker is removed first, so a re-publish over the same prefix is not
    trusted until it completes. The marker holds the file list with each file's sha256.
    """
    from imgclf.errors import StorageError
    from imgclf.fsutil import sha256_file

    local_dir = Path(local_dir)
    base = "/".join(p for p in prefix.split("/") if p)
    if not local_dir.is_dir():
        raise StorageError(f"{local_dir}: not a directory, nothing to publish")
    if (local_dir / marker).exists():
        raise StorageError(f"{local_dir / marker}: the name {marker!r} is reserved for the marker")
    marker_key = f"{base}/{marker}" if base else marker
    store.delete(marker_key)
    files = {
        p.relative_to(local_dir).as_posix(): sha256_file(p)
        for p in sorted(local_dir.rglob("*"))
        if p.is_file()
    }
    keys = store.upload_tree(local_dir, base, sha256s=files)  # each file hashed once
    manifest = publish_marker(files, _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    store.write_bytes(marker_key, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return keys


def is_published(store: Store, prefix: str, marker: str = READY_FILE) -> bool:
    """True if ``prefix`` carries its publish marker, i.e. every file of it was uploaded."""
    base = "/".join(p for p in prefix.split("/") if p)
    return store.exists(f"{base}/{marker}" if base else marker)


def run_parallel(workers: int, tasks: Sequence[Callable[[], None]]) -> None:
    """Run ``tasks`` on up to ``workers`` threads; the first failure cancels the rest and is
    raised. Per-object latency, not bandwidth, bounds a tree of small files on a remote store."""
    workers = min(workers, len(tasks))
    if workers <= 1:
        for task in tasks:
            task()
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="store-transfer")
    try:
        futures = [pool.submit(task) for task in tasks]
        wait(futures, return_when=FIRST_EXCEPTION)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    for future in futures:
        if not future.cancelled() and future.exception() is not None:
            raise future.exception()  # type: ignore[misc]
