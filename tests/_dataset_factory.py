"""Build tiny dataset dirs in the CONTRACTS.md layout directly with PIL, for step tests.

Two kinds, written the same way (images under ``images/<split>/<class>/``, then
:func:`write_manifest` scans them and writes ``manifest.csv`` and ``dataset.json`` through
:mod:`imgclf.contracts`, the same code as ingest):

- :func:`build_dataset`: random pixels, for validate tests that plant precise defects (a
  truncated JPEG, an empty file, an image copied across splits): build a clean tree, damage
  files, then call :func:`write_manifest` again to rescan ``images/`` the way ingest would;
- :func:`build_tiny_dataset`: *learnable* patterns for model, train and evaluate tests.
  Random pixels cannot tell a working training loop from a broken one, so every class is a
  visible pattern (a horizontal bar, a vertical bar, a diagonal, a filled square...) drawn at
  a random position over noise: a small CNN separates them in a few steps, and a model that
  stays at chance accuracy points to a real bug.

Both are independent of the ingest step, so its bugs cannot hide in the other steps' tests.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.contracts import IMAGES_DIR, ManifestRow, image_path, write_dataset
from imgclf.fsutil import sha256_file

DEFAULT_PER_SPLIT = {"train": 6, "val": 5, "test": 5}
SPLIT_RATIOS = {"train": 0.7, "val": 0.15, "test": 0.15}


def encode(image: Image.Image, image_format: str) -> bytes:
    """The bytes of ``image`` encoded as ``image_format`` (to plant e.g. a truncated JPEG)."""
    buf = io.BytesIO()
    image.save(buf, format=image_format)
    return buf.getvalue()


def write_images(
    root: Path, items: Iterable[tuple[Image.Image, str, str]], image_format: str = "png"
) -> None:
    """Save ``(image, label, split)`` items as ``images/<split>/<label>/<n>.<format>``,
    numbered from ``0000`` within each folder."""
    counters: dict[tuple[str, str], int] = {}
    for image, label, split in items:
        n = counters.get((split, label), 0)
        counters[(split, label)] = n + 1
        path = root / image_path(split, label, f"{n:04d}.{image_format}")
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)


def _describe(path: Path) -> tuple[int | None, int | None, str | None, str]:
    """(width, height, mode, error) of one file, decoding it fully like ingest does."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.width, image.height, image.mode, ""
    except Exception as exc:
        return None, None, None, f"{type(exc).__name__}: {exc}"


def write_manifest(
    root: Path, *, image_format: str = "png", seed: int = 0, source: str = "tests:_dataset_factory"
) -> list[ManifestRow]:
    """Rescan ``root/images`` and (re)write ``manifest.csv`` and ``dataset.json``."""
    rows = []
    for file in sorted(p for p in (root / IMAGES_DIR).glob("*/*/*") if p.is_file()):
        _, split, label, name = file.relative_to(root).parts
        width, height, mode, error = _describe(file)
        rows.append(
            ManifestRow(
                path=image_path(split, label, name),
                label=label,
                split=split,
                width=width,
                height=height,
                mode=mode,
                bytes=file.stat().st_size,
                sha256=sha256_file(file),
                error=error,
            )
        )
    write_dataset(
        root, rows, source=source, image_format=image_format, seed=seed, split=SPLIT_RATIOS
    )
    return rows


def build_dataset(
    root: Path,
    *,
    classes: Sequence[str] = ("0", "1"),
    per_split: Mapping[str, int] | Mapping[str, Mapping[str, int]] = DEFAULT_PER_SPLIT,
    size: tuple[int, int] = (16, 16),
    mode: str = "L",
    image_format: str = "png",
    seed: int = 0,
) -> Path:
    """Write distinct random images under ``root/images/<split>/<class>/`` plus manifest.

    ``per_split`` gives images per class in each split, either one number per split or a
    ``{split: {class: n}}`` mapping for imbalanced datasets. Every image has different
    pixels, so no two files share a sha256 unless a test copies one on purpose.
    """
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3}[mode]

    def random_image() -> Image.Image:
        pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
        return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)

    items = [
        (random_image(), label, split)
        for split, spec in per_split.items()
        for label in classes
        for _ in range(spec if isinstance(spec, int) else spec.get(label, 0))
    ]
    write_images(root, items, image_format)
    write_manifest(root, image_format=image_format, seed=seed)
    return root


def _hbar(canvas: np.ndarray, rng: np.random.Generator) -> None:
    row = rng.integers(1, canvas.shape[0] - 2)
    canvas[row : row + 2, 1:-1] = 255


def _vbar(canvas: np.ndarray, rng: np.random.Generator) -> None:
    col = rng.integers(1, canvas.shape[1] - 2)
    canvas[1:-1, col : col + 2] = 255


def _diagonal(canvas: np.ndarray, rng: np.random.Generator) -> None:
    n = min(canvas.shape)
    idx = np.arange(n)
    canvas[idx, idx] = 255
    canvas[idx[:-1], idx[1:]] = 255


def _square(canvas: np.ndarray, rng: np.random.Generator) -> None:
    side = canvas.shape[0] // 2
    top, left = rng.integers(0, canvas.shape[0] - side, size=2)
    canvas[top : top + side, left : left + side] = 255


PATTERNS: tuple[Callable[[np.ndarray, np.random.Generator], None], ...] = (
    _hbar,
    _vbar,
    _diagonal,
    _square,
)


def pattern_image(class_index: int, size: int, rng: np.random.Generator) -> Image.Image:
    """A grayscale image of the pattern of ``class_index`` over light noise."""
    canvas = rng.integers(0, 60, size=(size, size)).astype(np.uint8)
    PATTERNS[class_index % len(PATTERNS)](canvas, rng)
    return Image.fromarray(canvas, "L")


def build_tiny_dataset(
    root: Path,
    *,
    classes: Sequence[str] = ("p0", "p1", "p2"),
    per_split: Mapping[str, int] | None = None,
    size: int = 12,
    seed: int = 0,
) -> Path:
    """A learnable dataset dir: ``per_split`` images per class per split, ``size`` px square.

    Class ``i`` (in the sorted order of ``classes``) uses pattern ``i``; so renaming the
    classes keeps their patterns, and a dataset with other class names can reuse a model's
    patterns to test class-mismatch handling.
    """
    per_split = per_split or {"train": 16, "val": 6, "test": 6}
    rng = np.random.default_rng(seed)
    items = [
        (pattern_image(index, size, rng), name, split)
        for split, count in per_split.items()
        for index, name in enumerate(sorted(classes))
        for _ in range(count)
    ]
    write_images(root, items)
    write_manifest(root, seed=seed)
    return root


def without_images(dataset_dir: Path, dest: Path) -> Path:
    """A copy of ``dataset_dir`` without ``images/``: what ingest leaves for a dataset too
    big for the tree (manifest, dataset.json and the shards), for the shard readers."""
    import shutil

    shutil.copytree(dataset_dir, dest, ignore=shutil.ignore_patterns(IMAGES_DIR))
    return dest
