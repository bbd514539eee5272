"""Build tiny dataset dirs in the CONTRACTS.md layout directly with PIL, for step tests.

Tests of validate (and of later steps) need datasets with precise defects (a truncated JPEG,
an empty file, an image copied across splits). Writing them here, rather than through the
ingest step, keeps those tests independent of ingest and lets them plant any defect: build a
clean tree with :func:`build_dataset`, damage files, then call :func:`write_manifest` to
rescan ``images/`` the way ingest would.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.fsutil import sha256_file, write_json, write_text

MANIFEST_COLUMNS = ("path", "label", "split", "width", "height", "mode", "bytes", "sha256", "error")
SPLITS = ("train", "val", "test")
DEFAULT_PER_SPLIT = {"train": 6, "val": 5, "test": 5}


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
    for split, spec in per_split.items():
        for label in classes:
            count = spec if isinstance(spec, int) else spec.get(label, 0)
            folder = root / "images" / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
                image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)
                image.save(folder / f"{i:04d}.{image_format}")
    write_manifest(root, image_format=image_format, seed=seed)
    return root


def encode(image: Image.Image, image_format: str) -> bytes:
    """The bytes of ``image`` encoded as ``image_format`` (to plant e.g. a truncated JPEG)."""
    buf = io.BytesIO()
    image.save(buf, format=image_format)
    return buf.getvalue()


def _describe(path: Path) -> tuple[str, str, str, str]:
    """(width, height, mode, error) of one file, decoding it fully like ingest does."""
    try:
        with Image.open(path) as image:
            image.load()
            return str(image.width), str(image.height), image.mode, ""
    except Exception as exc:
        return "", "", "", f"{type(exc).__name__}: {exc}"


def write_manifest(root: Path, *, image_format: str = "png", seed: int = 0) -> list[dict]:
    """Rescan ``root/images`` and (re)write ``manifest.csv`` and ``dataset.json``."""
    rows = []
    for file in sorted(p for p in (root / "images").glob("*/*/*") if p.is_file()):
        rel = file.relative_to(root).as_posix()
        _, split, label, _ = rel.split("/")
        width, height, mode, error = _describe(file)
        rows.append(
            {
                "path": rel,
                "label": label,
                "split": split,
                "width": width,
                "height": height,
                "mode": mode,
                "bytes": str(file.stat().st_size),
                "sha256": sha256_file(file),
                "error": error,
            }
        )
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(root / "manifest.csv", buf.getvalue())

    classes = sorted({r["label"] for r in rows})
    counts = {s: {c: 0 for c in classes} for s in SPLITS}
    for r in rows:
        counts.setdefault(r["split"], {c: 0 for c in classes})[r["label"]] += 1
    lines = sorted(f"{r['path']},{r['label']},{r['split']},{r['sha256']}" for r in rows)
    write_json(
        root / "dataset.json",
        {
            "classes": classes,
            "counts": counts,
            "num_images": len(rows),
            "num_errors": sum(1 for r in rows if r["error"]),
            "source": "tests:_dataset_factory",
            "hash": hashlib.sha256("\n".join(lines).encode()).hexdigest(),
            "image_format": image_format,
            "seed": seed,
            "split": {"train": 0.7, "val": 0.15, "test": 0.15},
        },
    )
    return rows
