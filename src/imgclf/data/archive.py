"""Safe extraction of dataset archives (``.tar.gz``, ``.tgz``, ``.tar``, ``.zip``).

Archives come from users and the network, so every member is checked before anything is
written: absolute paths, ``..`` and links leaving the target are refused, naming the member.
"""

from __future__ import annotations

import gzip
import logging
import re
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path

from imgclf.contracts import SPLITS
from imgclf.data.layout import IGNORED_TOP_LEVEL, IMAGE_EXTENSIONS
from imgclf.errors import DataError

log = logging.getLogger(__name__)

_ARCHIVE_SUFFIXES = {".tar.gz": "tar", ".tgz": "tar", ".tar": "tar", ".zip": "zip"}


def archive_kind_from_name(name: str) -> str | None:
    """``"tar"``, ``"zip"`` or None, from the file name's suffix alone."""
    lower = name.lower()
    for suffix, kind in _ARCHIVE_SUFFIXES.items():
        if lower.endswith(suffix):
            return kind
    return None


def archive_kind(name: str, path: Path) -> str | None:
    """``"tar"``, ``"zip"`` or None, from the file name or, failing that, the content."""
    kind = archive_kind_from_name(name)
    if kind is not None:
        return kind
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except OSError:
        return None
    return None


def extract_download(
    download: Path, name: str, dest_dir: Path, label: str, not_archive: str
) -> Path:
    """Extract a fetched archive into ``dest_dir/extracted``, then drop the download.

    ``not_archive`` says what the fetched file was expected to be when it is no archive.
    """
    try:
        kind = archive_kind(name, download)
        if kind is None:
            raise DataError(f"ingest.source {label!r}: {not_archive}")
        return extract_archive(download, dest_dir / "extracted", kind=kind, label=label)
    finally:
        download.unlink(missing_ok=True)


def extract_archive(archive: Path, target: Path, *, kind: str, label: str) -> Path:
    """Check every member, extract into ``target``, and return the dataset root inside it.

    Nothing is written unless all members pass :func:`_check_member`. For tar files the
    standard library's ``data`` filter runs as well, as a second line of defence (it also
    drops setuid bits and rejects what our checks might miss). The root skips one wrapping
    folder, so ``photos/cats/a.jpg`` and ``cats/a.jpg`` give the same dataset.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    where = f"{label!r}" if label == str(archive) else f"{label!r} ({archive.name})"
    try:
        if kind == "tar":
            _extract_tar(archive, target, where)
        else:
            _extract_zip(archive, target, where)
    except (
        tarfile.TarError,
        zipfile.BadZipFile,
        gzip.BadGzipFile,
        zlib.error,
        EOFError,
        RuntimeError,  # zipfile: encrypted members, unsupported compression
    ) as exc:
        raise DataError(f"archive {where}: cannot be extracted: {exc}") from None
    return _unwrap(target)


def _extract_tar(archive: Path, target: Path, where: str) -> None:
    with tarfile.open(archive, "r:*") as tf:
        members = tf.getmembers()
        for m in members:
            if m.ischr() or m.isblk() or m.isfifo():
                _refuse(where, m.name, "is a device or FIFO")
            link = None
            if m.issym():
                link = ("sym", m.linkname)
            elif m.islnk():
                link = ("hard", m.linkname)
            _check_member(where, m.name, link)
        try:
            tf.extractall(target, members=members, filter="data")
        except tarfile.FilterError as exc:
            raise DataError(f"archive {where}: refused member: {exc}") from None


def _extract_zip(archive: Path, target: Path, where: str) -> None:
    with zipfile.ZipFile(archive) as zf:
        regular = []
        for info in zf.infolist():
            mode = info.external_attr >> 16
            link = None
            if stat.S_ISLNK(mode):
                link = ("sym", zf.read(info).decode("utf-8", errors="replace"))
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
                _refuse(where, info.filename, "is a device or FIFO")
            elif stat.S_ISSOCK(mode):
                _refuse(where, info.filename, "is a socket")
            _check_member(where, info.filename, link)
            if link is None:
                regular.append(info)
            else:
                # zipfile would write the link target as a file's content: skip it instead.
                log.warning("archive %s: skipping symlink member %s", where, info.filename)
        for info in regular:
            zf.extract(info, target)


def _check_member(where: str, name: str, link: tuple[str, str] | None) -> None:
    """Refuse a member whose path, or link target, could land outside the target dir.

    Backslashes count as separators so a Windows-style ``..\\x`` is caught too.
    """
    if _is_absolute(name):
        _refuse(where, name, "has an absolute path")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        _refuse(where, name, "has a '..' path component")
    if link is None:
        return
    kind, link_target = link
    if _is_absolute(link_target):
        _refuse(where, name, f"is a {kind}link to an absolute path {link_target!r}")
    # symlinks resolve from the member's folder, hardlinks from the archive root
    base = parts[:-1] if kind == "sym" else []
    depth = 0
    for part in [*base, *link_target.replace("\\", "/").split("/")]:
        if part in ("", "."):
            continue
        depth = depth - 1 if part == ".." else depth + 1
        if depth < 0:
            _refuse(where, name, f"is a {kind}link leaving the archive ({link_target!r})")


def _is_absolute(name: str) -> bool:
    return name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) is not None


def _refuse(where: str, member: str, why: str) -> None:
    raise DataError(f"archive {where}: refused member {member!r}: it {why}")


def _unwrap(root: Path) -> Path:
    """Skip one folder that wraps the whole dataset (``archive/<wrapper>/<class>/...``).

    A single top-level folder is a wrapper when it holds folders and no image files (a
    README beside the class folders is fine) and is not itself a split folder; a single
    top-level folder with images directly in it is a one-class dataset.
    """
    entries = [
        e for e in root.iterdir() if not e.name.startswith(".") and e.name not in IGNORED_TOP_LEVEL
    ]
    if len(entries) != 1 or not entries[0].is_dir() or entries[0].name in SPLITS:
        return root
    inner = [e for e in entries[0].iterdir() if not e.name.startswith(".")]
    has_dirs = any(e.is_dir() for e in inner)
    has_images = any(e.is_file() and e.suffix.lower() in IMAGE_EXTENSIONS for e in inner)
    return entries[0] if has_dirs and not has_images else root


def is_within(path: Path, parent: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(parent).resolve())
    except ValueError:
        return False
    return True


# --- bundled samples ------------------------------------------------------------------------
