"""The INGEST step: dataset dir contract, splits, normalisation, corrupt files, sources."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from imgclf.config import IngestConfig, SplitRatios, to_dict
from imgclf.contracts import MANIFEST_COLUMNS, compute_dataset_hash, read_manifest
from imgclf.errors import ConfigError, DataError
from imgclf.steps import ingest
from imgclf.steps.ingest import split_counts


def split_of(rows: list[dict[str, str]]) -> dict[str, str]:
    """{label/original stem: split}, to compare assignments between runs."""
    return {f"{r['label']}/{Path(r['path']).stem}": r["split"] for r in rows}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def jpeg_bytes(size: tuple[int, int] = (24, 16), **save: object) -> bytes:
    buf = io.BytesIO()
    Image.linear_gradient("L").resize(size).convert("RGB").save(buf, format="JPEG", **save)
    return buf.getvalue()


@pytest.fixture
def three_classes(tmp_path: Path, make_images) -> Path:
    """ImageFolder tree with classes of 20, 10 and 7 tiny images."""
    root = tmp_path / "src"
    for label, n in (("ants", 20), ("bees", 10), ("wasps", 7)):
        make_images(root / label, n, size=(6, 6), prefix=label)
    return root


# --- the sample dataset -------------------------------------------------------------------


def test_sample_digits_is_deterministic_and_stratified(tmp_path: Path) -> None:
    first, second = (ingest.run(IngestConfig(), out_dir=tmp_path / name) for name in "ab")
    assert first == second
    assert (tmp_path / "a" / "dataset.json").read_bytes() == (
        tmp_path / "b" / "dataset.json"
    ).read_bytes()
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")

    assert first["classes"] == [str(d) for d in range(10)]
    assert first["num_images"] == 1797 and first["num_errors"] == 0
    assert first["source"] == "sample:digits"
    for label in first["classes"]:
        n = sum(first["counts"][s][label] for s in ("train", "val", "test"))
        expected = split_counts(n, SplitRatios())
        assert tuple(first["counts"][s][label] for s in ("train", "val", "test")) == expected
    rows = read_manifest(tmp_path / "a")
    assert {(r["width"], r["height"], r["mode"]) for r in rows} == {("32", "32", "L")}


# --- splits -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "ratios", "expected"),
    [
        (0, (0.7, 0.15, 0.15), (0, 0, 0)),
        (1, (0.7, 0.15, 0.15), (1, 0, 0)),
        (2, (0.7, 0.15, 0.15), (2, 0, 0)),
        (3, (0.7, 0.15, 0.15), (2, 1, 0)),
        (20, (0.7, 0.15, 0.15), (14, 3, 3)),
        (180, (0.7, 0.15, 0.15), (126, 27, 27)),
        (2, (0.1, 0.45, 0.45), (1, 0, 1)),  # train would get nothing: one moves to train
        (5, (0.0, 0.5, 0.5), (0, 3, 2)),  # no train asked for, none forced
        (10, (1.0, 0.0, 0.0), (10, 0, 0)),
    ],
)
def test_split_counts(n: int, ratios: tuple[float, float, float], expected: tuple) -> None:
    assert split_counts(n, SplitRatios(*ratios)) == expected


def test_split_is_stratified_and_reproducible_by_seed(tmp_path: Path, three_classes: Path) -> None:
    cfg = IngestConfig(source=str(three_classes), split=SplitRatios(0.6, 0.2, 0.2), seed=7)
    summary = ingest.run(cfg, out_dir=tmp_path / "a")
    assert summary["counts"] == {
        "train": {"ants": 12, "bees": 6, "wasps": 4},  # 7 * .6 = 4.2, 7 * .2 = 1.4 (x2)
        "val": {"ants": 4, "bees": 2, "wasps": 2},  # the largest remainder goes to val
        "test": {"ants": 4, "bees": 2, "wasps": 1},
    }
    ingest.run(cfg, out_dir=tmp_path / "b")
    ingest.run(dataclasses.replace(cfg, seed=8), out_dir=tmp_path / "c")
    a, b, c = (split_of(read_manifest(tmp_path / n)) for n in "abc")
    assert a == b
    assert a != c
    assert sorted(a) == sorted(c)  # same files, other assignment


def test_every_class_gets_a_training_image(tmp_path: Path, make_images) -> None:
    make_images(tmp_path / "src" / "one", 1)
    make_images(tmp_path / "src" / "two", 2)
    cfg = IngestConfig(source=str(tmp_path / "src"), split=SplitRatios(0.1, 0.45, 0.45))
    counts = ingest.run(cfg, out_dir=tmp_path / "ds")["counts"]
    assert counts["train"] == {"one": 1, "two": 1}


def test_an_already_split_source_keeps_its_split(tmp_path: Path, make_images) -> None:
    src = tmp_path / "src"
    given = {}
    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        for label in ("x", "y"):
            for path in make_images(src / split / label, n, prefix=f"{split}{label}"):
                given[f"{label}/{path.stem}"] = split
    summary = ingest.run(IngestConfig(source=str(src), seed=3), out_dir=tmp_path / "ds")
    assert split_of(read_manifest(tmp_path / "ds")) == given
    assert summary["counts"]["test"] == {"x": 1, "y": 1}


@pytest.mark.parametrize(
    "ratios",
    [(0.8, 0.3, 0.1), (0.5, 0.2, 0.2), (1.2, -0.1, -0.1), (math.nan, 0.5, 0.5), (1.0, 0, math.inf)],
)
def test_bad_split_ratios_are_a_config_error(
    tmp_path: Path, ratios: tuple[float, float, float]
) -> None:
    with pytest.raises(ConfigError, match=r"ingest\.split.*sum to 1"):
        ingest.run(IngestConfig(split=SplitRatios(*ratios)), out_dir=tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


# --- the dataset dir contract -------------------------------------------------------------


def test_manifest_dataset_json_and_config_follow_the_contract(
    tmp_path: Path, three_classes: Path
) -> None:
    cfg = IngestConfig(
        source=str(three_classes), s3={"endpoint": "http://127.0.0.1:9000", "secret_key": "hush"}
    )
    out = tmp_path / "ds"
    summary = ingest.run(cfg, out_dir=out)

    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "dataset.json",
        "images",
        "manifest.csv",
        "shards",
        "shards.json",
    ]
    header = (out / "manifest.csv").read_text(encoding="utf-8").splitlines()[0]
    assert tuple(header.split(",")) == MANIFEST_COLUMNS
    rows = read_manifest(out)
    assert len(rows) == 37 == summary["num_images"]
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    on_disk = sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png"))
    assert on_disk == [r["path"] for r in rows]
    for r in rows:
        data = (out / r["path"]).read_bytes()
        assert r["path"] == f"images/{r['split']}/{r['label']}/{Path(r['path']).name}"
        assert int(r["bytes"]) == len(data)
        assert r["sha256"] == hashlib.sha256(data).hexdigest()
        assert data == (three_classes / r["label"] / Path(r["path"]).name).read_bytes()
        assert (r["width"], r["height"], r["mode"], r["error"]) == ("6", "6", "RGB", "")
        assert (r["stored"], r["conversion"]) == ("kept", "")

    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset == summary
    lines = sorted(f"{r['path']},{r['label']},{r['split']},{r['sha256']}" for r in rows)
    assert dataset["hash"] == hashlib.sha256("\n".join(lines).encode()).hexdigest()
    assert dataset["hash"] == compute_dataset_hash(rows)
    assert {k: dataset[k] for k in ("image_format", "seed", "split", "source")} == {
        "image_format": "keep",
        "seed": 42,
        "split": {"train": 0.7, "val": 0.15, "test": 0.15},
        "source": str(three_classes),
    }

    config = json.loads((out / "config.json").read_text())
    assert config == {
        **to_dict(cfg),
        "s3": {"endpoint": "http://127.0.0.1:9000", "secret_key": "***"},
    }


def test_images_are_normalised(tmp_path: Path) -> None:
    src = tmp_path / "src" / "train" / "c"
    src.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    (src / "rotated.jpg").write_bytes(jpeg_bytes((20, 10), exif=exif.tobytes()))
    Image.new("RGBA", (5, 4), (255, 0, 0, 128)).save(src / "alpha.png")
    Image.new("P", (5, 4)).save(src / "palette.gif")
    Image.new("L", (5, 4), 7).save(src / "gray.jpeg")
    Image.new("L", (5, 4), 7).save(src / "gray-lossless.webp", lossless=True)  # WebP is RGB
    Image.new("1", (5, 4)).save(src / "bits.tiff")
    Image.new("RGB", (3, 3), (1, 2, 3)).save(src / "my photo (1).BMP")
    Image.new("RGB", (3, 3), (1, 2, 3)).save(src / "dup.png")
    Image.new("RGB", (3, 3), (4, 5, 6)).save(src / "dup.jpg")
    cfg = IngestConfig(source=str(tmp_path / "src"), image_format="png")
    ingest.run(cfg, out_dir=tmp_path / "ds")

    rows = {Path(r["path"]).name: r for r in read_manifest(tmp_path / "ds")}
    assert {name: (r["width"], r["height"], r["mode"]) for name, r in rows.items()} == {
        "rotated.png": ("10", "20", "RGB"),
        "alpha.png": ("5", "4", "RGB"),
        "palette.png": ("5", "4", "RGB"),
        "gray.png": ("5", "4", "L"),
        "gray-lossless.png": ("5", "4", "RGB"),
        "bits.png": ("5", "4", "RGB"),
        "my_photo_1.png": ("3", "3", "RGB"),
        "dup.png": ("3", "3", "RGB"),
        "dup_1.png": ("3", "3", "RGB"),
    }
    for name in rows:
        with Image.open(tmp_path / "ds" / "images" / "train" / "c" / name) as image:
            assert image.format == "PNG"
            assert "exif" not in image.info
    with Image.open(tmp_path / "ds" / "images" / "train" / "c" / "dup_1.png") as image:
        assert image.getpixel((0, 0)) in {(1, 2, 3), (4, 5, 6)}
    conversions = {r["stored"] + " " + r["conversion"] for r in rows.values()}
    assert conversions == {"converted image_format png"}


def test_undecodable_files_are_kept_with_an_error(tmp_path: Path, make_images) -> None:
    src = tmp_path / "src" / "train"
    make_images(src / "ok", 2)
    bad = src / "bad"
    bad.mkdir()
    truncated = jpeg_bytes((64, 64))
    truncated = truncated[: len(truncated) // 2]
    (bad / "truncated.jpg").write_bytes(truncated)
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.jpeg").write_bytes(b"this is not a picture")
    (bad / "notes.txt").write_text("ignored: not an image extension")
    (bad / ".hidden.png").write_bytes(b"ignored: hidden")
    summary = ingest.run(IngestConfig(source=str(tmp_path / "src")), out_dir=tmp_path / "ds")

    assert summary["num_errors"] == 3 and summary["num_images"] == 5
    rows = {r["path"]: r for r in read_manifest(tmp_path / "ds") if r["label"] == "bad"}
    assert sorted(rows) == [
        "images/train/bad/empty.png",
        "images/train/bad/text.jpeg",
        "images/train/bad/truncated.jpg",
    ]
    assert rows["images/train/bad/empty.png"]["error"] == "empty file"
    assert rows["images/train/bad/text.jpeg"]["error"] == "not an image"
    assert "truncated" in rows["images/train/bad/truncated.jpg"]["error"].lower()
    for path, r in rows.items():
        original = (bad / Path(path).name).read_bytes()
        assert (tmp_path / "ds" / path).read_bytes() == original
        assert r["bytes"] == str(len(original))
        assert r["sha256"] == hashlib.sha256(original).hexdigest()
        assert (r["width"], r["height"], r["mode"]) == ("", "", "")


def test_truncated_images_are_errors_even_if_pil_was_relaxed_globally(
    tmp_path: Path, make_images, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    src = tmp_path / "src" / "c"
    make_images(src, 1)
    data = jpeg_bytes((64, 64))
    (src / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert (
        ingest.run(IngestConfig(source=str(src.parent)), out_dir=tmp_path / "ds")["num_errors"] == 1
    )
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


# --- sources through the step --------------------------------------------------------------


def _pack(root: Path, archive: Path, wrapper: str) -> Path:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for p in files:
                zf.write(p, wrapper + p.relative_to(root).as_posix())
    else:
        with tarfile.open(archive, "w:gz") as tf:
            for p in files:
                tf.add(p, wrapper + p.relative_to(root).as_posix())
    return archive


@pytest.mark.parametrize("name", ["d.tar.gz", "d.zip"])
@pytest.mark.parametrize("wrapper", ["", "dataset/"])
def test_archives_ingest_to_the_same_dataset_as_the_folder(
    tmp_path: Path, three_classes: Path, name: str, wrapper: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    folder = ingest.run(IngestConfig(source=str(three_classes)), out_dir=tmp_path / "a")
    archive = _pack(three_classes, tmp_path / name, wrapper)
    packed = ingest.run(IngestConfig(source=str(archive)), out_dir=tmp_path / "b")
    assert packed["hash"] == folder["hash"]
    assert packed["source"] == str(archive)
    assert listing(tmp_path / "b") == listing(tmp_path / "a")  # no extraction leftovers
    assert listing(cwd) == []


def test_http_source_through_a_real_server(
    tmp_path: Path, three_classes: Path, http_server
) -> None:
    _pack(three_classes, http_server.root / "digits.tar.gz", "data/")
    local = ingest.run(IngestConfig(source=str(three_classes)), out_dir=tmp_path / "a")
    url = http_server.url("digits.tar.gz")
    remote = ingest.run(IngestConfig(source=url), out_dir=tmp_path / "b")
    assert remote["hash"] == local["hash"]
    assert remote["source"] == url


def _tar_with(path: Path, info: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w:gz") as tf:
        ok = tarfile.TarInfo("cls/ok.png")
        png = io.BytesIO()
        Image.new("L", (4, 4)).save(png, format="PNG")
        ok.size = len(png.getvalue())
        tf.addfile(ok, io.BytesIO(png.getvalue()))
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data) if data else None)
    return path


def _dotdot(tmp_path: Path, outside: Path) -> tuple[Path, str]:
    return _tar_with(tmp_path / "in" / "dotdot.tar.gz", tarfile.TarInfo("../evil.txt"), b"x"), (
        "../evil.txt"
    )


def _absolute(tmp_path: Path, outside: Path) -> tuple[Path, str]:
    name = f"{outside}/evil.txt"
    return _tar_with(tmp_path / "in" / "abs.tar.gz", tarfile.TarInfo(name), b"x"), name


def _symlink(tmp_path: Path, outside: Path) -> tuple[Path, str]:
    info = tarfile.TarInfo("cls/link")
    info.type, info.linkname = tarfile.SYMTYPE, "../../../outside"
    return _tar_with(tmp_path / "in" / "link.tar.gz", info), "cls/link"


def _zip_dotdot(tmp_path: Path, outside: Path) -> tuple[Path, str]:
    archive = tmp_path / "in" / "dotdot.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("cls/ok.png", b"x")
        zf.writestr("../../evil.txt", b"x")
    return archive, "../../evil.txt"


@pytest.mark.parametrize("make_archive", [_dotdot, _absolute, _symlink, _zip_dotdot])
def test_unsafe_archives_are_refused_and_write_nothing_outside(
    tmp_path: Path, make_archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = tmp_path / "outside"
    for folder in ("in", "outside", "work", "cwd"):
        (tmp_path / folder).mkdir()
    (tmp_path / "work" / "keep.txt").write_text("sibling of the output dir")
    archive, member = make_archive(tmp_path, outside)
    monkeypatch.chdir(tmp_path / "cwd")
    before = listing(tmp_path)
    with pytest.raises(DataError) as info:
        ingest.run(IngestConfig(source=str(archive)), out_dir=tmp_path / "work" / "ds")
    assert archive.name in str(info.value) and member in str(info.value)
    assert listing(tmp_path) == before
    assert not (tmp_path.parent / "evil.txt").exists()


# --- errors -------------------------------------------------------------------------------


def test_source_errors_name_the_source_and_keep_the_previous_output(
    tmp_path: Path, make_images
) -> None:
    out = tmp_path / "ds"
    make_images(tmp_path / "good" / "c", 1)
    ingest.run(IngestConfig(source=str(tmp_path / "good")), out_dir=out)
    previous = tree_bytes(out)

    (tmp_path / "empty").mkdir()
    make_images(tmp_path / "hollow" / "cats", 1)
    (tmp_path / "hollow" / "dogs").mkdir()
    cases = [
        (str(tmp_path / "missing"), DataError, "missing.*does not exist"),
        (str(tmp_path / "empty"), DataError, "empty.*no class folders"),
        (str(tmp_path / "hollow"), DataError, "hollow.*class folder 'dogs' has no images"),
        ("s4://bucket/data", ConfigError, "s4://bucket/data.*unknown scheme"),
    ]
    for source, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            ingest.run(IngestConfig(source=source), out_dir=out)
        assert tree_bytes(out) == previous
    assert sorted(os.listdir(tmp_path)) == ["ds", "empty", "good", "hollow"]


def test_unsupported_image_format_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"ingest\.image_format.*'gif'"):
        ingest.run(IngestConfig(image_format="gif"), out_dir=tmp_path / "ds")
