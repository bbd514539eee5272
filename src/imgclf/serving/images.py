"""Decode the images a client sends, refusing what would hurt the server.

Everything here treats the bytes as hostile: the format is checked against a short list, the
pixel count is read from the header and bounded *before* any pixel is decoded (a 50 kB PNG
can claim 100k x 100k pixels and take gigabytes to decode), and a truncated or corrupt file
is an error for that request, never a crash of the server.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from typing import Any

from PIL import Image, UnidentifiedImageError

#: Formats a client may send. Pillow can open many more; each is attack surface.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
#: Modes that convert to RGB without losing meaning (alpha is dropped). 16-bit and float
#: images (``I``, ``I;16``, ``F``) would need a scaling the model never saw in training.
MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")


class BadImage(ValueError):
    """A request's image cannot be used; the message says why (answered with HTTP 400)."""


def b64decode(text: Any, where: str) -> bytes:
    """Strict base64 (standard or URL-safe alphabet) to bytes, or BadImage naming ``where``."""
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("ascii", "replace")
    if not isinstance(text, str) or not text:
        raise BadImage(f"{where}: expected a non-empty base64 string")
    cleaned = "".join(text.split())
    if "-" in cleaned or "_" in cleaned:
        cleaned = cleaned.replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise BadImage(f"{where}: not valid base64") from None


def decode_image(data: bytes, *, max_pixels: int, where: str) -> Image.Image:
    """The decoded image of ``data`` (fully loaded, so later errors cannot surface).

    BadImage when the bytes are not an image in :data:`FORMATS`, claim more than
    ``max_pixels`` pixels, use a mode outside :data:`MODES`, or are truncated.
    """
    if not data:
        raise BadImage(f"{where}: empty image")
    try:
        with warnings.catch_warnings():
            # Pillow warns (and over 2x errors) on its own bomb limit; ours is stricter and
            # configurable, so its check must not fire first with another message.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        raise BadImage(
            f"{where}: image claims more pixels than serve.max_image_pixels={max_pixels} "
            "(a decompression bomb)"
        ) from None
    except UnidentifiedImageError:
        raise BadImage(
            f"{where}: not an image in a supported format ({', '.join(FORMATS)})"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(
            f"{where}: not an image in a supported format ({', '.join(FORMATS)}): {exc}"
        ) from None
    width, height = image.size
    if width < 1 or height < 1:
        raise BadImage(f"{where}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise BadImage(
            f"{where}: {width}x{height} = {width * height} pixels is more than "
            f"serve.max_image_pixels={max_pixels}"
        )
    if image.mode not in MODES:
        raise BadImage(f"{where}: image mode {image.mode!r} is not supported; use RGB or L")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImage(f"{where}: truncated or corrupt {image.format} image: {exc}") from None
    return image
