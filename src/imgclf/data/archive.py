"""Safe extraction of dataset archives (``.tar.gz``, ``.tgz``, ``.tar``, ``.zip``).

Archives come from users and the network, so every member is checked before anything is
written: absolute paths, ``..`` and links leaving the target are refused, naming the member.
What an archive may expand to is bounded too (:class:`ArchiveLimits`): a "zip bomb" of a
few MB unpacks to many GB, so the total size, the member count and the compression ratio
are checked on the sizes the archive declares before extraction, and the bytes actually
written are counted while extracting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import logging
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import NoReturn

from imgclf.config import IngestConfig
from imgclf.contracts import SPLITS
from imgclf.data.layout import IGNORED_TOP_LEVEL, IMAGE_EXTENSIONS
from imgclf.errors import DataError

log = logging.getLogger(__name__)

_ARCHIVE_SUFFIXES = {".tar.gz": "tar", ".tgz": "tar", ".tar": "tar", ".zip": "zip"}
_CHUNK = 1 << 20
_DEFAULTS = IngestConfig()  # the one home of the limits' defaults


@dataclasses.dataclass(frozen=True)
class ArchiveLimits:
    """What one archive may expand to; beyond any of these it is refused, nothing kept.

    ``max_compression_ratio`` bounds the extracted total by ``ratio x`` the archive's own
    size: image files are already compressed, so a real dataset stays near 1x, while zip
    bombs reach 1000x and more. The defaults are ``ingest.*`` in params.yaml.
    """

    max_extracted_bytes: int = _DEFAULTS.max_extracted_bytes
    max_members: int = _DEFAULTS.max_archive_members
    max_compression_ratio: float = _DEFAULTS.max_compression_ratio


class _Budget:
    """The bytes an archive may still write: checked on declared sizes, then on real ones.

    The allowance is the smaller of ``max_extracted_bytes`` and ``max_compression_ratio``
    times the archive size; the message names the setting that set it, so the user knows
    which one to raise for a legitimate dataset.
    """

    def __init__(self, limits: ArchiveLimits, archive_size: int, where: str) -> None:
        self.where = where
        self.max_members = limits.max_members
        self.allowed = limits.max_extracted_bytes
        self.setting = "ingest.max_extracted_bytes"
        by_ratio = int(limits.max_compression_ratio * max(archive_size, 1))
        if by_ratio < self.allowed:
            self.allowed = by_ratio
            self.setting = (
                f"{limits.max_compression_ratio:g} x the archive's {format_bytes(archive_size)}, "
                "ingest.max_compression_ratio"
            )
        self.declared = 0
        self.written = 0

    def declare(self, size: int) -> None:
        """Count a member's declared size; refuse as soon as the total passes the allowance."""
        self.declared += max(size, 0)
        if self.declared > self.allowed:
            self._refuse()

    def count_members(self, count: int) -> None:
        """Refuse an archive with more entries than ``max_members``."""
        if count > self.max_members:
            raise DataError(
                f"archive {self.where}: refused: more than {self.max_members:,} members "
                "(ingest.max_archive_members)"
            )

    def write(self, size: int) -> None:
        """Count bytes about to be written, in case a member holds more than it declared."""
        self.written += size
        if self.written > self.allowed:
            self._refuse()

    def _refuse(self) -> NoReturn:
        raise DataError(
            f"archive {self.where}: refused: it expands to more than "
            f"{format_bytes(self.allowed)} ({self.setting})"
        )


def format_bytes(size: float) -> str:
    """``1.5 GiB``-style sizes for messages."""
    for unit in ("B", "KiB", "MiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


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
    download: Path,
    name: str,
    dest_dir: Path,
    label: str,
    not_archive: str,
    limits: ArchiveLimits | None = None,
) -> Path:
    """Extract a fetched archive into ``dest_dir/extracted``, then drop the download.

    ``not_archive`` says what the fetched file was expected to be when it is no archive.
    """
    try:
        kind = archive_kind(name, download)
        if kind is None:
            raise DataError(f"ingest.source {label!r}: {not_archive}")
        return extract_archive(
            download, dest_dir / "extracted", kind=kind, label=label, limits=limits
        )
    finally:
        download.unlink(missing_ok=True)


