"""The embedded sample datasets (``sample:digits``), rendered deterministically offline."""

from __future__ import annotations

from pathlib import Path

from imgclf.errors import ConfigError

_PNG_COMPRESS_LEVEL = 6  # fixed so generated files are byte-identical on every run


def write_digits(dest: Path, image_size: int = 32) -> None:
    """Render scikit-learn's handwritten digits as ``<digit>/digit_<index>.png``.

    1,797 real 8x8 scans (values 0..16) scaled to 0..255, upscaled to ``image_size`` px,
    grayscale. File names are the dataset index (``digit_00000.png`` is ``load_digits()``
    row 0) and PNGs carry no metadata with a fixed compression level, so every run writes
    byte-identical files and DVC sees no change.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"ingest.image_size: expected a positive integer, got {image_size!r}")
    digits = load_digits()
    pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    dest = Path(dest)
    for label in sorted(set(int(t) for t in digits.target)):
        (dest / str(label)).mkdir(parents=True, exist_ok=True)
    for index, (array, label) in enumerate(zip(pixels, digits.target, strict=True)):
        image = Image.fromarray(array)
        if image_size != array.shape[0]:
            image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
        image.save(
            dest / str(int(label)) / f"digit_{index:05d}.png",
            format="PNG",
            compress_level=_PNG_COMPRESS_LEVEL,
        )


SAMPLES = {"digits": write_digits}
