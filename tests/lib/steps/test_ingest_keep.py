"""INGEST with ``image_format: keep``: good files byte for byte, the rest converted and said
why; the same dataset whatever the number of worker processes."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from imgclf.config import IngestConfig
from imgclf.contracts import read_manifest
from imgclf.errors import ConfigError
from imgclf.steps import ingest

ORIENTATION = 0x0112


def photo(seed: int, size: tuple[int, int] = (48, 32)) -> Image.Image:
    """A small photo-like RGB image: smooth gradients plus sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    base = np.stack([x * 255 / size[0], y * 255 / size[1], (x + y) * 127 / sum(size)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def save_jpeg(path: Path, image: Image.Image, orientation: int | None = None) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        extra["exif"] = exif.tobytes()
    image.save(path, format="JPEG", quality=85, **extra)
    return path.read_bytes()


def rows_by_name(dataset: Path) -> dict[str, dict[str, str]]:
    return {Path(r["path"]).name: r for r in read_manifest(dataset)}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_jpegs_are_kept_byte_for_byte_and_rotated_ones_stay_jpeg(tmp_path: Path) -> None:
    src = tmp_path / "src"
    sources = {}
    for i in range(12):
        label = "cats" if i % 2 else "dogs"
        orientation = 6 if i == 3 else (1 if i == 4 else None)
        path = src / label / f"p{i}.jpeg"
        sources[f"p{i}"] = save_jpeg(path, photo(i), orientation)
    summary = ingest.run(IngestConfig(source=str(src)), out_dir=tmp_path / "ds")

    rows = {Path(r["path"]).stem: r for r in read_manifest(tmp_path / "ds")}
    assert summary["num_errors"] == 0 and len(rows) == 12
    for stem, row in rows.items():
        assert row["path"].endswith(f"/{stem}.jpg")
        stored = (tmp_path / "ds" / row["path"]).read_bytes()
        if stem == "p3":
            continue
        assert (row["stored"], row["conversion"]) == ("kept", "")
        assert row["sha256"] == sha256(sources[stem]) == sha256(stored)
    total_out = sum(int(r["bytes"]) for r in rows.values())
    assert total_out <= 1.05 * sum(len(b) for b in sources.values())

    rotated = rows["p3"]
    assert (rotated["stored"], rotated["conversion"]) == ("converted", "exif-orientation 6")
    assert (rotated["width"], rotated["height"], rotated["mode"]) == ("32", "48", "RGB")
    assert int(rotated["bytes"]) <= 1.1 * len(sources["p3"])  # the source's own tables
    with Image.open(tmp_path / "ds" / rotated["path"]) as image:
        assert image.format == "JPEG"
        assert image.getexif().get(ORIENTATION) is None
        with Image.open(io.BytesIO(sources["p3"])) as original:
            expected = ImageOps.exif_transpose(original)
        difference = np.abs(np.asarray(image, float) - np.asarray(expected, float)).mean()
        assert difference < 3  # one more JPEG generation, with the same tables


def test_files_that_need_it_are_converted_and_the_manifest_says_why(tmp_path: Path) -> None:
    src = tmp_path / "src" / "train" / "c"  # already split: every file stays in train
    src.mkdir(parents=True)
    photo(1).convert("CMYK").save(src / "cmyk.jpg", format="JPEG")
    palette = Image.new("P", (20, 10), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(src / "palette.png", transparency=0)
    wide = np.full((10, 20), 65535, dtype=np.uint16)
    wide[:, :10] = 257
    Image.fromarray(wide).save(src / "wide.png")  # 16-bit grayscale PNG
    Image.new("LA", (20, 10), (9, 99)).save(src / "alpha.png")
    Image.new("1", (20, 10)).save(src / "bits.tiff")
    Image.new("RGB", (20, 10), (1, 2, 3)).save(src / "plain.bmp")
    Image.new("P", (20, 10)).save(src / "anim.gif")
    Image.new("RGB", (20, 10), (1, 2, 3)).save(src / "lossless.webp", lossless=True)
    Image.new("L", (20, 10), 5).save(src / "gray.png")
    ingest.run(IngestConfig(source=str(tmp_path / "src")), out_dir=tmp_path / "ds")

    rows = rows_by_name(tmp_path / "ds")
    described = {name: (r["stored"], r["conversion"], r["mode"]) for name, r in rows.items()}
    assert described == {
        "cmyk.jpg": ("converted", "mode CMYK", "RGB"),
        "palette.png": ("converted", "mode P", "RGB"),
        "wide.png": ("converted", "mode I;16", "L"),
        "alpha.png": ("converted", "mode LA", "RGB"),
        "bits.png": ("converted", "format TIFF; mode 1", "RGB"),
        "plain.png": ("converted", "format BMP", "RGB"),
        "anim.png": ("converted", "format GIF; mode P", "RGB"),
        "lossless.webp": ("kept", "", "RGB"),
        "gray.png": ("kept", "", "L"),
    }
    images = tmp_path / "ds" / "images" / "train" / "c"
    with Image.open(images / "wide.png") as image:
        assert image.mode == "L" and image.getpixel((0, 0)) == 1 and image.getpixel((19, 0)) == 255
    with Image.open(images / "palette.png") as image:
        assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 0, 0)
    with Image.open(images / "cmyk.jpg") as image:
        assert (image.format, image.mode) == ("JPEG", "RGB")
    for name in ("lossless.webp", "gray.png"):
        assert (images / name).read_bytes() == (src / name).read_bytes()


def test_a_file_in_a_kept_format_gets_the_suffix_of_its_format(tmp_path: Path) -> None:
    src = tmp_path / "src" / "c"
    data = save_jpeg(src / "really-a-jpeg.PNG", photo(5))
    ingest.run(IngestConfig(source=str(src.parent)), out_dir=tmp_path / "ds")
    (row,) = read_manifest(tmp_path / "ds")
    assert row["path"] == "images/train/c/really-a-jpeg.jpg"
    assert (row["stored"], row["sha256"]) == ("kept", sha256(data))


def test_undecodable_files_are_still_reported_and_kept_as_they_are(tmp_path: Path) -> None:
    src = tmp_path / "src" / "c"
    good = save_jpeg(src / "good.jpg", photo(7))
    (src / "cut.JPG").write_bytes(good[: len(good) // 2])
    summary = ingest.run(IngestConfig(source=str(src.parent)), out_dir=tmp_path / "ds")
    assert summary["num_errors"] == 1
    row = rows_by_name(tmp_path / "ds")["cut.JPG"]
    assert "truncated" in row["error"].lower()
    assert (row["stored"], row["conversion"], row["mode"]) == ("kept", "", "")
    assert row["sha256"] == sha256(good[: len(good) // 2])


def _mixed_source(root: Path) -> Path:
    """41 files over two classes, some converted, two with the same name in one class."""
    for i in range(40):
        folder = root / ("a" if i % 3 else "b")
        if i % 5 == 0:
            save_jpeg(folder / f"img{i}.jpg", photo(i, (24, 16)), orientation=8)
        elif i % 7 == 0:
            folder.mkdir(parents=True, exist_ok=True)
            photo(i, (24, 16)).convert("RGBA").save(folder / f"img{i}.png")
        else:
            save_jpeg(folder / f"img{i}.jpg", photo(i, (24, 16)))
    save_jpeg(root / "a" / "sub" / "img1.jpg", photo(99, (24, 16)))  # a name clash
    return root


def test_the_dataset_does_not_depend_on_the_number_of_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest, "_CHUNK", 2)  # 21 chunks: more than the window of 2 workers
    src = _mixed_source(tmp_path / "src")
    one = ingest.run(IngestConfig(source=str(src), workers=1), out_dir=tmp_path / "one")
    two = ingest.run(IngestConfig(source=str(src), workers=2), out_dir=tmp_path / "two")
    assert one == two
    assert (tmp_path / "one" / "manifest.csv").read_bytes() == (
        tmp_path / "two" / "manifest.csv"
    ).read_bytes()
    for row in read_manifest(tmp_path / "one"):
        assert (tmp_path / "one" / row["path"]).read_bytes() == (
            tmp_path / "two" / row["path"]
        ).read_bytes()
    assert not list((tmp_path / "two").glob(".*"))  # no staging leftovers
    stored = {r["stored"] for r in read_manifest(tmp_path / "two")}
    assert stored == {"kept", "converted"}


def test_image_format_png_still_re_encodes_every_image(tmp_path: Path) -> None:
    src = tmp_path / "src" / "c"
    save_jpeg(src / "photo.jpg", photo(1))
    save_jpeg(src / "turned.jpg", photo(2), orientation=6)
    Image.new("L", (20, 10), 5).save(src / "gray.png")
    cfg = IngestConfig(source=str(src.parent), image_format="png", workers=2)
    summary = ingest.run(cfg, out_dir=tmp_path / "ds")
    assert summary["image_format"] == "png"
    rows = rows_by_name(tmp_path / "ds")
    assert sorted(rows) == ["gray.png", "photo.png", "turned.png"]
    for row in rows.values():
        assert (row["stored"], row["conversion"]) == ("converted", "image_format png")
        with Image.open(tmp_path / "ds" / row["path"]) as image:
            assert image.format == "PNG" and not image.getexif()
    assert (rows["turned.png"]["width"], rows["turned.png"]["height"]) == ("32", "48")


@pytest.mark.parametrize("workers", [0, -1, "many", 1.5, True])
def test_bad_worker_counts_are_refused(workers: object) -> None:
    with pytest.raises(ConfigError, match=r"ingest\.workers"):
        IngestConfig(workers=workers)  # type: ignore[arg-type]


def test_worker_counts() -> None:
    assert IngestConfig(workers="3").workers == "3"  # KFP passes strings
    assert ingest.resolve_workers("3", 1000) == 3
    assert ingest.resolve_workers(8, 5) == 5
    assert ingest.resolve_workers("auto", 10) == 1  # too few images to pay for a process
    assert 1 <= ingest.resolve_workers("auto", 100_000) <= (os.cpu_count() or 1)


def test_png_bytes_are_what_png_mode_wrote_before(tmp_path: Path) -> None:
    """``png`` output is unchanged by ``keep``'s arrival: PNG, level 6, no metadata."""
    src = tmp_path / "src" / "c"
    src.mkdir(parents=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(src / "x.bmp")  # one image: it goes to train
    ingest.run(IngestConfig(source=str(src.parent), image_format="png"), out_dir=tmp_path / "ds")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, format="PNG", compress_level=6)
    assert (tmp_path / "ds" / "images" / "train" / "c" / "x.png").read_bytes() == buffer.getvalue()
