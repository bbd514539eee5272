"""The local-filesystem store: the embedded default for the demo and for tests."""

from __future__ import annotations

import datetime as dt
import errno
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from imgclf.errors import StorageError
from imgclf.fsutil import sha256_file
from imgclf.storage.progress import file_size, transfer_progress

# link(2) is refused with these by filesystems without hard links (some FUSE, SMB mounts)
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP}


class LocalStore:
    """A directory used as an object store; keys are relative POSIX paths under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        parts = [p for p in key.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise StorageError(f"{self.uri}: key {key!r} leaves the store")
        return self.root.joinpath(*parts)

    def exists(self, key: str) -> bool:
        """True if a file exists at ``key``."""
        return self._path(key).is_file()

    def list(self, prefix: str = "", recursive: bool = True) -> list[str]:
        """Keys under ``prefix``; non-recursive lists one level with dirs ending in '/'."""
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        if not recursive:
            out = []
            for child in base.iterdir():
                if child.name.startswith("."):
                    continue
                rel = child.relative_to(self.root).as_posix()
                out.append(rel + "/" if child.is_dir() else rel)
            return sorted(out)
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(base).parts)
        )

    def read_bytes(self, key: str) -> bytes:
        """The file's content; StorageError naming the path if it is missing."""
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{self._path(key)}: not found") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write a file atomically (temp file in the same dir, then rename)."""
        target = self._path(key)
        tmp = _temp_copy(target, data)
        try:
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Create a file only if none exists: written to a temp name, then hard-linked.

        ``link`` fails if the name exists, atomically, so of concurrent writers (threads,
        processes, hosts on one NFS share) exactly one creates the file, and it appears with
        its whole content. Where hard links are not supported, ``O_CREAT | O_EXCL`` decides
        instead; a reader may then briefly see the file shorter than ``data``.
        """
        target = self._path(key)
        tmp = _temp_copy(target, data)
        try:
            os.link(tmp, target)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            return self._create_with_o_excl(target, data)
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _create_with_o_excl(target: Path, data: bytes) -> bool:
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return True

    def upload_file(self, path: Path, key: str) -> None:
        """Copy a local file into the store (temp copy, then rename)."""
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)

    def download_file(self, key: str, path: Path) -> None:
        """Copy a stored file to ``path`` (temp copy, then rename)."""
        src = self._path(key)
        if not src.is_file():
            raise StorageError(f"{src}: not found")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, path)

    def upload_tree(
        self, local_dir: Path, prefix: str, *, sha256s: Mapping[str, str] | None = None
    ) -> list[str]:
        """Copy a directory tree under ``prefix`` (files keep no hash here: ``sha256s`` is
        not needed)."""
        base = prefix.strip("/")
        jobs = [
            (p, "/".join(filter(None, [base, p.relative_to(local_dir).as_posix()])), file_size(p))
            for p in sorted(Path(local_dir).rglob("*"))
            if p.is_file()
        ]
        where = "/".join(filter(None, [self.uri, base]))
        with transfer_progress(f"copy to {where}", len(jobs), sum(n for *_, n in jobs)) as bar:
            for path, key, size in jobs:
                self.upload_file(path, key)
                bar.file_done(size)
        return [key for _, key, _ in jobs]

    def download_tree(self, prefix: str, local_dir: Path) -> list[Path]:
        """Copy everything under ``prefix`` into ``local_dir``."""
        base = prefix.strip("/")
        jobs = []
        for key in self.list(base):
            rel = key[len(base) :].lstrip("/") if base else key
            jobs.append((key, Path(local_dir) / rel, file_size(self._path(key))))
        where = "/".join(filter(None, [self.uri, base]))
        with transfer_progress(f"copy from {where}", len(jobs), sum(n for *_, n in jobs)) as bar:
            for key, dest, size in jobs:
                self.download_file(key, dest)
                bar.file_done(size)
        return [dest for _, dest, _ in jobs]

    def delete(self, key_or_prefix: str, recursive: bool = False) -> None:
        """Remove a file, or a whole subtree when ``recursive``."""
        target = self._path(key_or_prefix)
        if recursive and target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)

    def content_sha256(self, key: str) -> str:
        """The file's sha256, read in chunks; StorageError naming the path if it is missing."""
        path = self._path(key)
        try:
            return sha256_file(path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise StorageError(f"{path}: not found") from None

    def modified_times(self, prefix: str = "") -> dict[str, dt.datetime]:
        """Modification time (UTC) of every file :meth:`list` returns under ``prefix``."""
        times = {}
        for key in self.list(prefix):
            try:
                mtime = self._path(key).stat().st_mtime
            except FileNotFoundError:
                continue  # deleted since the listing
            times[key] = dt.datetime.fromtimestamp(mtime, dt.UTC)
        return times


def _temp_copy(target: Path, data: bytes) -> Path:
    """``data`` in a new temp file beside ``target`` (same filesystem, so it can be renamed
    or linked into place atomically); removed again if writing it fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp
