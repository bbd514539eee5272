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
the whole archive. Sizes are bounded as well (``ingest.max_download_bytes`` for http(s) and
S3 archive downloads, :class:`~imgclf.data.archive.ArchiveLimits` for what an archive
expands to), so a hostile source is refused before it fills the disk. HTTP redirects are
followed to http(s) only, and Basic credentials from the URL are dropped as soon as a
redirect changes scheme, host or port, as browsers and ``requests`` do.
"""

from __future__ import annotations

import abc
import base64
import dataclasses
import logging
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from imgclf import __version__
from imgclf.config import IngestConfig
from imgclf.data.archive import (
    ArchiveLimits,
    archive_kind,
    archive_kind_from_name,
    extract_archive,
    extract_download,
    format_bytes,
    is_within,
)
from imgclf.data.layout import find_images
from imgclf.data.sample import SAMPLES
from imgclf.errors import ConfigError, DataError
from imgclf.fsutil import atomic_dir
from imgclf.storage.s3config import S3Settings, resolve_s3_settings

if TYPE_CHECKING:
    from http.client import HTTPMessage

    from imgclf.storage.s3 import S3Store

log = logging.getLogger(__name__)

_DEFAULTS = IngestConfig()  # the one home of the limits' defaults
_CHUNK = 1 << 20
_HTTP_SCHEMES = ("http", "https")
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """Settings a source may need besides its URI.

    One object for all sources so the registry can build any of them the same way; each
    source reads only its own fields (``image_size`` for samples, ``timeout_s`` and
    ``max_download_bytes`` for HTTP, ``s3`` and ``max_download_bytes`` for S3: ``s3`` holds
    non-secret :class:`~imgclf.storage.s3config.S3Params` keys that override params.yaml's
    ``s3:`` section for ingest only; ``archive_limits`` for anything extracted;
    ``allow_external_links`` for the scan of the materialized tree).
    """

    image_size: int = 32
    timeout_s: float = 60.0
    s3: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    max_download_bytes: int = _DEFAULTS.max_download_bytes
    archive_limits: ArchiveLimits = dataclasses.field(default_factory=ArchiveLimits)
    allow_external_links: bool = _DEFAULTS.allow_external_links

    @classmethod
    def from_config(cls, cfg: IngestConfig) -> SourceOptions:
        """The options an :class:`~imgclf.config.IngestConfig` sets (the rest keep defaults)."""
        return cls(
            image_size=cfg.image_size,
            s3=dict(cfg.s3),
            max_download_bytes=cfg.max_download_bytes,
            archive_limits=ArchiveLimits(
                max_extracted_bytes=cfg.max_extracted_bytes,
                max_members=cfg.max_archive_members,
                max_compression_ratio=cfg.max_compression_ratio,
            ),
            allow_external_links=cfg.allow_external_links,
        )


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
        writer = SAMPLES.get(name)
        if writer is None:
            raise ConfigError(
                f"ingest.source {self.uri!r}: unknown sample {name!r}; "
                f"available: {', '.join(f'sample:{n}' for n in sorted(SAMPLES))}"
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
        return extract_archive(
            path,
            Path(dest_dir) / "extracted",
            kind=kind,
            label=self.label,
            limits=self.options.archive_limits,
        )


class HttpSource(Source):
    """``http(s)://.../data.tar.gz`` or ``.zip``: downloaded, then extracted like a local one."""

    def materialize(self, dest_dir: Path) -> Path:
        """Download the archive into ``dest_dir``, extract it there and drop the download."""
        dest_dir = Path(dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        url_path = urllib.parse.urlparse(self.uri).path
        name = PurePosixPath(url_path).name or "download"
        download = dest_dir / "download.bin"
        try:
            self._download(download)
        except BaseException:
            download.unlink(missing_ok=True)  # a refused or failed download leaves nothing
            raise
        return extract_download(
            download,
            name,
            dest_dir,
            self.label,
            "the download is not a .tar.gz/.tgz/.tar/.zip archive",
            self.options.archive_limits,
        )

    def _download(self, target: Path) -> None:
        """Stream the URL to ``target``; any network or HTTP failure is a DataError.

        At most ``max_download_bytes`` are accepted: a larger Content-Length is refused
        before reading, and the count while writing stops a server that sends more than it
        declared (or declares nothing).
        """
        timeout = self.options.timeout_s
        limit = self.options.max_download_bytes
        request = _http_request(self.uri)
        opener = urllib.request.build_opener(_RedirectHandler(self.label))
        try:
            with opener.open(request, timeout=timeout) as response:
                expected = response.headers.get("Content-Length")
                if expected is not None and expected.isdigit() and int(expected) > limit:
                    raise self._too_big(limit, f"the server declares {int(expected):,} bytes")
                with open(target, "wb") as fh:
                    _copy_at_most(response, fh, limit, lambda: self._too_big(limit, None))
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

    def _too_big(self, limit: int, detail: str | None) -> DataError:
        return _download_too_big(self.label, limit, detail)


def _download_too_big(label: str, limit: int, detail: str | None) -> DataError:
    """The one-line refusal of a download over ``ingest.max_download_bytes``."""
    why = f"; {detail}" if detail else ""
    return DataError(
        f"ingest.source {label!r}: download refused: larger than {format_bytes(limit)} "
        f"(ingest.max_download_bytes){why}"
    )


def _copy_at_most(
    src: IO[bytes], dst: IO[bytes], limit: int, too_big: Callable[[], Exception]
) -> None:
    """Copy ``src`` to ``dst`` in chunks, raising ``too_big()`` before passing ``limit`` bytes."""
    copied = 0
    while chunk := src.read(_CHUNK):
        copied += len(chunk)
        if copied > limit:
            raise too_big()
        dst.write(chunk)


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in: what may see secrets."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """urllib's redirects, limited to http(s) and without leaking credentials.

    urllib follows ``ftp://`` redirects as well and copies every header, Authorization
    included, to whatever host a redirect names. Here a redirect to any scheme but http(s),
    or to a URL carrying its own credentials (or a malformed one), is refused with one
    line, and the Authorization header is dropped once a redirect changes scheme, host or
    port; a later hop back to the first origin does not bring it back.
    """

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label

    def http_error_302(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: HTTPMessage,
    ) -> IO[bytes] | None:
        """Check where a redirect leads before urllib follows it (or refuses it its own way)."""
        location = headers.get("location") or headers.get("uri")
        if location:
            self._refuse_unsafe(req.full_url, location, code, fp)
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def _refuse_unsafe(self, base: str, location: str, code: int, fp: IO[bytes]) -> None:
        """Raise the one-line DataError for a redirect target we do not follow."""
        try:
            newurl = urllib.parse.urljoin(base, location)
            _origin(newurl)  # a malformed host or port raises ValueError here
        except ValueError:
            problem, shown = "it is not a valid URL", "a malformed URL"
        else:
            parts = urllib.parse.urlsplit(newurl)
            shown = repr(redact_uri(newurl))
            if parts.scheme.lower() not in _HTTP_SCHEMES:
                problem = "only http and https redirects are followed"
            elif parts.username is not None or parts.password is not None:
                problem = "it carries credentials of its own"
            else:
                return
        fp.close()
        raise DataError(
            f"ingest.source {self.label!r}: refused a redirect (HTTP {code}) to {shown}: {problem}"
        )

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        """urllib's next request, without Authorization when the origin changes."""
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url):
            new.remove_header("Authorization")
        return new


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
            limit = self.options.max_download_bytes
            size = _object_size(store, key)
            if size > limit:
                raise _download_too_big(self.label, limit, f"the object is {size:,} bytes")
            download = dest_dir / "download.bin"
            store.download_file(key, download)
        except StorageError as exc:
            raise StorageError(f"ingest.source {self.label!r}: {exc}") from None
        return extract_download(
            download,
            PurePosixPath(key).name,
            dest_dir,
            self.label,
            "the object is neither a .tar.gz/.tgz/.tar/.zip archive nor a prefix with "
            "<class>/<image> objects under it",
            self.options.archive_limits,
        )

    def settings(self) -> S3Settings:
        """Connection settings: environment, the edge's ``s3:`` section, then ``ingest.s3``.

        Credentials only ever come from the environment (S3Settings refuses them in params).
        """
        return resolve_s3_settings(self.options.s3, "ingest.s3")

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


def _object_size(store: S3Store, key: str) -> int:
    """An object's size as the store reports it, so an archive over the limit is refused
    before a byte is downloaded (S3 reports the exact size it will send)."""
    from imgclf.errors import StorageError
    from imgclf.storage.s3client import call_with_retries, describe_failure

    name = "/".join(p for p in key.split("/") if p)
    where = f"s3://{store.bucket}/{name}"

    def reason(exc: BaseException) -> str:
        return describe_failure(exc, store.bucket, store.settings.timeout)

    def stat() -> int:
        return int(store.client.stat_object(store.bucket, name).size or 0)

    return call_with_retries(
        stat,
        store.settings,
        fail=lambda exc, _attempts: StorageError(
            store.settings.redact(f"cannot stat {where} at {store.settings.url}: {reason(exc)}")
        ),
        what=lambda exc: f"stat {where}: {reason(exc)}",
    )


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
        images = find_images(
            root, label=src.label, allow_external_links=src.options.allow_external_links
        )
        move = is_within(root, work)
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
