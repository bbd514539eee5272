"""Tiny *learnable* dataset dirs (CONTRACTS.md layout) for model, train and evaluate tests.

Random pixels cannot tell a working training loop from a broken one, so every class here is
a visible pattern (a horizontal bar, a vertical bar, a diagonal, a filled square...) drawn at
a random position over noise: a small CNN separates them in a few steps, and a model that
stays at chance accuracy points to a real bug. Written with PIL only, independent of ingest.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.fsutil import sha256_file, write_json, write_text

MANIFEST_COLUMNS = ("path", "label", "split", "width", "height", "mode", "bytes", "sha256", "error")
SPLITS = ("train", "val", "test")


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


def write_dataset(
    root: Path,
    items: Iterable[tuple[Image.Image, str, str]],
    *,
    classes: Sequence[str] | None = None,
    source: str = "tests:_tiny_dataset",
) -> Path:
    """Write ``(image, label, split)`` items as PNGs plus ``manifest.csv`` and ``dataset.json``."""
    rows = []
    counters: dict[tuple[str, str], int] = {}
    for image, label, split in items:
        n = counters.get((split, label), 0)
        counters[(split, label)] = n + 1
        rel = f"images/{split}/{label}/{n:05d}.png"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        rows.append(
            {
                "path": rel,
                "label": label,
                "split": split,
                "width": image.width,
                "height": image.height,
                "mode": image.mode,
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
                "error": "",
            }
        )
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(root / "manifest.csv", buf.getvalue())
    names = sorted(classes if classes is not None else {r["label"] for r in rows})
    counts = {s: {c: counters.get((s, c), 0) for c in names} for s in SPLITS}
    lines = sorted(f"{r['path']},{r['label']},{r['split']},{r['sha256']}" for r in rows)
    write_json(
        root / "dataset.json",
        {
            "classes": names,
            "counts": counts,
            "num_images": len(rows),
            "num_errors": 0,
            "source": source,
            "hash": hashlib.sha256("\n".join(lines).encode()).hexdigest(),
            "image_format": "png",
            "seed": 0,
            "split": {"train": 0.7, "val": 0.15, "test": 0.15},
        },
    )
    return root


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
    names = sorted(classes)
    items = [
        (pattern_image(index, size, rng), name, split)
        for split, count in per_split.items()
        for index, name in enumerate(names)
        for _ in range(count)
    ]
    return write_dataset(root, items, classes=names)