def extract_archive(
    archive: Path, target: Path, *, kind: str, label: str, limits: ArchiveLimits | None = None
) -> Path:
    """Check every member, extract into ``target``, and return the dataset root inside it.

    Nothing is written unless all members pass :func:`_check_member` and the declared
    sizes fit ``limits``; bytes are counted again while writing. A refusal half-way
    removes what was extracted (when ``target`` was empty before), so a refused archive
    leaves no partial dataset to fill the disk or be mistaken for a complete one. For tar
    files the standard library's ``data`` filter runs as well, as a second line of defence
    (it also drops setuid bits and rejects what our checks might miss). The root skips one
    wrapping folder, so ``photos/cats/a.jpg`` and ``cats/a.jpg`` give the same dataset.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    was_empty = not any(target.iterdir())
    where = f"{label!r}" if label == str(archive) else f"{label!r} ({archive.name})"
    budget = _Budget(limits or ArchiveLimits(), archive.stat().st_size, where)
    try:
        if kind == "tar":
            _extract_tar(archive, target, where, budget)
        else:
            _extract_zip(archive, target, where, budget)
    except (
        tarfile.TarError,
        zipfile.BadZipFile,
        gzip.BadGzipFile,
        zlib.error,
        EOFError,
        OSError,  # a member that cannot be written (disk full, a file where a folder is)
        RuntimeError,  # zipfile: encrypted members, unsupported compression
    ) as exc:
        if was_empty:
            _clear(target)
        raise DataError(f"archive {where}: cannot be extracted: {exc}") from None
    except BaseException:
        if was_empty:
            _clear(target)
        raise
    return _unwrap(target)


def _clear(folder: Path) -> None:
    """Remove everything inside ``folder`` (links themselves, never what they point to)."""
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()


def _extract_tar(archive: Path, target: Path, where: str, budget: _Budget) -> None:
    """Read the headers one by one, refusing at the first member that breaks a rule.

    Iterating (rather than ``getmembers()``) stops scanning a compressed bomb as soon as
    its declared sizes pass the budget instead of decompressing all of it first. tarfile
    writes exactly a member's declared size, so the declared total bounds what is written;
    a hardlink counts as its target's size because tarfile copies the data where a link
    cannot be made.
    """
    with tarfile.open(archive, "r:*") as tf:
        members: list[tarfile.TarInfo] = []
        sizes: dict[str, int] = {}
        for m in tf:
            budget.count_members(len(members) + 1)
            if m.ischr() or m.isblk() or m.isfifo():
                _refuse(where, m.name, "is a device or FIFO")
            link = None
            if m.issym():
                link = ("sym", m.linkname)
            elif m.islnk():
                link = ("hard", m.linkname)
            _check_member(where, m.name, link)
            if m.isreg():
                sizes[m.name] = m.size
                budget.declare(m.size)
            elif m.islnk():
                budget.declare(sizes.get(m.linkname, 0))
            members.append(m)
        try:
            tf.extractall(target, members=members, filter="data")
        except tarfile.FilterError as exc:
            raise DataError(f"archive {where}: refused member: {exc}") from None


def _extract_zip(archive: Path, target: Path, where: str, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        budget.count_members(len(infos))
        for info in infos:
            budget.declare(info.file_size)
        regular = []
        for info in infos:
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
            _write_zip_member(zf, info, target, budget)


def _write_zip_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, budget: _Budget
) -> None:
    """Extract one checked member, counting its bytes against the budget as they come.

    Written here rather than by ``ZipFile.extract`` so the count happens chunk by chunk:
    a member that inflates past its declared size is stopped at the budget, not after.
    The name already passed :func:`_check_member`; empty and ``.`` parts are dropped as
    ``extract`` does.
    """
    parts = [p for p in info.filename.split("/") if p not in ("", ".")]
    if not parts:
        return
    dest = target.joinpath(*parts)
    if info.is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(info) as src, open(dest, "wb") as out:
        while chunk := src.read(_CHUNK):
            budget.write(len(chunk))
            out.write(chunk)


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
