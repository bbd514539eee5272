"""INGEST step: turn a source of labelled images into a normalised, split, hashed dataset dir.

Output (``docs/CONTRACTS.md``, "Dataset dir")::

    images/<split>/<class>/<file>   normalised images (and undecodable originals, see below)
    manifest.csv, dataset.json      one row per file, and the summary with the dataset hash
                                    (both written by :func:`imgclf.contracts.write_dataset`)
    config.json                     the resolved IngestConfig (secrets redacted)

Normalisation, so every later step sees the same few kinds of file:

- each image is decoded with PIL (truncated files are errors, not silently padded), its
  EXIF orientation applied, and re-encoded as ``cfg.image_format`` (PNG) without metadata;
- modes ``L`` and ``RGB`` are kept; 16-bit grayscale (``I;16``, ``I;16B``, ...) becomes ``L``
  scaled by ``255 / 65535`` (see :func:`to_8bit`); every other mode (``P``, ``RGBA``,
  ``CMYK``, ``1``, ...) is converted to ``RGB``: alpha is dropped, not composited; animated
  files keep their first frame;
- the file keeps its original stem, reduced to ``[A-Za-z0-9._-]`` and de-duplicated within
  its folder with ``_1``, ``_2``, ... suffixes.

Files that cannot be decoded are not dropped: their original bytes are copied under their
original (sanitised) name and the manifest row says why in ``error``. Dropping them here
would hide the problem; the validate step decides whether it blocks the pipeline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import math
import random
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from imgclf.config import IngestConfig, SplitRatios, to_dict
from imgclf.contracts import SPLITS, ManifestRow, image_path, write_dataset
from imgclf.data.layout import RawImage, find_images
from imgclf.data.sources import SourceOptions, open_source, redact_uri
from imgclf.errors import ConfigError
from imgclf.fsutil import atomic_dir, write_json

log = logging.getLogger(__name__)

KEPT_MODES = ("L", "RGB")
"""Image modes written as they are; any other mode is converted to RGB."""

_FORMATS = {"png": ("PNG", ".png", {"compress_level": 6})}
_RATIO_TOLERANCE = 1e-6
_MAX_STEM = 100
_SECRET_KEY = re.compile(r"secret|password|token|access_key|credential", re.IGNORECASE)
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_MAX_16BIT = 65535


class UndecodableImage(Exception):
    """Raised by :func:`decode_image`; its message is the short reason for the manifest."""


def run(cfg: IngestConfig, *, out_dir: Path) -> dict[str, Any]:
    """Ingest ``cfg.source`` into ``out_dir`` and return the ``dataset.json`` content.

    The whole dir is written through :func:`~imgclf.fsutil.atomic_dir`: downloads and
    extracted archives live in a hidden folder inside the temp dir (never in the working
    directory) and are removed before it replaces ``out_dir``.
    """
    check_config(cfg)
    image_format = cfg.image_format.lower()
    source = open_source(cfg.source, SourceOptions.from_config(cfg))
    with atomic_dir(out_dir) as tmp:
        work = tmp / ".source"
        root = source.materialize(work)
        images = find_images(
            root, label=source.label, allow_external_links=cfg.allow_external_links
        )
        plan = assign_splits(images, cfg.split, cfg.seed)
        rows = write_images(plan, tmp, image_format=image_format)
        shutil.rmtree(work, ignore_errors=True)
        summary = write_dataset(
            tmp,
            rows,
            source=source.label,
            image_format=image_format,
            seed=cfg.seed,
            split=dataclasses.asdict(cfg.split),
        )
        write_json(tmp / "config.json", _config_record(cfg))
    log.info(
        "ingested %d images (%d errors, %d classes) from %s into %s",
        summary["num_images"],
        summary["num_errors"],
        len(summary["classes"]),
        source.label,
        out_dir,
    )
    return summary


def check_config(cfg: IngestConfig) -> None:
    """Reject settings that would only fail (or silently mislead) halfway through."""
    ratios = (cfg.split.train, cfg.split.val, cfg.split.test)
    if any(not math.isfinite(r) or r < 0 for r in ratios) or not math.isclose(
        sum(ratios), 1.0, abs_tol=_RATIO_TOLERANCE
    ):
        raise ConfigError(
            "ingest.split: ratios must be >= 0 and sum to 1, got "
            f"train={cfg.split.train} val={cfg.split.val} test={cfg.split.test}"
        )
    if cfg.image_format.lower() not in _FORMATS:
        raise ConfigError(
            f"ingest.image_format: {cfg.image_format!r} is not supported; "
            f"use one of {', '.join(sorted(_FORMATS))}"
        )
    if isinstance(cfg.image_size, bool) or cfg.image_size < 1:
        raise ConfigError(f"ingest.image_size: expected a positive integer, got {cfg.image_size}")
    for name in ("max_download_bytes", "max_extracted_bytes", "max_archive_members"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"ingest.{name}: expected a positive integer, got {value!r}")
    ratio = cfg.max_compression_ratio
    if isinstance(ratio, bool) or not math.isfinite(ratio) or ratio <= 0:
        raise ConfigError(f"ingest.max_compression_ratio: expected a number > 0, got {ratio!r}")


def split_counts(n: int, ratios: SplitRatios) -> tuple[int, int, int]:
    """How many of ``n`` images of one class go to train, val and test.

    Largest-remainder rounding keeps the total exact; then, if train has a non-zero ratio
    but got nothing (tiny classes), one image moves to train from the bigger of val/test,
    because a class missing from train cannot be learned at all.
    """
    weights = (ratios.train, ratios.val, ratios.test)
    quotas = [n * w for w in weights]
    counts = [math.floor(q + 1e-9) for q in quotas]
    by_remainder = sorted(range(3), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    if n > 0 and ratios.train > 0 and counts[0] == 0:
        donor = 1 if counts[1] >= counts[2] else 2
        counts[donor] -= 1
        counts[0] += 1
    return counts[0], counts[1], counts[2]


def assign_splits(
    images: Sequence[RawImage], ratios: SplitRatios, seed: int
) -> list[tuple[RawImage, str]]:
    """Give each image a split: the source's own when it was already split, else a
    seeded stratified one.

    Each class is shuffled by its own generator seeded with ``(seed, class)`` after sorting
    by path, so the split depends only on the seed and the files, not on the filesystem's
    listing order, and adding a class does not reshuffle the others.
    """
    if images and all(image.split is not None for image in images):
        return [(image, str(image.split)) for image in images]
    by_class: dict[str, list[RawImage]] = {}
    for image in sorted(images, key=lambda im: im.rel):
        by_class.setdefault(image.label, []).append(image)
    plan: list[tuple[RawImage, str]] = []
    for label in sorted(by_class):
        members = by_class[label]
        random.Random(f"{seed}/{label}").shuffle(members)
        n_train, n_val, _ = split_counts(len(members), ratios)
        for i, image in enumerate(members):
            split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
            plan.append((image, split))
    return plan


@contextlib.contextmanager
def _strict_truncation() -> Iterator[None]:
    """Make PIL raise on truncated files even if another module relaxed it globally."""
    from PIL import ImageFile

    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def decode_image(data: bytes) -> Any:
    """Decode fully (so truncation is caught), apply EXIF orientation, normalise the mode.

    Returns a ``PIL.Image.Image`` in mode L or RGB with no metadata except an ICC profile
    whose colour space still matches; raises :class:`UndecodableImage` with a short reason.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise UndecodableImage("empty file")
    try:
        with _strict_truncation(), Image.open(io.BytesIO(data)) as opened:
            opened.load()
            original_mode = opened.mode
            image = ImageOps.exif_transpose(opened)
            if image.mode in _WIDE_GRAY_MODES:
                image = to_8bit(image)
            elif image.mode not in KEPT_MODES:
                image = image.convert("RGB")
    except UnidentifiedImageError:
        raise UndecodableImage("not an image") from None
    except Image.DecompressionBombError:
        raise UndecodableImage("too many pixels (decompression bomb)") from None
    except Exception as exc:  # PIL raises many types for corrupt data; all mean "unusable"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UndecodableImage(f"cannot decode: {reason}"[:200]) from None
    # an ICC profile describes the original colour space: keep it only if that is unchanged
    icc = image.info.get("icc_profile") if image.mode == original_mode else None
    image.info = {"icc_profile": icc} if icc else {}
    return image


