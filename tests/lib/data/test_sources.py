"""Sources: URI dispatch, layouts, the digits sample, archive safety and HTTP downloads."""

from __future__ import annotations

import hashlib
import io
import socket
import stat
import tarfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.data.archive import extract_archive
from imgclf.data.layout import find_images
from imgclf.data.sources import (
    SOURCES,
    HttpSource,
    LocalPathSource,
    SampleSource,
    Source,
    SourceOptions,
    materialize_source,
    open_source,
    redact_uri,
)
from imgclf.errors import ConfigError, DataError


def tree_digest(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root`` (hidden ones too)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def listing(root: Path) -> list[str]:
    """Every path under ``root``, files, folders and links, relative and sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def make_tar(path: Path, files: dict[str, bytes], *, extra: Sequence[tarfile.TarInfo] = ()) -> Path:
    """A .tar.gz (or plain .tar) with ``files`` as regular members, then ``extra`` members."""
    mode = "w" if path.suffix == ".tar" else "w:gz"
    with tarfile.open(path, mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info)
    return path


def make_zip(
    path: Path, files: dict[str, bytes], *, symlinks: dict[str, str] | None = None
) -> Path:
    """A .zip with ``files`` and unix ``symlinks`` (name -> target) as members."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def tree_files(root: Path) -> dict[str, bytes]:
    """{relative path: bytes} of the image tree, for packing into archives."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def scanned(root: Path) -> list[tuple[str, str, str | None]]:
    return [(i.rel, i.label, i.split) for i in find_images(root, label="test")]


@pytest.fixture
def folder(tmp_path: Path, make_images) -> Path:
    """A two-class ImageFolder tree with a nested sub-folder and files to be ignored."""
    root = tmp_path / "folder"
    make_images(root / "cats", 3)
    make_images(root / "cats" / "more", 1, fmt="jpg")
    make_images(root / "fish", 2, fmt="bmp")
    (root / "cats" / "notes.txt").write_text("not an image")
    (root / "cats" / ".hidden.png").write_bytes((root / "cats" / "img_0.png").read_bytes())
    make_images(root / ".cache" / "x", 1)
    (root / "README.md").write_text("files beside the class folders are ignored")
    return root


# --- URI dispatch and the registry --------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "cls"),
    [
        ("sample:digits", SampleSource),
        ("data/raw", LocalPathSource),
        ("/abs/data.tar.gz", LocalPathSource),
        ("file:///abs/data", LocalPathSource),
        ("http://host/data.zip", HttpSource),
        ("HTTPS://host/data.tgz", HttpSource),
    ],
)
def test_open_source_picks_the_class_by_scheme(uri: str, cls: type[Source]) -> None:
    source = open_source(uri)
    assert type(source) is cls
    assert source.uri == uri


def test_unknown_scheme_is_a_config_error_naming_the_source() -> None:
    with pytest.raises(ConfigError, match=r"ftp://host/d\.zip.*unknown scheme 'ftp'"):
        open_source("ftp://host/d.zip")
    with pytest.raises(ConfigError, match="empty"):
        open_source("  ")


def test_unknown_sample_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sample:nope.*sample:digits"):
        open_source("sample:nope").materialize(tmp_path / "x")


def test_a_new_scheme_slots_in_with_one_registry_entry(
    tmp_path: Path, make_images, monkeypatch: pytest.MonkeyPatch
) -> None:
    class GeneratedSource(Source):
        def materialize(self, dest_dir: Path) -> Path:
            for label in self.uri.partition(":")[2].split(","):
                make_images(dest_dir / label, 2, size=(self.options.image_size,) * 2)
            return dest_dir

    monkeypatch.setitem(SOURCES, "gen", GeneratedSource)
    dest = materialize_source("gen:a,b", tmp_path / "data", image_size=9)
    assert listing(dest) == ["a", "a/img_0.png", "a/img_1.png", "b", "b/img_0.png", "b/img_1.png"]
    with Image.open(dest / "a" / "img_0.png") as image:
        assert image.size == (9, 9)


def test_redact_uri_drops_credentials_and_queries() -> None:
    assert redact_uri("https://u:pw@h.example:8443/d.zip?X-Amz-Signature=s") == (
        "https://h.example:8443/d.zip?<redacted>"
    )
    assert redact_uri("sample:digits") == "sample:digits"
    assert redact_uri("/data/raw") == "/data/raw"


# --- layouts ------------------------------------------------------------------------------


def test_find_images_reads_imagefolder_and_skips_hidden_and_non_images(folder: Path) -> None:
    assert scanned(folder) == [
        ("cats/img_0.png", "cats", None),
        ("cats/img_1.png", "cats", None),
        ("cats/img_2.png", "cats", None),
        ("cats/more/img_0.jpg", "cats", None),
        ("fish/img_0.bmp", "fish", None),
        ("fish/img_1.bmp", "fish", None),
    ]


def test_find_images_reads_a_split_layout(tmp_path: Path, make_images) -> None:
    for split, n in (("train", 2), ("val", 1), ("test", 1)):
        for label in ("a", "b"):
            make_images(tmp_path / split / label, n)
    found = scanned(tmp_path)
    assert ("train/a/img_1.png", "a", "train") in found
    assert ("test/b/img_0.png", "b", "test") in found
    assert len(found) == 8


def test_a_class_named_like_a_split_with_images_is_still_a_class(
    tmp_path: Path, make_images
) -> None:
    make_images(tmp_path / "test", 1)
    make_images(tmp_path / "train", 1)
    assert [(label, split) for _, label, split in scanned(tmp_path)] == [
        ("test", None),
        ("train", None),
    ]


def test_empty_tree_and_empty_class_folder_are_data_errors(tmp_path: Path, make_images) -> None:
    with pytest.raises(DataError, match="no class folders"):
        find_images(tmp_path, label="src")
    make_images(tmp_path / "cats", 1)
    (tmp_path / "fish").mkdir()
    (tmp_path / "fish" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"'src'.*class folder 'fish' has no images"):
        find_images(tmp_path, label="src")


def test_missing_path_and_non_archive_file_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does-not-exist.*does not exist"):
        open_source(str(tmp_path / "does-not-exist")).materialize(tmp_path / "w")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt.*neither a directory nor"):
        open_source(str(tmp_path / "notes.txt")).materialize(tmp_path / "w")


# --- materialize_source and the digits sample ---------------------------------------------


def test_sample_digits_renders_the_real_scans(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    dest = materialize_source("sample:digits", tmp_path / "digits8", image_size=8)
    digits = load_digits()
    files = sorted(dest.rglob("*.png"))
    assert len(files) == 1797
    assert sorted(p.name for p in dest.iterdir()) == [str(d) for d in range(10)]
    for index in (0, 5, 1796):
        path = dest / str(digits.target[index]) / f"digit_{index:05d}.png"
        with Image.open(path) as image:
            assert image.mode == "L"
            expected = np.rint(digits.images[index] * 255 / 16).astype(np.uint8)
            np.testing.assert_array_equal(np.asarray(image), expected)
            assert not image.info or set(image.info) <= {"dpi"}


def test_sample_digits_is_byte_identical_between_runs(tmp_path: Path) -> None:
    first = tree_digest(materialize_source("sample:digits", tmp_path / "a"))
    second = tree_digest(materialize_source("sample:digits", tmp_path / "b"))
    assert len(first) == 1797
    assert first == second
    with Image.open(tmp_path / "a" / "0" / "digit_00000.png") as image:
        assert image.size == (32, 32)


def test_materialize_source_copies_only_images_and_replaces_atomically(
    tmp_path: Path, folder: Path
) -> None:
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "old.txt").write_text("previous content")
    materialize_source(str(folder), dest)
    assert listing(dest) == [
        "cats",
        "cats/img_0.png",
        "cats/img_1.png",
        "cats/img_2.png",
        "cats/more",
        "cats/more/img_0.jpg",
        "fish",
        "fish/img_0.bmp",
        "fish/img_1.bmp",
    ]
    assert (dest / "cats" / "img_0.png").read_bytes() == (
        folder / "cats" / "img_0.png"
    ).read_bytes()
    before = listing(tmp_path)
    with pytest.raises(DataError):
        materialize_source(str(tmp_path / "missing"), dest)
    assert listing(tmp_path) == before  # old content kept, no temp dirs left behind


# --- archives -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["data.tar.gz", "data.tgz", "data.tar", "data.zip", "data.bin"])
@pytest.mark.parametrize("wrapper", ["", "photos/"])
def test_archives_give_the_same_images_as_the_folder(
    tmp_path: Path, folder: Path, name: str, wrapper: str
) -> None:
    files = {wrapper + rel: data for rel, data in tree_files(folder).items()}
    archive = tmp_path / name
    if name.endswith((".zip", ".bin")):
        make_zip(archive, files)
    else:
        make_tar(archive, files)
    root = open_source(str(archive)).materialize(tmp_path / "work")
    assert root.is_relative_to(tmp_path / "work")
    assert scanned(root) == scanned(folder)


def test_wrapped_split_archive_keeps_its_splits(tmp_path: Path, make_images) -> None:
    tree = tmp_path / "tree"
    make_images(tree / "train" / "a", 2)
    make_images(tree / "val" / "a", 1)
    archive = make_tar(tmp_path / "d.tgz", {f"w/{k}": v for k, v in tree_files(tree).items()})
    root = open_source(str(archive)).materialize(tmp_path / "work")
    assert scanned(root) == scanned(tree)
    assert {split for _, _, split in scanned(root)} == {"train", "val"}


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return info


UNSAFE = {
    "tar-dotdot": ("tar", {"../evil.txt": b"x"}, [], "../evil.txt", "'..'"),
    "tar-nested-dotdot": ("tar", {"a/../../evil.txt": b"x"}, [], "a/../../evil.txt", "'..'"),
    "tar-absolute": ("tar", {"{outside}/evil.txt": b"x"}, [], "/evil.txt", "absolute path"),
    "tar-symlink-up": ("tar", {}, [_link("a/link", "../../outside")], "a/link", "leaving"),
    "tar-symlink-abs": ("tar", {}, [_link("link", "{outside}")], "link", "absolute"),
    "tar-hardlink": ("tar", {}, [_link("h", "../x", tarfile.LNKTYPE)], "h", "hardlink"),
    "tar-device": ("tar", {}, [_device("a/null")], "a/null", "device"),
    "zip-dotdot": ("zip", {"../evil.txt": b"x"}, {}, "../evil.txt", "'..'"),
    "zip-backslash": ("zip", {"..\\evil.txt": b"x"}, {}, "evil.txt", "'..'"),
    "zip-absolute": ("zip", {"{outside}/evil.txt": b"x"}, {}, "/evil.txt", "absolute path"),
    "zip-symlink": ("zip", {}, {"a/link": "../../outside"}, "a/link", "leaving"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_archive_members_refuse_the_whole_archive(tmp_path: Path, case: str) -> None:
    kind, files, extra, member, why = UNSAFE[case]
    outside = tmp_path / "outside"
    outside.mkdir()
    files = {"good/ok.png": b"fine", **{k.format(outside=outside): v for k, v in files.items()}}
    if kind == "tar":
        extra = [
            _link(i.name, i.linkname.format(outside=outside), i.type) if i.issym() else i
            for i in extra
        ]
        archive = make_tar(tmp_path / "bad.tar.gz", files, extra=extra)
    else:
        archive = make_zip(tmp_path / "bad.zip", files, symlinks=extra)
    target = tmp_path / "target" / "x"
    with pytest.raises(DataError) as info:
        extract_archive(archive, target, kind=kind, label=str(archive))
    message = str(info.value)
    assert archive.name in message and member in message and why in message
    assert listing(target) == []  # checked before anything is extracted
    assert listing(outside) == []
    assert listing(tmp_path) == sorted(["outside", archive.name, "target", "target/x"])


def test_zip_symlinks_inside_the_archive_are_skipped(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "d.zip", {"a/x.png": b"png"}, symlinks={"a/y.png": "x.png"})
    root = extract_archive(archive, tmp_path / "t", kind="zip", label="d.zip")
    assert listing(root) == ["a", "a/x.png"]


def test_corrupt_archive_is_a_data_error(tmp_path: Path) -> None:
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(b"\x1f\x8b\x08\x00garbage" * 10)
    with pytest.raises(DataError, match=r"broken\.tar\.gz.*cannot be extracted"):
        open_source(str(archive)).materialize(tmp_path / "work")


# --- HTTP ---------------------------------------------------------------------------------


def test_http_archive_is_downloaded_and_extracted(
    tmp_path: Path, folder: Path, http_server
) -> None:
    make_zip(http_server.root / "data.zip", {f"w/{k}": v for k, v in tree_files(folder).items()})
    work = tmp_path / "work"
    root = open_source(http_server.url("data.zip")).materialize(work)
    assert scanned(root) == scanned(folder)
    assert sorted(p.name for p in work.iterdir()) == ["extracted"]  # the download is removed


def test_http_errors_name_the_url_without_credentials(tmp_path: Path, http_server) -> None:
    url = http_server.url("missing.tar.gz").replace("http://", "http://user:s3cret@")
    with pytest.raises(DataError, match=r"missing\.tar\.gz.*HTTP 404") as info:
        open_source(url).materialize(tmp_path / "w")
    assert "s3cret" not in str(info.value)
    (http_server.root / "page.html").write_text("<html></html>")
    with pytest.raises(DataError, match=r"page\.html.*not a \.tar\.gz"):
        open_source(http_server.url("page.html")).materialize(tmp_path / "w2")


def test_http_connection_refused_and_timeout_are_data_errors(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(DataError, match="download failed"):
        open_source(f"http://127.0.0.1:{port}/d.zip").materialize(tmp_path / "a")
    with socket.socket() as silent:  # accepts the connection, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/d.zip"
        source = HttpSource(url, SourceOptions(timeout_s=0.3))
        with pytest.raises(DataError, match=r"timed out after 0\.3 s"):
            source.materialize(tmp_path / "b")
