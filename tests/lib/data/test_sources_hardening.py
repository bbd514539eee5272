"""Untrusted sources: links out of a data dir, credentials on redirects, size limits on
archives and downloads, 16-bit images and undecodable class names.

Every case goes through a public entry point (the CLI, ``ingest.run`` or
``materialize_source``) on real files, real loopback HTTP servers and the real S3 test
server, and checks the user sees one line and that nothing half-written is left.
"""

from __future__ import annotations

import base64
import dataclasses
import http.server
import io
import os
import tarfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.cli import main
from imgclf.config import IngestConfig
from imgclf.contracts import read_manifest
from imgclf.data.sources import materialize_source
from imgclf.errors import ConfigError, DataError
from imgclf.steps import ingest

MiB = 1 << 20


def listing(root: Path) -> list[str]:
    """Every path under ``root`` (files, folders, links), relative and sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def run_cli(
    capsys: pytest.CaptureFixture[str], source: str, out: Path, *overrides: str
) -> tuple[int, str]:
    """``imgclf ingest`` with ``--set`` overrides; returns (exit code, stderr)."""
    argv = ["ingest", "--source", source, "--out", str(out)]
    for override in overrides:
        argv += ["--set", override]
    code = main(argv)
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """Non-zero exit, one ``error:`` line, no traceback, every needle in it."""
    lines = err.strip().splitlines()
    assert code != 0
    assert "Traceback" not in err
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cwd without params.yaml, so the CLI runs on the dataclass defaults."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def png_bytes(value: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), value).save(buffer, format="PNG")
    return buffer.getvalue()


# --- 1. symlinks in a local data dir ------------------------------------------------------


def test_a_link_to_a_host_file_is_refused_naming_it(
    tmp_path: Path, make_images, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "data"
    make_images(src / "a", 2)
    make_images(src / "b", 2)
    secret = tmp_path / "host" / "hostname"
    secret.parent.mkdir()
    secret.write_text("build-host-7\n")
    (src / "a" / "host.png").symlink_to(secret)
    before = listing(tmp_path)

    code, err = run_cli(capsys, str(src), tmp_path / "out")

    assert_one_line_error(code, err, "'a/host.png'", "outside the source", "allow_external_links")
    assert listing(tmp_path) == before


def test_a_linked_outside_folder_does_not_become_a_class(tmp_path: Path, make_images) -> None:
    src = tmp_path / "data"
    make_images(src / "a", 2)
    make_images(tmp_path / "elsewhere" / "private", 2)
    (src / "private").symlink_to(tmp_path / "elsewhere" / "private", target_is_directory=True)
    before = listing(tmp_path)

    with pytest.raises(DataError, match=r"'private' is a symlink leading outside"):
        ingest.run(IngestConfig(source=str(src)), out_dir=tmp_path / "out")
    with pytest.raises(DataError, match=r"'private' is a symlink leading outside"):
        materialize_source(str(src), tmp_path / "copy")
    assert listing(tmp_path) == before


def test_links_inside_the_root_are_followed_and_outside_ones_only_when_allowed(
    tmp_path: Path, make_images
) -> None:
    src = tmp_path / "data"
    (kept,) = make_images(src / "a", 1)
    make_images(src / "b", 1)
    (src / "b" / "alias.png").symlink_to(Path("..") / "a" / kept.name)
    summary = ingest.run(IngestConfig(source=str(src)), out_dir=tmp_path / "inside")
    assert summary["num_images"] == 3

    (outside,) = make_images(tmp_path / "cache", 1, prefix="cached")
    (src / "b" / "cached.png").symlink_to(outside)  # as a DVC symlink cache links its files
    with pytest.raises(DataError, match=r"cached\.png"):
        ingest.run(IngestConfig(source=str(src)), out_dir=tmp_path / "refused")
    summary = ingest.run(
        IngestConfig(source=str(src), allow_external_links=True), out_dir=tmp_path / "allowed"
    )
    assert summary["num_images"] == 4


def _fifo(path: Path) -> None:
    os.mkfifo(path)  # reading it would block forever


def _broken_link(path: Path) -> None:
    path.symlink_to(path.with_name("gone.png"))


def _link_loop(path: Path) -> None:
    path.symlink_to(path.name)


@pytest.mark.parametrize(
    ("plant", "why"),
    [
        (_fifo, "is not a regular file"),
        (_broken_link, "is not a regular file"),
        (_link_loop, "is a symlink loop"),
    ],
)
def test_an_image_name_that_is_not_a_regular_file_is_refused(
    tmp_path: Path, make_images, plant: Callable[[Path], None], why: str
) -> None:
    src = tmp_path / "data"
    make_images(src / "a", 2)
    plant(src / "a" / "odd.png")
    with pytest.raises(DataError, match=rf"'a/odd.png' {why}"):
        ingest.run(IngestConfig(source=str(src)), out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- 2. HTTP redirects ----------------------------------------------------------------------


class QuietServer(http.server.ThreadingHTTPServer):
    """A loopback server that does not print a traceback when the client hangs up early.

    Refusing a download means closing the connection mid-body; the server's resulting
    broken pipe is expected, and its traceback would land in the CLI's captured stderr.
    """

    def handle_error(self, request: object, client_address: object) -> None:
        """Ignore the client's hang-up; nothing else can go wrong in these handlers."""


