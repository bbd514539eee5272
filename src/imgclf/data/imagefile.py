"""One source image file in, the file the dataset stores out: decode, check, convert, hash.

This is the per-file half of the ingest step (:mod:`imgclf.steps.ingest` plans, names and
orders). It runs in worker processes, so it imports nothing heavy at module level and reads
and writes files by path: only a short description crosses between processes, never the
image bytes.

What is stored (``ingest.image_format``):

- ``keep`` (default): a file is stored byte for byte when it decodes, is JPEG, PNG or WebP
  (:data:`KEEP_FORMATS`: compressed, and read natively by PIL, torchvision, browsers and
  the serving container alike), has mode ``L`` or ``RGB`` (:data:`KEPT_MODES`, what
  validate allows by default) and no EXIF orientation but 1. Anything else is converted
  and the manifest says why (``format TIFF; mode 1``, ``exif-orientation 6``): its pixels
  normalised as below, then encoded as JPEG when the source was a JPEG (with the source's
  own quantisation tables and subsampling when only the orientation changed, so size and
  quality stay where the source had them; a PNG of a photo is several times larger), and
  as PNG otherwise (lossless, so nothing is lost that the source still had). Kept files
  keep their metadata, EXIF (GPS) included; ``png`` strips it.
- ``png``: every decodable image is normalised and re-encoded as PNG without metadata.

Normalised pixels: the file is decoded with PIL (truncated files are errors, not silently
padded; PIL's decompression-bomb limit applies), its EXIF orientation applied; 16-bit
grayscale (``I;16``, ``I;16B``, ...) becomes ``L`` scaled by ``255 / 65535`` (see
:func:`to_8bit`); every mode but ``L`` and ``RGB`` (``P``, ``RGBA``, ``LA``, ``CMYK``, ``1``,
...) becomes ``RGB``: alpha is dropped, not composited; animated files keep their first frame.

Files that cannot be decoded are stored as they are, with the reason in ``error``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

KEPT_MODES = ("L", "RGB")
"""Image modes stored as they are; any other mode is converted (see the module doc)."""

KEEP_FORMATS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp"}
"""PIL format -> suffix of the files ``keep`` stores byte for byte (MPO: a camera JPEG
carrying extra pictures; every JPEG reader decodes its first)."""

KEEP = "keep"
KEPT = "kept"
CONVERTED = "converted"

_ENCODINGS = {"png": ("PNG", ".png", {"compress_level": 6}), "jpeg": ("JPEG", ".jpg", {})}
IMAGE_FORMATS = (KEEP, "png")
"""The values ``ingest.image_format`` accepts."""

_JPEG_SOURCES = ("JPEG", "MPO")
_JPEG_QUALITY = 95  # for a JPEG whose mode changed too (CMYK): its own tables no longer fit
_ORIENTATION_TAG = 0x0112
_TRANSPOSING = range(2, 9)  # orientations ImageOps.exif_transpose acts on
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_MAX_16BIT = 65535


class UndecodableImage(Exception):
    """Raised by :func:`decode_image`; its message is the short reason for the manifest."""


@dataclasses.dataclass(frozen=True)
class Decoded:
    """A decoded file: its normalised image and what a verbatim copy would get wrong."""

    image: Any
    """``PIL.Image.Image`` in mode L or RGB, no metadata but a still-valid ICC profile."""
    format: str
    """PIL's name of the file's format (``JPEG``, ``PNG``, ...)."""
    changes: tuple[str, ...]
    """Why the file itself is not what the dataset wants (empty: store it byte for byte)."""
    jpeg_settings: dict[str, Any]
    """Encoder settings reproducing the source's JPEG compression (empty if not a JPEG)."""


@dataclasses.dataclass(frozen=True)
class StoredFile:
    """What :func:`store_image` wrote, for the manifest row."""

    suffix: str
    width: int | None
    height: int | None
    mode: str | None
    bytes: int
    sha256: str
    stored: str
    """``kept`` (the source's bytes) or ``converted``."""
    conversion: str = ""
    """Why it was converted; empty when kept."""
    error: str = ""
    """Why it could not be decoded; empty when it could."""


