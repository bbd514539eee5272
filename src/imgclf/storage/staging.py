"""Let steps that work on local directories read and write ``s3://`` locations.

A step function always sees local paths. For a remote input the tree is downloaded to a
temp dir first; for a remote output the step writes to a temp dir which is then uploaded.
What lands at the output URI mirrors what :func:`imgclf.fsutil.atomic_dir` leaves locally:

- the step succeeded: the new tree replaces the old one (stale objects deleted), then a
  ``_SUCCESS`` marker is written last. It lists every file with its sha256, so a reader
  trusts only complete outputs and notices a tree that changed while it was downloaded;
- the step failed *after* writing its output dir on purpose (validate writes
  ``report.json`` and Data Docs, then raises ValidationFailed): that tree is uploaded
  without ``_SUCCESS``, so the user can read why, while every later step refuses it, and
  the error message names the URI instead of the deleted temp dir;
- the step failed before writing anything: nothing is uploaded; the previous output,
  marker included, stays as it was.

The output store is contacted before the step runs, so a wrong endpoint or credentials
fail in seconds instead of after an hour of training.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from imgclf.contracts import SUCCESS_FILE, marker_files
from imgclf.errors import ConfigError, ImgclfError, StorageError
from imgclf.fsutil import files_not_matching
from imgclf.storage import Store, is_remote, open_store, publish_tree, split_uri

log = logging.getLogger(__name__)

MARKER = SUCCESS_FILE


def _marker_files(store: Store, uri: str) -> dict[str, str] | None:
    """The ``{relative path: sha256}`` a ``_SUCCESS`` marker lists, or None for an empty one."""
    raw = store.read_bytes(MARKER)
    if not raw.strip():
        return None  # written by an older imgclf, or by a tool that only touches the marker
    try:
        marker = json.loads(raw)
    except ValueError:
        marker = None
    if not isinstance(marker, dict):
        raise StorageError(f"{uri}/{MARKER}: not a valid marker (expected JSON)")
    if not isinstance(marker.get("files"), dict):
        raise StorageError(f"{uri}/{MARKER}: marker has no 'files' mapping")
    return marker_files(marker)


def _check_download(root: Path, files: dict[str, str], uri: str) -> None:
    """Make ``root`` hold exactly the files the marker lists, each with its sha256."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel not in files:
            log.debug("%s: ignoring %s, not listed in %s", uri, rel, MARKER)
            path.unlink()
    bad = files_not_matching(root, files)
    if bad:
        raise StorageError(
            f"{uri}: {', '.join(bad[:5])} missing or differing from the {MARKER} entries; the "
            "output was probably rewritten while it was read: run the step again"
        )


@contextlib.contextmanager
def local_input(uri: str | Path) -> Iterator[Path]:
    """Yield a local directory holding the tree at ``uri`` (downloaded if remote).

    A remote tree must carry ``_SUCCESS``: an output whose step failed or never finished
    is refused with a StorageError naming the URI.
    """
    if not is_remote(uri):
        yield Path(uri)
        return
    text = str(uri).rstrip("/")
    store = open_store(text)
    if not store.exists(MARKER):
        raise StorageError(
            f"{text}: no {MARKER} marker; the step that writes it failed or did not finish "
            "(or wrote elsewhere): run it again"
        )
    files = _marker_files(store, text)
    tmp = Path(tempfile.mkdtemp(prefix="imgclf-in-"))
    try:
        store.download_tree("", tmp)
        (tmp / MARKER).unlink(missing_ok=True)
        if files is not None:
            _check_download(tmp, files, text)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _output_store(uri: str) -> Store:
    """The store at an output URI; the bucket root is refused, since it would be replaced."""
    bucket, prefix = split_uri(uri)
    if not prefix:
        raise ConfigError(
            f"{uri}: an output needs its own prefix (s3://{bucket}/<prefix>); writing it "
            "replaces everything under the location, here the whole bucket"
        )
    from imgclf.storage.s3 import S3Store  # only remote outputs get here: minio is needed

    store = S3Store.from_uri(uri)
    # fail fast: a wrong endpoint, wrong credentials or a missing bucket are reported
    # before the step runs, not after an hour of training
    store.exists(MARKER)
    store.require_bucket()
    return store


def _replace_tree(store: Store, local_dir: Path, *, complete: bool) -> None:
    """Make the store's tree equal ``local_dir``; write ``_SUCCESS`` last if ``complete``.

    The old marker goes first, so no reader trusts the tree while it changes. Objects the
    new tree lacks are deleted rather than everything first, so an upload that fails
    half-way leaves fewer objects missing, and identical keys are simply overwritten.
    """
    store.delete(MARKER)
    new = {p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file()}
    for key in store.list(""):
        if key not in new:
            store.delete(key)
    if complete:
        publish_tree(store, local_dir, "", marker=MARKER)
    else:
        store.upload_tree(local_dir, "")


def _relocated(exc: ImgclfError, local: Path, uri: str) -> ImgclfError:
    """The same error with the temp dir's path in its message replaced by the URI."""
    message = str(exc).replace(str(local), uri)
    if message == str(exc):
        return exc
    try:
        return type(exc)(message)
    except TypeError:  # a subclass with another signature: keep the original
        return exc


@contextlib.contextmanager
def local_output(uri: str | Path) -> Iterator[Path]:
    """Yield a local directory path for the step to write, mirrored to ``uri`` afterwards.

    See the module docstring for what is uploaded when the step succeeds or fails.
    """
    if not is_remote(uri):
        yield Path(uri)
        return
    text = str(uri).rstrip("/")
    store = _output_store(text)
    tmp = Path(tempfile.mkdtemp(prefix="imgclf-out-"))
    out = tmp / "out"
    try:
        try:
            yield out
        except ImgclfError as exc:
            if not out.is_dir():
                raise
            _replace_tree(store, out, complete=False)
            log.info("uploaded the failed step's output to %s (without %s)", text, MARKER)
            relocated = _relocated(exc, out, text)
            if relocated is exc:
                raise
            raise relocated from None
        if not out.is_dir():
            raise StorageError(f"{text}: the step wrote no output dir; nothing to upload")
        _replace_tree(store, out, complete=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