@dataclasses.dataclass
class Route:
    """What a recording server answers on one path."""

    status: int = 200
    body: bytes = b""
    location: str | None = None


@dataclasses.dataclass
class RecordingServer:
    """A loopback HTTP server answering :class:`Route` s and recording request headers."""

    base_url: str
    routes: dict[str, Route]
    seen: list[tuple[str, dict[str, str]]]

    def url(self, path: str, credentials: str = "") -> str:
        return self.base_url.replace("http://", f"http://{credentials}") + path


@pytest.fixture
def recording_servers() -> Iterator[Callable[[], RecordingServer]]:
    """Factory of recording servers, each on its own port (so its own origin)."""
    started: list[tuple[http.server.ThreadingHTTPServer, threading.Thread]] = []

    def start() -> RecordingServer:
        state = RecordingServer("", {}, [])

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                state.seen.append((self.path, dict(self.headers.items())))
                route = state.routes.get(self.path, Route(status=404))
                self.send_response(route.status)
                if route.location is not None:
                    self.send_header("Location", route.location)
                self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                self.wfile.write(route.body)

            def log_message(self, format: str, *args: object) -> None:
                """Keep request lines out of the test output."""

        server = QuietServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        started.append((server, thread))
        state.base_url = f"http://127.0.0.1:{server.server_address[1]}"
        return state

    yield start
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def dataset_zip(make_images, root: Path) -> bytes:
    """A small valid dataset as zip bytes (two classes of two images)."""
    make_images(root / "a", 2)
    make_images(root / "b", 2)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in sorted(root.rglob("*.png")):
            zf.write(path, path.relative_to(root).as_posix())
    return buffer.getvalue()


def test_credentials_are_dropped_when_a_redirect_changes_origin(
    tmp_path: Path, make_images, recording_servers
) -> None:
    first, second = recording_servers(), recording_servers()
    first.routes["/moved.zip"] = Route(302, location="/data.zip")  # same origin: keeps auth
    first.routes["/data.zip"] = Route(302, location=second.url("/data.zip"))
    second.routes["/data.zip"] = Route(body=dataset_zip(make_images, tmp_path / "raw"))

    source = first.url("/moved.zip", credentials="alice:s3cret@")
    summary = ingest.run(IngestConfig(source=source), out_dir=tmp_path / "out")

    assert summary["num_images"] == 4
    expected = "Basic " + base64.b64encode(b"alice:s3cret").decode()
    assert [(path, h.get("Authorization")) for path, h in first.seen] == [
        ("/moved.zip", expected),
        ("/data.zip", expected),
    ]
    assert [path for path, _ in second.seen] == ["/data.zip"]
    assert all("Authorization" not in headers for _, headers in second.seen)
    assert "s3cret" not in (tmp_path / "out" / "config.json").read_text()


@pytest.mark.parametrize(
    ("location", "shown", "why"),
    [
        ("ftp://127.0.0.1:1/data.zip", "'ftp://127.0.0.1:1/data.zip'", "only http and https"),
        ("file:///etc/passwd", "'file:///etc/passwd'", "only http and https"),
        ("http://eve:pw2@127.0.0.1:1/d.zip", "'http://127.0.0.1:1/d.zip'", "credentials"),
        ("http://127.0.0.1:port/d.zip", "a malformed URL", "not a valid URL"),
    ],
)
def test_a_redirect_off_http_is_refused_in_one_line(
    tmp_path: Path,
    recording_servers,
    workdir: Path,
    capsys: pytest.CaptureFixture[str],
    location: str,
    shown: str,
    why: str,
) -> None:
    server = recording_servers()
    server.routes["/data.zip"] = Route(301, location=location)
    before = listing(tmp_path)

    code, err = run_cli(capsys, server.url("/data.zip", "bob:pw@"), tmp_path / "out")

    assert_one_line_error(code, err, f"refused a redirect (HTTP 301) to {shown}: ", why)
    assert "pw@" not in err and "pw2" not in err
    assert listing(tmp_path) == before