StoreTask = tuple[Path, Path, str]
"""The arguments of one :func:`store_image` call: source, target, image_format."""


def store_images(tasks: list[StoreTask]) -> list[StoredFile]:
    """:func:`store_image` for a chunk of tasks (one message to and from a worker)."""
    return [store_image(*task) for task in tasks]


def store_image(source: Path, target: Path, image_format: str) -> StoredFile:
    """Read ``source``, write what the dataset stores of it to ``target``, describe it."""
    original = Path(source).read_bytes()
    try:
        decoded = decode_image(original)
    except UndecodableImage as exc:
        return _write(target, original, Path(source).suffix, None, KEPT, "", str(exc))
    if image_format == KEEP and not decoded.changes:
        return _write(target, original, KEEP_FORMATS[decoded.format], decoded, KEPT, "", "")
    if image_format == KEEP:
        encoding = "jpeg" if decoded.format in _JPEG_SOURCES else "png"
        why = "; ".join(decoded.changes)
    else:
        encoding, why = image_format, f"image_format {image_format}"
    data = encode_image(decoded, encoding)
    return _write(target, data, _ENCODINGS[encoding][1], decoded, CONVERTED, why, "")


def _write(
    target: Path,
    data: bytes,
    suffix: str,
    decoded: Decoded | None,
    stored: str,
    conversion: str,
    error: str,
) -> StoredFile:
    Path(target).write_bytes(data)
    image = decoded.image if decoded else None
    return StoredFile(
        suffix=suffix,
        width=image.width if image else None,
        height=image.height if image else None,
        mode=image.mode if image else None,
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        stored=stored,
        conversion=conversion,
        error=error,
    )


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


def decode_image(data: bytes) -> Decoded:
    """Decode fully (so truncation is caught), apply EXIF orientation, normalise the mode.

    Raises :class:`UndecodableImage` with a short reason.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise UndecodableImage("empty file")
    try:
        with _strict_truncation(), Image.open(io.BytesIO(data)) as opened:
            opened.load()
            fmt, original_mode = str(opened.format), opened.mode
            orientation = opened.getexif().get(_ORIENTATION_TAG, 1)
            changes = _changes(fmt, original_mode, orientation)
            jpeg_settings = _jpeg_settings(opened) if fmt in _JPEG_SOURCES else {}
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
    if image.mode != original_mode:
        jpeg_settings = {"quality": _JPEG_QUALITY}
    return Decoded(image, fmt, changes, jpeg_settings)


def _changes(fmt: str, mode: str, orientation: Any) -> tuple[str, ...]:
    """Why a file of this format, mode and EXIF orientation cannot be kept as it is."""
    changes = []
    if fmt not in KEEP_FORMATS:
        changes.append(f"format {fmt}")
    if mode not in KEPT_MODES:
        changes.append(f"mode {mode}")
    if orientation in _TRANSPOSING:
        changes.append(f"exif-orientation {orientation}")
    return tuple(changes)


def _jpeg_settings(opened: Any) -> dict[str, Any]:
    """The source JPEG's quantisation tables and chroma subsampling, to encode alike."""
    from PIL import JpegImagePlugin

    settings: dict[str, Any] = {}
    tables = getattr(opened, "quantization", None)
    if tables:
        settings["qtables"] = tables
    else:
        settings["quality"] = _JPEG_QUALITY
    sampling = JpegImagePlugin.get_sampling(opened)
    if sampling != -1:
        settings["subsampling"] = sampling
    return settings


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


def encode_image(decoded: Decoded, encoding: str) -> bytes:
    """Encode a decoded image deterministically (fixed settings, no metadata but ICC)."""
    pil_format, _, params = _ENCODINGS[encoding]
    image = decoded.image
    settings = {**params, **(decoded.jpeg_settings if pil_format == "JPEG" else {})}
    icc = image.info.get("icc_profile")
    if icc:
        settings["icc_profile"] = icc
    buffer = io.BytesIO()
    image.save(buffer, format=pil_format, **settings)
    return buffer.getvalue()
