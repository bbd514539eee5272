"""The S3 store (MinIO, SeaweedFS, AWS) on the ``minio`` SDK.

Why it is more than thin calls into the SDK:

- integrity: every upload carries its content's sha256 as user metadata
  (``x-amz-meta-sha256``) and every download is checked against it, so a truncated or
  corrupted artifact is an error instead of a model that silently predicts garbage;
- throughput: trees of many small files (datasets of PNGs) are transferred by a thread pool,
  since per-request latency, not bandwidth, bounds a sequential copy;
- large files (dataset shards, model weights) go up in multipart parts of ``part_size``
  and come down in ranged GETs of that size, several parts of one file at a time (one part
  in memory per part worker), so a few big files move at bandwidth too;
- flaky networks: 5xx answers are retried by urllib3 (exponential backoff with jitter) and
  dropped or refused connections by an outer loop with the same policy, bounded so that an
  unreachable endpoint fails within the configured timeout instead of hanging a pipeline;
- readers never see half a file: downloads go to a temp name, then are renamed.

Errors are :class:`~imgclf.errors.StorageError` with one line naming the endpoint, bucket
and key; the secret key never appears in them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import os
import threading
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import urllib3
from minio import Minio
from minio.datatypes import Part
from minio.deleteobjects import DeleteObject
from minio.error import S3Error
from minio.helpers import check_bucket_name

from imgclf.contracts import READY_FILE
from imgclf.errors import ConfigError, StorageError
from imgclf.fsutil import sha256_file
from imgclf.storage.base import is_published, publish_tree, run_parallel, split_uri
from imgclf.storage.progress import file_size, transfer_progress
from imgclf.storage.s3client import (
    NOT_FOUND,
    call_with_retries,
    content_type,
    describe_failure,
    make_client,
    make_http_client,
)
from imgclf.storage.s3config import S3Settings, resolve_s3_settings

log = logging.getLogger(__name__)

SHA256_METADATA = "sha256"  # the SDK sends it as x-amz-meta-sha256
SHA256_HEADER = "x-amz-meta-sha256"
_CHUNK = 1 << 20
# a conditional PUT that did not create the object: it exists (412), or a concurrent
# conditional write to the same key is in progress (409, AWS)
_NOT_CREATED = {"PreconditionFailed", "ConditionalRequestConflict"}
# answers of servers that do not implement conditional PUTs at all
_UNSUPPORTED = {"NotImplemented", "InvalidArgument", "InvalidRequest"}

T = TypeVar("T")


def _join(*parts: str) -> str:
    return "/".join(p for part in parts for p in part.split("/") if p)


class S3Store:
    """Objects under ``s3://bucket/prefix``; keys are ``/``-separated and relative to it."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        settings: S3Settings | None = None,
        *,
        client: Minio | None = None,
    ) -> None:
        try:
            check_bucket_name(bucket, strict=True)
        except ValueError:
            raise ConfigError(
                f"s3://{bucket}: invalid bucket name (3-63 lowercase letters, digits, '-', '.')"
            ) from None
        self.bucket = bucket
        self.prefix = _join(prefix)
        self.settings = settings if settings is not None else resolve_s3_settings()
        self._http: urllib3.PoolManager | None = None
        if client is None:
            self._http = make_http_client(self.settings)
            client = make_client(self.settings, self._http)
        self.client = client
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._bucket_ready = False
        self._conditional: bool | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_uri(cls, uri: str, settings: S3Settings | None = None) -> S3Store:
        """A store rooted at ``s3://bucket/prefix``; see :func:`resolve_s3_settings` if None."""
        try:
            bucket, prefix = split_uri(uri)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if "@" in bucket:  # s3://key:secret@bucket/...: say so without echoing the secret
            raise ConfigError(
                f"s3://{bucket.rpartition('@')[2]}/{prefix}: credentials do not belong in an S3 "
                "URI; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment"
            )
        if not bucket:
            raise ConfigError(f"{uri}: no bucket in the S3 URI (expected s3://bucket/prefix)")
        return cls(bucket, prefix, settings)

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r}, endpoint={self.settings.url!r})"

    def close(self) -> None:
        """Close pooled connections (the store stays usable; new ones are opened on demand)."""
        if self._http is not None:
            self._http.clear()

    # -- keys and errors ---------------------------------------------------------------

    def _name(self, key: str) -> str:
        """The object name in the bucket for a store-relative key."""
        parts = [p for p in key.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise StorageError(f"{self.uri}: key {key!r} leaves the store")
        return _join(self.prefix, *parts)

    def _tree(self, prefix: str) -> str:
        """``s3://bucket/prefix`` of a tree under this store, for progress bars."""
        return f"s3://{_join(self.bucket, self.prefix, prefix)}"

    def _where(self, key: str | None) -> str:
        if key is None:
            return f"s3://{self.bucket}"
        return f"s3://{self.bucket}/{self._name(key)}"

    def _error(
        self, action: str, key: str | None, exc: BaseException, attempts: int = 1
    ) -> StorageError:
        """One line naming endpoint, bucket and key, with the reason a user can act on."""
        reason = describe_failure(exc, self.bucket, self.settings.timeout)
        if attempts > 1:
            reason += f" (after {attempts} attempts)"
        text = f"cannot {action} {self._where(key)} at {self.settings.url}: {reason}"
        return StorageError(self.settings.redact(" ".join(text.split())))

    def _call(self, action: str, key: str | None, fn: Callable[[], T]) -> T:
        """Run one S3 operation with :func:`~imgclf.storage.s3client.call_with_retries`; any
        failure becomes one StorageError naming the endpoint, bucket and key."""
        return call_with_retries(
            fn,
            self.settings,
            fail=lambda exc, attempts: self._error(action, key, exc, attempts),
            what=lambda exc: (
                f"{action} {self._where(key)}: "
                f"{describe_failure(exc, self.bucket, self.settings.timeout)}"
            ),
        )

    def _verify(self, key: str, actual: str, expected: str | None) -> None:
        if expected and expected.strip().lower() != actual:
            raise StorageError(
                f"{self._where(key)} at {self.settings.url}: sha256 mismatch (metadata "
                f"{expected.strip()}, content {actual}); the object is corrupt or was replaced "
                "without updating x-amz-meta-sha256"
            )

    # -- buckets -----------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist: for callers that mean to create it
        (``imgclf dev s3 --bucket``); writes call :meth:`require_bucket` instead."""
        with self._lock:
            if self._bucket_ready:
                return
            self._call("create bucket", None, self._make_bucket)
            self._bucket_ready = True

    def _make_bucket(self) -> None:
        if self.client.bucket_exists(self.bucket):
            return
        try:
            self.client.make_bucket(self.bucket, location=self.settings.region)
        except S3Error as exc:
            # another writer created it first (parallel stages, other hosts)
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
            if not self.client.bucket_exists(self.bucket):
                raise

    def require_bucket(self) -> None:
        """StorageError unless the bucket exists (checked once per store; writes call this).

        A missing bucket is created only when ``settings.create_bucket`` asks for it: a typo
        in a bucket name would otherwise silently start a new, empty registry or dataset
        store that nothing else reads, instead of failing where the typo is.
        """
        with self._lock:
            if self._bucket_ready:
                return
            if self.settings.create_bucket:
                self._call("create bucket", None, self._make_bucket)
            elif not self._call(
                "check bucket", None, lambda: self.client.bucket_exists(self.bucket)
            ):
                raise StorageError(
                    f"bucket {self.bucket} does not exist at {self.settings.url}; create it "
                    f"(e.g. `imgclf dev s3 --bucket {self.bucket}` or `mc mb`) or set "
                    "s3.create_bucket: true (IMGCLF_S3_CREATE_BUCKET=true)"
                )
            self._bucket_ready = True

    # -- the Store protocol --------------------------------------------------------------

    def exists(self, key: str) -> bool:
        """True if an object exists at ``key`` (a "directory" prefix is not an object)."""
        if not _join(key):
            return False
        name = self._name(key)

        def stat() -> bool:
            try:
                self.client.stat_object(self.bucket, name)
            except S3Error as exc:
                if exc.code in NOT_FOUND:
                    return False
                raise
            return True

        return self._call("stat", key, stat)

    def list(self, prefix: str = "", recursive: bool = True) -> list[str]:
        """Keys under ``prefix`` (sorted); non-recursive lists one level, dirs end with '/'."""
        return sorted(key for key, _, _ in self._listing(prefix, recursive))

    def modified_times(self, prefix: str = "") -> dict[str, dt.datetime]:
        """Last-modified time (the server's clock, UTC) of every key under ``prefix``."""
        return {
            key: when
            for key, when, _ in self._listing(prefix, recursive=True)
            if isinstance(when, dt.datetime)
        }

    def _listing(self, prefix: str, recursive: bool) -> list[tuple[str, dt.datetime | None, int]]:
        """(store-relative key, last-modified, size) of the objects under ``prefix``, one LIST."""
        base = self._name(prefix)
        s3_prefix = base + "/" if base else ""
        cut = len(self.prefix) + 1 if self.prefix else 0

        def objects() -> list[tuple[str, dt.datetime | None, int]]:
            try:
                found = self.client.list_objects(self.bucket, prefix=s3_prefix, recursive=recursive)
                return [
                    (o.object_name, o.last_modified, o.size or 0) for o in found if o.object_name
                ]
            except S3Error as exc:
                if exc.code == "NoSuchBucket":
                    return []
                raise

        # zero-byte "folder/" marker objects made by some tools are not files
        return [
            (name[cut:], when, size)
            for name, when, size in self._call("list", prefix, objects)
            if name != s3_prefix and not (recursive and name.endswith("/"))
        ]

    def read_bytes(self, key: str) -> bytes:
        """The object's content, checked against its stored sha256."""
        name = self._require_name(key)

        def get() -> tuple[bytes, str | None]:
            response = self.client.get_object(self.bucket, name)
            try:
                return response.read(decode_content=False), response.headers.get(SHA256_HEADER)
            finally:
                response.close()
                response.release_conn()

        data, expected = self._call("read", key, get)
        self._verify(key, hashlib.sha256(data).hexdigest(), expected)
        return data

    def write_bytes(self, key: str, data: bytes) -> None:
        """Create or replace one object atomically (a single PUT, or one completed multipart)."""
        self._put_bytes("write", key, data)

    def _put_bytes(self, action: str, key: str, data: bytes) -> None:
        name = self._require_name(key)
        self.require_bucket()
        metadata: dict[str, Any] = {SHA256_METADATA: hashlib.sha256(data).hexdigest()}
        self._call(
            action,
            key,
            lambda: self.client.put_object(
                self.bucket,
                name,
                io.BytesIO(data),
                len(data),
                content_type=content_type(name),
                metadata=metadata,
                part_size=self.settings.part_size,
                num_parallel_uploads=1,
            ),
        )

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Create ``key`` only if no object is there: one PUT with ``If-None-Match: *``,
        which the server answers 412 when the object exists. AWS S3 and recent MinIO and
        SeaweedFS decide it atomically (SeaweedFS up to 4.16 let concurrent conditional PUTs
        all win, seaweedfs/seaweedfs#8800; the bundled 4.x release is checked by the tests).

        A server that ignores the header would let every writer win, so whether this
        endpoint enforces it is probed once per store (:meth:`conditional_writes`); where it
        does not, :meth:`_create_by_contention` decides with plain PUTs and a listing.
        A PUT retried after its answer was lost reads 412 and returns False: the caller
        then moves on, leaving an object nobody owns, which is safe.
        """
        name = self._require_name(key)
        self.require_bucket()
        if not self.conditional_writes():
            return self._create_by_contention(key, data)
        return self._call("create", key, lambda: self._put_if_absent(name, data))

    def conditional_writes(self) -> bool:
        """Whether the endpoint refuses a PUT with ``If-None-Match: *`` over an existing
        object; probed once per store by writing a scratch object twice (then deleted)."""
        with self._lock:
            if self._conditional is not None:
                return self._conditional
        probe = f".imgclf-probe-{uuid.uuid4().hex}"
        name = self._require_name(probe)
        self.require_bucket()

        def twice() -> bool:
            if not self._put_if_absent(name, b"1"):
                return False  # 412 on a key nobody wrote: not a server to rely on
            return not self._put_if_absent(name, b"2")

        try:
            enforced = self._call("probe conditional PUT", probe, twice)
        except StorageError as exc:
            if not isinstance(exc.__cause__, S3Error) or exc.__cause__.code not in _UNSUPPORTED:
                raise
            enforced = False
        finally:
            self.delete(probe)
        if not enforced:
            log.info("%s does not enforce If-None-Match on PUT: claims by listing", self)
        with self._lock:
            self._conditional = enforced
        return enforced

    def _put_if_absent(self, name: str, data: bytes) -> bool:
        """One PUT of ``data`` with ``If-None-Match: *``; False when the server refuses it
        because the object exists (412) or a concurrent conditional write won (409)."""
        put = getattr(self.client, "_put_object", None)
        if put is None:  # an SDK without it: report "not enforced", the listing protocol is used
            return False
        headers = {
            "Content-Type": content_type(name),
            SHA256_HEADER: hashlib.sha256(data).hexdigest(),
            "If-None-Match": "*",
        }
        try:
            # minio 7.2's put_object sends no request headers of ours (unknown keys become
            # x-amz-meta-*); _put_object is the single PUT it calls underneath
            put(self.bucket, name, data, headers=headers)
        except S3Error as exc:
            if exc.code in _NOT_CREATED:
                return False
            raise
        return True

    def _create_by_contention(self, key: str, data: bytes) -> bool:
        """Create-if-absent without conditional PUTs: each caller adds a contender object
        ``<key>.contenders/<random>``, lists them, and wins only if its own is the only one.

        Two winners would each have listed before the other's contender was written, while
        each wrote its own before listing: impossible on a store whose listings show every
        completed PUT (S3 is strongly consistent since 2020). Callers that see each other
        all lose, and contenders are never removed, so a contended key stays uncreated and
        every later caller loses too: safe, and the registry simply takes the next number.
        """
        if self.exists(key):
            return False
        contenders = f"{key}.contenders"
        mine = f"{contenders}/{uuid.uuid4().hex}"
        self._put_bytes("write", mine, b"")
        if self.list(contenders) != [mine]:
            return False
        self._put_bytes("create", key, data)
        return True

    def upload_file(
        self, path: Path, key: str, *, parallel: int | None = None, sha256: str | None = None
    ) -> None:
        """Copy a local file to ``key``, multipart above ``part_size``, with its sha256.

        A file of at most one part is read once and sent from memory, so the stored hash is
        the hash of exactly the bytes sent. Larger files are hashed, then sent as a
        multipart upload of ``parallel`` parts at a time (default ``settings.workers``),
        each part read from disk by the thread that sends it: at most ``parallel`` parts
        are in memory. (The SDK's own ``num_parallel_uploads`` reads the whole file into
        its queue ahead of the uploads.) A ``sha256`` the caller already has (a publish
        hashes every file for its marker) saves the large file's extra read.
        """
        path = Path(path)
        try:
            size = path.stat().st_size
        except OSError:
            size = -1
        if size < 0 or not path.is_file():
            raise StorageError(f"{path}: not a file, cannot upload it to {self._where(key)}")
        if size <= self.settings.part_size:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise StorageError(f"{path}: cannot read it for upload: {exc}") from None
            self._put_bytes("upload", key, data)
            return
        name = self._require_name(key)
        self.require_bucket()
        digest = sha256 or sha256_file(path)
        headers = {"Content-Type": content_type(name), SHA256_HEADER: digest}
        workers = self.settings.workers if parallel is None else max(1, parallel)
        self._call(
            "upload", key, lambda: self._multipart_upload(name, path, size, headers, workers)
        )

    def _multipart_upload(
        self, name: str, path: Path, size: int, headers: dict[str, str], workers: int
    ) -> None:
        """One multipart upload of ``path``, ``workers`` parts in flight; aborted on failure,
        so no orphaned parts stay billed on the server."""
        part_size = self.settings.part_size
        client = self.client
        upload_id = client._create_multipart_upload(self.bucket, name, dict(headers))

        def send(number: int) -> Part:
            offset = (number - 1) * part_size
            with open(path, "rb") as fh:
                fh.seek(offset)
                data = fh.read(min(part_size, size - offset))
            return Part(
                number, client._upload_part(self.bucket, name, data, None, upload_id, number)
            )

        try:
            numbers = range(1, -(-size // part_size) + 1)
            with ThreadPoolExecutor(min(workers, len(numbers)), "store-part") as pool:
                parts = list(pool.map(send, numbers))
            client._complete_multipart_upload(self.bucket, name, upload_id, parts)
        except BaseException:
            try:
                client._abort_multipart_upload(self.bucket, name, upload_id)
            except Exception as exc:  # the original failure is the one to report
                log.debug("abort of multipart upload %s failed: %s", upload_id, exc)
            raise

    def download_file(self, key: str, path: Path, *, parallel: int | None = None) -> None:
        """Copy ``key`` to ``path`` via a temp file in the same dir, checked, then renamed.

        One streamed GET, unless its answer says the object is larger than ``part_size``
        and ``parallel`` (default ``settings.workers``) is above 1: then that GET is dropped
        and the object comes down as ranged GETs of ``part_size``, ``parallel`` at a time,
        written at their offsets and hashed from the file afterwards. (No HEAD first: a tree
        of small files costs one request per file, as before.)
        """
        name = self._require_name(key)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        workers = self.settings.workers if parallel is None else max(1, parallel)

        def get() -> None:
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.part")
            ranged: tuple[int, str, str | None] | None = None
            try:
                response = self.client.get_object(self.bucket, name)
                try:
                    size = int(response.headers.get("content-length") or 0)
                    expected = response.headers.get(SHA256_HEADER)
                    if workers > 1 and size > self.settings.part_size:
                        ranged = (size, (response.headers.get("etag") or "").strip('"'), expected)
                    else:
                        digest = hashlib.sha256()
                        with open(tmp, "wb") as fh:
                            for chunk in response.stream(_CHUNK, decode_content=False):
                                fh.write(chunk)
                                digest.update(chunk)
                finally:
                    response.close()
                    response.release_conn()
                if ranged is not None:
                    self._ranged_download(key, name, tmp, *ranged, workers)
                else:
                    self._verify(key, digest.hexdigest(), expected)
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

        self._call("download", key, get)

    def _ranged_download(
        self,
        key: str,
        name: str,
        tmp: Path,
        size: int,
        etag: str,
        expected: str | None,
        workers: int,
    ) -> None:
        """``workers`` ranged GETs at a time into ``tmp``, each pinned to ``etag`` (an object
        replaced meanwhile fails instead of mixing versions), then checked against
        ``expected``."""
        part_size = self.settings.part_size
        pinned = {"If-Match": f'"{etag}"'} if etag else None

        def fetch(fd: int, offset: int) -> None:
            length = min(part_size, size - offset)
            response = self.client.get_object(
                self.bucket, name, offset=offset, length=length, request_headers=pinned
            )
            try:
                at = offset
                for chunk in response.stream(_CHUNK, decode_content=False):
                    at += os.pwrite(fd, chunk, at)
            finally:
                response.close()
                response.release_conn()
            if at != offset + length:
                raise StorageError(f"{self._where(key)}: short read at byte {at} of {size}")

        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            os.ftruncate(fd, size)
            offsets = range(0, size, part_size)
            with ThreadPoolExecutor(min(workers, len(offsets)), "store-range") as pool:
                list(pool.map(partial(fetch, fd), offsets))
        finally:
            os.close(fd)
        self._verify(key, sha256_file(tmp), expected)

    def upload_tree(
        self, local_dir: Path, prefix: str, *, sha256s: Mapping[str, str] | None = None
    ) -> list[str]:
        """Copy a local tree under ``prefix`` with ``settings.workers`` parallel uploads;
        ``sha256s`` (relative path -> hex) spare large files a hashing read."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise StorageError(f"{local_dir}: not a directory, cannot upload it to {self.uri}")
        jobs = [
            (p, _join(prefix, p.relative_to(local_dir).as_posix()), file_size(p))
            for p in sorted(local_dir.rglob("*"))
            if p.is_file()
        ]
        if jobs:
            self.require_bucket()
        total = sum(n for _, _, n in jobs)
        large = {"parallel": self._parts_per_file(len(jobs))}
        known = sha256s or {}

        def task(path: Path, key: str, size: int) -> Callable[[], None]:
            options: dict[str, Any] = dict(self._if_large(size, large))
            if size > self.settings.part_size:
                options["sha256"] = known.get(path.relative_to(local_dir).as_posix())
            return partial(self.upload_file, path, key, **options)

        with transfer_progress(f"upload {self._tree(prefix)}", len(jobs), total) as bar:
            run_parallel(
                self.settings.workers,
                [bar.counting(task(p, k, n), n) for p, k, n in jobs],
            )
        return [k for _, k, _ in jobs]

    def _if_large(self, size: int, options: dict[str, int]) -> dict[str, int]:
        """``options`` for a file of more than one part, none for a small one: a small file
        goes in one request either way, and is transferred by the plain protocol call."""
        return options if size > self.settings.part_size else {}

    def _parts_per_file(self, files: int) -> int:
        """Parts of one large file in flight when ``files`` move at once: the workers shared
        out, so a tree of many shards runs a file per worker and a lone file gets them all,
        and never more than ``settings.workers`` connections are busy."""
        workers = self.settings.workers
        return max(1, workers // max(1, min(workers, files)))

    def download_tree(self, prefix: str, local_dir: Path) -> list[Path]:
        """Copy every object under ``prefix`` into ``local_dir`` with parallel downloads."""
        base = _join(prefix)
        jobs = []
        for key, _, size in sorted(self._listing(base, recursive=True), key=lambda e: e[0]):
            rel = key[len(base) :].lstrip("/") if base else key
            parts = rel.split("/")
            if any(p in ("", ".", "..") for p in parts):
                raise StorageError(f"{self._where(key)}: key cannot be a local file name")
            jobs.append((key, Path(local_dir).joinpath(*parts), size))
        total = sum(n for _, _, n in jobs)
        parallel = {"parallel": self._parts_per_file(len(jobs))}
        with transfer_progress(f"download {self._tree(base)}", len(jobs), total) as bar:
            run_parallel(
                self.settings.workers,
                [
                    bar.counting(
                        partial(self.download_file, k, d, **self._if_large(n, parallel)),
                        n,
                    )
                    for k, d, n in jobs
                ],
            )
        return [d for _, d, _ in jobs]

    def delete(self, key_or_prefix: str, recursive: bool = False) -> None:
        """Remove one object, or every object under a prefix when ``recursive``."""
        name = self._name(key_or_prefix)
        if not recursive:
            if not _join(key_or_prefix):
                raise StorageError(f"{self.uri}: deleting the store root needs recursive=True")

            def remove_one() -> None:
                try:
                    self.client.remove_object(self.bucket, name)
                except S3Error as exc:
                    if exc.code != "NoSuchBucket":
                        raise

            self._call("delete", key_or_prefix, remove_one)
            return

        def remove_all() -> None:
            try:
                names = [
                    o.object_name
                    for o in self.client.list_objects(
                        self.bucket, prefix=name + "/" if name else "", recursive=True
                    )
                    if o.object_name
                ]
            except S3Error as exc:
                if exc.code == "NoSuchBucket":
                    return
                raise
            if name:
                names.append(name)
            errors = list(self.client.remove_objects(self.bucket, (DeleteObject(n) for n in names)))
            if errors:
                first = errors[0]
                raise StorageError(
                    f"cannot delete s3://{self.bucket}/{first.name} at {self.settings.url}: "
                    f"{first.code}: {first.message} ({len(errors)} object(s) not deleted)"
                )

        self._call("delete", key_or_prefix, remove_all)

    def content_sha256(self, key: str) -> str:
        """The sha256 of the object's bytes, streamed in chunks (never from its metadata)."""
        name = self._require_name(key)

        def digest() -> str:
            response = self.client.get_object(self.bucket, name)
            try:
                hasher = hashlib.sha256()
                for chunk in response.stream(_CHUNK, decode_content=False):
                    hasher.update(chunk)
                return hasher.hexdigest()
            finally:
                response.close()
                response.release_conn()

        return self._call("read", key, digest)

    # -- beyond the protocol --------------------------------------------------------------

    def sha256(self, key: str) -> str:
        """The object's sha256: from its metadata when present, else by reading it."""
        name = self._require_name(key)
        stat = self._call("stat", key, lambda: self.client.stat_object(self.bucket, name))
        stored = (stat.metadata or {}).get(SHA256_HEADER)
        if stored:
            return str(stored).strip().lower()
        return hashlib.sha256(self.read_bytes(key)).hexdigest()

    def publish_tree(self, local_dir: Path, prefix: str, marker: str = READY_FILE) -> list[str]:
        """Upload ``local_dir`` under ``prefix``, then write ``marker`` last (see base)."""
        return publish_tree(self, local_dir, prefix, marker)

    def is_published(self, prefix: str, marker: str = READY_FILE) -> bool:
        """True if ``prefix`` carries the marker, i.e. every file of it was uploaded."""
        return is_published(self, prefix, marker)

    def _require_name(self, key: str) -> str:
        if not _join(key):
            raise StorageError(f"{self.uri}: an object key is required, got {key!r}")
        return self._name(key)