def to_8bit(image: Any) -> Any:
    """A 16-bit (or 32-bit integer) grayscale image as mode ``L``, keeping its contrast.

    PIL's own conversion clips at 255, so a 16-bit scan comes out nearly all white. The
    scale is fixed, ``round(v * 255 / 65535)``, not stretched to each image's own range:
    the same sensor value then maps to the same grey in every image, which is what a
    classifier should see. Mode ``I`` is ambiguous (PIL also uses it for 8-bit data):
    values within 0..255 are kept as they are, values within 0..65535 are read as 16-bit,
    and anything wider (negative, or 32-bit) is stretched from its minimum to its maximum.
    """
    import numpy as np
    from PIL import Image

    values = np.asarray(image)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if image.mode == "I" and low >= 0 and high <= 255:
        scaled = values
    elif low >= 0 and high <= _MAX_16BIT:  # uint32 holds 65535 * 255 without overflow
        scaled = (values.astype(np.uint32) * 255 + _MAX_16BIT // 2) // _MAX_16BIT
    else:
        span = max(high - low, 1)
        scaled = ((values.astype(np.int64) - low) * 255 + span // 2) // span
    return Image.fromarray(scaled.astype(np.uint8))  # 2-D uint8: mode L


def encode_image(image: Any, image_format: str) -> bytes:
    """Encode a decoded image deterministically (fixed settings, no metadata but ICC)."""
    pil_format, _, params = _FORMATS[image_format]
    buffer = io.BytesIO()
    icc = image.info.get("icc_profile")
    image.save(buffer, format=pil_format, **params, **({"icc_profile": icc} if icc else {}))
    return buffer.getvalue()


def write_images(
    plan: Sequence[tuple[RawImage, str]], dataset_dir: Path, *, image_format: str = "png"
) -> list[ManifestRow]:
    """Write each planned image under ``images/<split>/<class>/`` and describe it."""
    from tqdm import tqdm

    suffix = _FORMATS[image_format][1]
    order = {split: i for i, split in enumerate(SPLITS)}
    ordered = sorted(plan, key=lambda p: (order[p[1]], p[0].label, p[0].rel))
    used: dict[tuple[str, str], set[str]] = {}
    rows = []
    for image, split in tqdm(ordered, desc="ingest", unit="img", disable=None):
        original = image.path.read_bytes()
        try:
            decoded = decode_image(original)
        except UndecodableImage as exc:
            data, error, name_suffix = original, str(exc), image.path.suffix
            width = height = mode = None
        else:
            data, error, name_suffix = encode_image(decoded, image_format), "", suffix
            width, height, mode = decoded.width, decoded.height, decoded.mode
        names = used.setdefault((split, image.label), set())
        name = _unique_name(_sanitise_stem(image.path.stem), name_suffix, names)
        rel = image_path(split, image.label, name)
        target = dataset_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        rows.append(
            ManifestRow(
                path=rel,
                label=image.label,
                split=split,
                width=width,
                height=height,
                mode=mode,
                bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                error=error,
            )
        )
    _log_errors(rows)
    return sorted(rows, key=lambda r: r.path)


def _sanitise_stem(stem: str) -> str:
    """Keep file names portable and visible: ``[A-Za-z0-9._-]`` only, no leading dot.

    (The suffix needs no cleaning: only known image suffixes get this far.)
    """
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")
    return cleaned[:_MAX_STEM] or "image"


def _unique_name(stem: str, suffix: str, used: set[str]) -> str:
    """``stem + suffix``, or ``stem_1 + suffix``, ... if taken (case-insensitively)."""
    candidate, n = stem + suffix, 0
    while candidate.lower() in used:
        n += 1
        candidate = f"{stem}_{n}{suffix}"
    used.add(candidate.lower())
    return candidate


def _log_errors(rows: Iterable[ManifestRow]) -> None:
    bad = [r for r in rows if r.error]
    if bad:
        examples = "; ".join(f"{r.path}: {r.error}" for r in bad[:5])
        log.warning("%d file(s) could not be decoded (kept, see manifest): %s", len(bad), examples)


def _config_record(cfg: IngestConfig) -> dict[str, Any]:
    """The config as saved in ``config.json``: URI credentials and S3 secrets masked."""
    record = to_dict(cfg)
    record["source"] = redact_uri(cfg.source)
    record["s3"] = {k: "***" if _SECRET_KEY.search(str(k)) else v for k, v in dict(cfg.s3).items()}
    return record