# --- 3. size limits -------------------------------------------------------------------------


class Zeros(io.RawIOBase):
    """``size`` zero bytes as a readable stream, never held in memory at once."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def zip_bomb(path: Path, zeros: int) -> Path:
    """A valid-looking dataset zip whose one big member is ``zeros`` zero bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cls/ok.png", png_bytes())
        with zf.open("cls/zeros.png", "w", force_zip64=True) as fh:
            for _ in range(zeros // MiB):
                fh.write(bytes(MiB))
    return path


def tar_bomb(path: Path, zeros: int) -> Path:
    """The same as :func:`zip_bomb` as a .tar.gz."""
    with tarfile.open(path, "w:gz", compresslevel=1) as tf:
        ok = png_bytes()
        info = tarfile.TarInfo("cls/ok.png")
        info.size = len(ok)
        tf.addfile(info, io.BytesIO(ok))
        info = tarfile.TarInfo("cls/zeros.png")
        info.size = zeros
        tf.addfile(info, io.BufferedReader(Zeros(zeros)))
    return path


@pytest.mark.parametrize("make_bomb", [zip_bomb, tar_bomb], ids=["zip", "tar.gz"])
def test_an_archive_bomb_is_refused_by_ratio_before_anything_is_written(
    tmp_path: Path, make_bomb, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    suffix = ".zip" if make_bomb is zip_bomb else ".tar.gz"
    archive = make_bomb(tmp_path / f"bomb{suffix}", 200 * MiB)
    assert archive.stat().st_size < 2 * MiB  # 200 MiB of zeros: a ratio far above 200
    before = listing(tmp_path)

    code, err = run_cli(capsys, str(archive), tmp_path / "out")

    assert_one_line_error(code, err, archive.name, "ingest.max_compression_ratio")
    assert listing(tmp_path) == before


def test_an_archive_over_max_extracted_bytes_is_refused_with_nothing_left(
    tmp_path: Path,
) -> None:
    archive = zip_bomb(tmp_path / "big.zip", 8 * MiB)
    before = listing(tmp_path)
    cfg = IngestConfig(source=str(archive), max_extracted_bytes=4 * MiB, max_compression_ratio=1e9)
    with pytest.raises(DataError, match=r"more than 4\.0 MiB \(ingest\.max_extracted_bytes\)"):
        ingest.run(cfg, out_dir=tmp_path / "out")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_an_archive_with_too_many_members_is_refused(tmp_path: Path, kind: str) -> None:
    archive = tmp_path / f"many.{kind}"
    names = [f"cls/{i}.png" for i in range(12)]
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for name in names:
                zf.writestr(name, png_bytes())
    else:
        with tarfile.open(archive, "w:gz") as tf:
            for name in names:
                info = tarfile.TarInfo(name)
                data = png_bytes()
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    before = listing(tmp_path)
    with pytest.raises(DataError, match=r"more than 10 members \(ingest\.max_archive_members\)"):
        ingest.run(
            IngestConfig(source=str(archive), max_archive_members=10), out_dir=tmp_path / "out"
        )
    assert listing(tmp_path) == before


def test_a_download_declared_over_the_limit_is_refused_before_reading(
    tmp_path: Path, recording_servers, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = recording_servers()
    server.routes["/big.zip"] = Route(body=os.urandom(3 * MiB))
    before = listing(tmp_path)

    code, err = run_cli(
        capsys, server.url("/big.zip"), tmp_path / "out", f"max_download_bytes={MiB}"
    )

    assert_one_line_error(code, err, "larger than 1.0 MiB", "declares 3,145,728 bytes")
    assert listing(tmp_path) == before


def test_an_endless_download_stops_at_the_limit(tmp_path: Path) -> None:
    cap = 256 * MiB  # the server gives up here, so a client that never stops still ends
    sent: list[int] = []
    done = threading.Event()

    class Endless(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # no Content-Length: the body ends when the server closes

        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            total = 0
            try:
                while total < cap:
                    self.wfile.write(bytes(MiB))
                    total += MiB
            except OSError:
                pass  # the client hung up: what this test expects
            finally:
                sent.append(total)
                done.set()

        def log_message(self, format: str, *args: object) -> None:
            """Keep request lines out of the test output."""

    server = QuietServer(("127.0.0.1", 0), Endless)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        before = listing(tmp_path)
        url = f"http://127.0.0.1:{server.server_address[1]}/data.zip"
        cfg = IngestConfig(source=url, max_download_bytes=2 * MiB)
        with pytest.raises(DataError, match=r"download refused: larger than 2\.0 MiB") as info:
            ingest.run(cfg, out_dir=tmp_path / "out")
        assert "declares" not in str(info.value)
        assert listing(tmp_path) == before
        assert done.wait(timeout=60)
        assert sent[0] < cap  # the client hung up at the limit instead of reading on
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.s3
def test_an_s3_archive_over_the_limit_is_refused_before_download(
    tmp_path: Path, make_images, s3_env: dict[str, str], s3_bucket: str, s3_store
) -> None:
    small = tmp_path / "small.zip"
    small.write_bytes(dataset_zip(make_images, tmp_path / "raw"))
    s3_store.upload_file(small, "small.zip")
    big = tmp_path / "big.zip"
    big.write_bytes(os.urandom(2 * MiB))
    s3_store.upload_file(big, "big.zip")
    limit = {"max_download_bytes": MiB, "s3": {"timeout": 5}}

    ok = ingest.run(
        IngestConfig(source=f"s3://{s3_bucket}/root/small.zip", **limit), out_dir=tmp_path / "ok"
    )
    assert ok["num_images"] == 4
    before = listing(tmp_path)
    with pytest.raises(DataError, match=r"larger than 1\.0 MiB.*the object is 2,097,152 bytes"):
        ingest.run(
            IngestConfig(source=f"s3://{s3_bucket}/root/big.zip", **limit),
            out_dir=tmp_path / "out",
        )
    assert listing(tmp_path) == before


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_download_bytes", 0),
        ("max_extracted_bytes", -1),
        ("max_archive_members", 0),
        ("max_compression_ratio", 0.0),
        ("max_compression_ratio", float("nan")),
    ],
)
def test_limits_must_be_positive(tmp_path: Path, name: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"ingest\.{name}"):
        ingest.run(IngestConfig(**{name: value}), out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- 4. 16-bit images -----------------------------------------------------------------------


GRADIENT = (np.arange(64 * 4).reshape(4, 64) * 1024).astype(np.uint16)  # 0 .. 64512


@pytest.mark.parametrize(
    ("dtype", "fmt", "mode"),
    [(np.uint16, "PNG", "I;16"), (">u2", "TIFF", "I;16B"), (np.int32, "TIFF", "I")],
)
def test_16_bit_gray_keeps_its_gradient(
    tmp_path: Path, make_images, dtype: object, fmt: str, mode: str
) -> None:
    src = tmp_path / "src"
    make_images(src / "plain", 2)
    (src / "deep").mkdir()
    image = Image.fromarray(GRADIENT.astype(dtype))
    assert image.mode == mode
    suffix = ".png" if fmt == "PNG" else ".tif"
    image.save(src / "deep" / f"ramp{suffix}", format=fmt)
    with Image.open(src / "deep" / f"ramp{suffix}") as reread:
        assert reread.mode == mode  # the file really is 16/32-bit on disk

    ingest.run(IngestConfig(source=str(src)), out_dir=tmp_path / "ds")

    (row,) = [r for r in read_manifest(tmp_path / "ds") if r["label"] == "deep"]
    assert row["mode"] == "L"
    with Image.open(tmp_path / "ds" / row["path"]) as out:
        pixels = np.asarray(out)
    assert pixels.dtype == np.uint8
    expected = (GRADIENT.astype(np.int64) * 255 + 32767) // 65535
    np.testing.assert_array_equal(pixels, expected)
    assert (pixels == 255).mean() < 0.05  # not clipped to white
    assert np.all(np.diff(pixels[0].astype(int)) >= 0) and pixels.min() == 0


# --- 5. class folder names that are not UTF-8 ----------------------------------------------


def test_a_non_utf8_class_folder_is_refused_naming_it(
    tmp_path: Path, make_images, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    make_images(src / "ok", 2)
    bad = os.path.join(os.fsencode(src), b"caf\xe9")
    try:
        os.mkdir(bad)
    except (OSError, UnicodeError):
        pytest.skip("this filesystem does not take non-UTF-8 names")
    for i in range(2):
        Image.new("L", (8, 8), i).save(os.fsdecode(os.path.join(bad, b"i%d.png" % i)))
    before = listing(tmp_path)

    code, err = run_cli(capsys, str(src), tmp_path / "out")
    assert_one_line_error(code, err, r"'caf\xe9'", "not a valid UTF-8 name")
    assert listing(tmp_path) == before

    with pytest.raises(DataError, match=r"'caf\\xe9' is not a valid UTF-8 name"):
        ingest.run(IngestConfig(source=str(src)), out_dir=tmp_path / "out")
