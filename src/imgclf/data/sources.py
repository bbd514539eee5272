"""Where raw images come from: a small registry of sources chosen by URI.

``IngestConfig.source`` is a URI. Its scheme picks a :class:`Source` class from
:data:`SOURCES`; the class knows how to put the images on local disk (generate, download,
extract, or simply point at a directory). Everything after that, the layout scan and the
ingest step, is the same for every source, so a new backend is one class plus one entry in
:data:`SOURCES`.

Supported URIs:

- ``sample:digits``: scikit-learn's 1,797 handwritten digit scans rendered as PNGs;
- a local directory in ImageFolder layout (``<class>/<image>``) or already split
  (``train|val|test/<class>/<image>``), also as ``file://`` URI;
- a local ``.tar.gz``/``.tgz``/``.tar``/``.zip`` archive, or one at an ``http(s)://`` URL,
  holding either layout, possibly wrapped in one top-level folder;
- ``s3://bucket/prefix``: either layout under the prefix, or ``s3://bucket/path/data.tar.gz``
  (``.zip``, ...), a single archive object extracted like a local one. Endpoint and
  credentials come from :class:`~imgclf.storage.s3config.S3Settings` (environment, then
  params.yaml's ``s3:`` section, then ``ingest.s3``); never from the URI.

Archives are untrusted input: every member is checked before anything is extracted, and
one bad member (absolute path, ``..``, a link leaving the target, a device file) refuses
the whole archive.
"""

from __future__ import annotations

import abc
import base64
import dataclasses
import gzip
import logging
import os
import re
import shutil
import stat
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from imgclf import __version__
from imgclf.config import read_params
from imgclf.errors import ConfigError, DataError
from imgclf.fsutil import atomic_dir
from imgclf.storage.s3config import S3Settings

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
"""File suffixes (lower case) that count as images; anything else in a class folder is ignored."""

SPLITS = ("train", "val", "test")
"""Split folder names of an already split layout, in output order."""

_ARCHIVE_SUFFIXES = {".tar.gz": "tar", ".tgz": "tar", ".tar": "tar", ".zip": "zip"}
_IGNORED_TOP_LEVEL = frozenset({"__MACOSX"})  # resource forks that macOS zips add
_PNG_COMPRESS_LEVEL = 6  # fixed so generated files are byte-identical on every run


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """Settings a source may need besides its URI.

    One object for all sources so the registry can build any of them the same way; each
    source reads only its own fields (``image_size`` for samples, ``timeout_s`` for HTTP,
    ``s3`` for S3: non-secret :class:`~imgclf.storage.s3config.S3Params` keys that override
    params.yaml's ``s3:`` section for ingest only).
    """

    image_size: int = 32
    timeout_s: float = 60.0
    s3: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RawImage:
    """One candidate image found in a source tree, before decoding."""

    path: Path
    """The file on disk."""
    rel: str
    """POSIX path relative to the tree root: sort key and the path ``materialize_source`` keeps."""
    label: str
    """The class, i.e. the name of the class folder."""
    split: str | None
    """``train``/``val``/``test`` when the source was already split, else None."""


class Source(abc.ABC):
    """A place raw images come from, addressed by a URI.

    Subclasses implement :meth:`materialize`. They are registered by URI scheme in
    :data:`SOURCES` and built by :func:`open_source`.
    """

    def __init__(self, uri: str, options: SourceOptions | None = None) -> None:
        self.uri = uri
        self.options = options or SourceOptions()

    @property
    def label(self) -> str:
        """The URI with credentials and query strings removed, for messages and outputs."""
        return redact_uri(self.uri)

    @abc.abstractmethod
    def materialize(self, dest_dir: Path) -> Path:
        """Put the images on local disk and return the root of their tree.

        ``dest_dir`` is scratch space the source may create and fill (downloads, extracted
        files, generated images); the caller removes it afterwards. The returned root holds
        ``<class>/<image>`` or ``train|val|test/<class>/<image>``; it is inside ``dest_dir``,
        or the source itself for a local directory (nothing is copied then).
        """


class SampleSource(Source):
    """``sample:<name>``: a small real dataset bundled with an installed library (offline)."""

    def materialize(self, dest_dir: Path) -> Path:
        """Render the named sample into ``dest_dir`` in ImageFolder layout."""
        name = self.uri.partition(":")[2]
        writer = _SAMPLES.get(name)
        if writer is None:
            raise ConfigError(
                f"ingest.source {self.uri!r}: unknown sample {name!r}; "
                f"available: {', '.join(f'sample:{n}' for n in sorted(_SAMPLES))}"
            )
        writer(Path(dest_dir), self.options.image_size)
        return Path(dest_dir)


