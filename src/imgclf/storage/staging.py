"""Let steps that work on local directories read and write ``s3://`` locations.

A step function always sees local paths. For a remote input the tree is downloaded to a
temp dir first; for a remote output the step writes to a temp dir which is uploaded when
the step succeeds, with a ``_SUCCESS`` marker written last so that a reader never trusts
a half-uploaded output (and a failed step uploads nothing).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from imgclf.errors import StorageError
from imgclf.storage.base import is_remote, open_store

MARKER = "_SUCCESS"


@contextlib.contextmanager
def local_input(uri: str | Path) -> Iterator[Path]:
    """Yield a local directory holding the tree at ``uri`` (downloaded if remote)."""
    if not is_remote(uri):
        yield Path(uri)
        return
    store = open_store(str(uri))
    if not store.exists(MARKER):
        raise StorageError(f"{uri}: no {MARKER} marker; the output is missing or incomplete")
    tmp = Path(tempfile.mkdtemp(prefix="imgclf-in-"))
    try:
        store.download_tree("", tmp)
        (tmp / MARKER).unlink(missing_ok=True)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def local_output(uri: str | Path) -> Iterator[Path]:
    """Yield a local directory path for the step to write; upload it to ``uri`` on success."""
    if not is_remote(uri):
        yield Path(uri)
        return
    tmp = Path(tempfile.mkdtemp(prefix="imgclf-out-"))
    try:
        out = tmp / "out"
        yield out
        store = open_store(str(uri))
        # Marker first, so readers stop trusting the old tree before it is replaced.
        store.delete(MARKER)
        store.delete("", recursive=True)
        store.upload_tree(out, "")
        store.write_bytes(MARKER, b"")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