class LocalPathSource(Source):
    """A local directory (either layout) or a local archive file; also ``file://`` URIs."""

    @property
    def path(self) -> Path:
        """The filesystem path the URI names."""
        if self.uri.startswith("file:"):
            parsed = urllib.parse.urlparse(self.uri)
            return Path(urllib.request.url2pathname(parsed.path))
        return Path(self.uri).expanduser()

    def materialize(self, dest_dir: Path) -> Path:
        """Return the directory itself, or extract the archive into ``dest_dir``."""
        path = self.path
        if path.is_dir():
            return path
        if not path.exists():
            raise DataError(f"ingest.source {self.label!r}: {path} does not exist")
        kind = archive_kind(path.name, path)
        if kind is None:
            raise DataError(
                f"ingest.source {self.label!r}: {path} is neither a directory nor a "
                ".tar.gz/.tgz/.tar/.zip archive"
            )
        return extract_archive(path, Path(dest_dir) / "extracted", kind=kind, label=self.label)


class HttpSource(Source):
    """``http(s)://.../data.tar.gz`` or ``.zip``: downloaded, then extracted like a local one."""

    def materialize(self, dest_dir: Path) -> Path:
        """Download the archive into ``dest_dir``, extract it there and drop the download."""
        dest_dir = Path(dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        url_path = urllib.parse.urlparse(self.uri).path
        name = PurePosixPath(url_path).name or "download"
        download = dest_dir / "download.bin"
        self._download(download)
        return _extract_download(
            download,
            name,
            dest_dir,
            self.label,
            "the download is not a .tar.gz/.tgz/.tar/.zip archive",
        )

    def _download(self, target: Path) -> None:
        """Stream the URL to ``target``; any network or HTTP failure is a DataError."""
        timeout = self.options.timeout_s
        request = _http_request(self.uri)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                expected = response.headers.get("Content-Length")
                with open(target, "wb") as fh:
                    shutil.copyfileobj(response, fh, 1 << 20)
        except urllib.error.HTTPError as exc:
            raise DataError(
                f"ingest.source {self.label!r}: download failed: HTTP {exc.code} {exc.reason}"
            ) from None
        except TimeoutError:
            raise DataError(
                f"ingest.source {self.label!r}: download timed out after {timeout:g} s"
            ) from None
        except urllib.error.URLError as exc:
            reason = (
                f"timed out after {timeout:g} s"
                if isinstance(exc.reason, TimeoutError)
                else f"failed: {exc.reason}"
            )
            raise DataError(f"ingest.source {self.label!r}: download {reason}") from None
        except OSError as exc:
            raise DataError(f"ingest.source {self.label!r}: download failed: {exc}") from None
        size = target.stat().st_size
        if expected is not None and expected.isdigit() and int(expected) != size:
            raise DataError(
                f"ingest.source {self.label!r}: download incomplete: got {size} of {expected} bytes"
            )


def _http_request(uri: str) -> urllib.request.Request:
    """A GET request; ``user:password@`` in the URL becomes a Basic auth header.

    urllib cannot connect to a URL with credentials in it, and private dataset servers
    commonly sit behind Basic auth.
    """
    parts = urllib.parse.urlsplit(uri)
    headers = {"User-Agent": f"imgclf/{__version__}"}
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        headers["Authorization"] = f"Basic {token}"
        netloc = parts.hostname or ""
        if parts.port is not None:
            netloc += f":{parts.port}"
        uri = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return urllib.request.Request(uri, headers=headers)


class S3Source(Source):
    """``s3://bucket/prefix``: an image tree under the prefix, or one archive object.

    The prefix is read like a local directory (``<class>/<image>`` or
    ``train|val|test/<class>/<image>``), downloaded in parallel with each object's stored
    sha256 checked. A URI whose last segment ends in ``.tar.gz``/``.tgz``/``.tar``/``.zip``,
    or one naming a single object with nothing below it, is an archive: downloaded, then
    extracted with the same member checks as a local archive.
    """

    def materialize(self, dest_dir: Path) -> Path:
        """Download the tree (or the archive, then extract it) into ``dest_dir``."""
        from imgclf.errors import StorageError
        from imgclf.storage.s3 import S3Store

        bucket, key = self._location()
        store = S3Store(bucket, "", self.settings())
        dest_dir = Path(dest_dir)
        try:
            if archive_kind_from_name(key) is None:
                if store.list(key):
                    tree = dest_dir / "tree"
                    store.download_tree(key, tree)
                    return tree
                if not key or not store.exists(key):
                    raise DataError(
                        f"ingest.source {self.label!r}: no objects under it at "
                        f"{store.settings.url}; expected <class>/<image> keys or an archive"
                    )
            elif not store.exists(key):
                raise DataError(
                    f"ingest.source {self.label!r}: archive object not found at "
                    f"{store.settings.url}"
                )
            download = dest_dir / "download.bin"
            store.download_file(key, download)
        except StorageError as exc:
            raise StorageError(f"ingest.source {self.label!r}: {exc}") from None
        return _extract_download(
            download,
            PurePosixPath(key).name,
            dest_dir,
            self.label,
            "the object is neither a .tar.gz/.tgz/.tar/.zip archive nor a prefix with "
            "<class>/<image> objects under it",
        )

    def settings(self) -> S3Settings:
        """Connection settings: environment, params.yaml ``s3:``, then ``ingest.s3``.

        Credentials only ever come from the environment (S3Settings refuses them in params).
        """
        if not self.options.s3:
            return S3Settings.load()
        section = read_params().get("s3") or {}
        if not isinstance(section, Mapping):
            raise ConfigError("params.yaml:s3: expected a mapping")
        merged = {**section, **self.options.s3}
        return S3Settings.from_env(overrides=merged, where="params.yaml:ingest.s3")

    def _location(self) -> tuple[str, str]:
        """(bucket, object key or prefix); credentials in the URI are refused, not echoed."""
        parts = urllib.parse.urlsplit(self.uri)
        if "@" in parts.netloc:
            raise ConfigError(
                f"ingest.source {self.label!r}: credentials do not belong in an S3 URI; set "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment"
            )
        if parts.query or parts.fragment:
            raise ConfigError(
                f"ingest.source {self.label!r}: an S3 source is s3://bucket/prefix, without '?'"
            )
        if not parts.netloc:
            raise ConfigError(
                f"ingest.source {self.label!r}: no bucket (expected s3://bucket/prefix)"
            )
        return parts.netloc, parts.path.strip("/")


SOURCES: dict[str, type[Source]] = {
    "sample": SampleSource,
    "file": LocalPathSource,
    "http": HttpSource,
    "https": HttpSource,
    "s3": S3Source,
}
"""URI scheme -> source class. A path without a scheme is a :class:`LocalPathSource`."""

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


def open_source(uri: str, options: SourceOptions | None = None) -> Source:
    """Build the source for ``uri``; an unknown scheme raises ConfigError naming it."""
    if not uri or not uri.strip():
        raise ConfigError("ingest.source: empty; use sample:digits, a directory or an archive")
    match = _SCHEME.match(uri)
    if match is None:
        return LocalPathSource(uri, options)
    scheme = match.group(1).lower()
    cls = SOURCES.get(scheme)
    if cls is not None:
        return cls(uri, options)
    if Path(uri).exists():  # a local name that merely contains a colon
        return LocalPathSource(uri, options)
    raise ConfigError(
        f"ingest.source {redact_uri(uri)!r}: unknown scheme {scheme!r}; supported: "
        f"{', '.join(f'{s}:' for s in sorted(SOURCES))} or a local path"
    )


def materialize_source(
    source: str, dest: Path, *, image_size: int = 32, s3: Mapping[str, Any] | None = None
) -> Path:
    """Write a source's raw images into ``dest`` in its own layout; return ``dest``.

    Used to fill the DVC-versioned ``data/`` folder (``imgclf data sample``). Only the
    image files the ingest step would read are kept, at their paths relative to the
    source's root (``<class>/...`` or ``train|val|test/<class>/...``). ``dest`` is replaced
    atomically: a failure leaves the previous content.
    """
    src = open_source(source, SourceOptions(image_size=image_size, s3=dict(s3 or {})))
    with atomic_dir(dest) as tmp:
        work = tmp / ".work"
        root = src.materialize(work)
        images = find_images(root, label=src.label)
        move = _is_within(root, work)
        for image in images:
            target = tmp.joinpath(*image.rel.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            if move:
                os.replace(image.path, target)
            else:
                shutil.copyfile(image.path, target)
        shutil.rmtree(work, ignore_errors=True)
    log.info("wrote %d images from %s to %s", len(images), src.label, dest)
    return Path(dest)


def find_images(root: Path, *, label: str) -> list[RawImage]:
    """List the images of a tree in ImageFolder or split layout, sorted by relative path.

    A tree is split when its top-level folders are all named train/val/test and each holds
    class folders. Hidden files and folders are skipped, as are files without an image
    suffix; files directly under the root (or a split folder) are ignored, as torchvision's
    ImageFolder does. An empty tree or a class folder without a single image file raises
    DataError naming ``label`` and the folder, since a silently missing class would only
    surface as a confusing training failure.
    """
    root = Path(root)
    top = _visible_dirs(root)
    if not top:
        raise DataError(
            f"ingest.source {label!r}: no class folders found; expected <class>/<image> or "
            "train|val|test/<class>/<image>"
        )
    is_split = all(d.name in SPLITS for d in top) and all(_visible_dirs(d) for d in top)
    groups = (
        [(split_dir.name, cls) for split_dir in top for cls in _visible_dirs(split_dir)]
        if is_split
        else [(None, cls) for cls in top]
    )
    images: list[RawImage] = []
    for split, class_dir in groups:
        found = _class_images(root, class_dir, split)
        if not found:
            raise DataError(
                f"ingest.source {label!r}: class folder "
                f"{class_dir.relative_to(root).as_posix()!r} has no images "
                f"(allowed: {' '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        images.extend(found)
    return sorted(images, key=lambda image: image.rel)


def _visible_dirs(path: Path) -> list[Path]:
    """Sub-folders of ``path`` that are not hidden, sorted by name."""
    return sorted(
        (e for e in path.iterdir() if e.is_dir() and not e.name.startswith(".")),
        key=lambda e: e.name,
    )


def _class_images(root: Path, class_dir: Path, split: str | None) -> list[RawImage]:
    """Image files anywhere below one class folder (sub-folders too, as ImageFolder does)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            found.append(RawImage(path=path, rel=rel, label=class_dir.name, split=split))
    return found


def redact_uri(uri: str) -> str:
    """Drop user:password and query strings (pre-signed URLs carry signatures) from a URI."""
    parsed = urllib.parse.urlsplit(uri)
    if not parsed.scheme or not parsed.netloc:
        return uri
    netloc = parsed.hostname or ""
    if parsed.port is not None:
        netloc += f":{parsed.port}"
    query = "<redacted>" if parsed.query else ""
    return urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path, query, ""))


# --- archives -------------------------------------------------------------------------------


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


def _extract_download(
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
        e for e in root.iterdir() if not e.name.startswith(".") and e.name not in _IGNORED_TOP_LEVEL
    ]
    if len(entries) != 1 or not entries[0].is_dir() or entries[0].name in SPLITS:
        return root
    inner = [e for e in entries[0].iterdir() if not e.name.startswith(".")]
    has_dirs = any(e.is_dir() for e in inner)
    has_images = any(e.is_file() and e.suffix.lower() in IMAGE_EXTENSIONS for e in inner)
    return entries[0] if has_dirs and not has_images else root


def _is_within(path: Path, parent: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(parent).resolve())
    except ValueError:
        return False
    return True


# --- bundled samples ------------------------------------------------------------------------


def write_digits(dest: Path, image_size: int = 32) -> None:
    """Render scikit-learn's handwritten digits as ``<digit>/digit_<index>.png``.

    1,797 real 8x8 scans (values 0..16) scaled to 0..255, upscaled to ``image_size`` px,
    grayscale. File names are the dataset index (``digit_00000.png`` is ``load_digits()``
    row 0) and PNGs carry no metadata with a fixed compression level, so every run writes
    byte-identical files and DVC sees no change.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"ingest.image_size: expected a positive integer, got {image_size!r}")
    digits = load_digits()
    pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    dest = Path(dest)
    for label in sorted(set(int(t) for t in digits.target)):
        (dest / str(label)).mkdir(parents=True, exist_ok=True)
    for index, (array, label) in enumerate(zip(pixels, digits.target, strict=True)):
        image = Image.fromarray(array)
        if image_size != array.shape[0]:
            image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
        image.save(
            dest / str(int(label)) / f"digit_{index:05d}.png",
            format="PNG",
            compress_level=_PNG_COMPRESS_LEVEL,
        )


_SAMPLES = {"digits": write_digits}
