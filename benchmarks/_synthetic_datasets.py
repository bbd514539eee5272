"""Small synthetic ImageFolder datasets for ``recipe_vs_baselines.py``, rendered from a seed.

Each generator writes ``<dest>/<class>/<image>`` with a few hundred images whose class is a
property of an object or texture, not of particular pixels: position, size, rotation,
colours, background and phase are all random, so a classifier on raw pixel values has
little to hold on to while a convolutional network can learn the local pattern. The files
also vary the way a real upload folder does: width and height 24-80 px (not square),
modes L, RGB, RGBA and P, PNG and JPEG, so the run goes through ingest's normalisation.

Every image comes from its own generator seeded with ``(seed, index)``: the same seed
writes the same pixels on every run, and changing ``per_class`` adds or drops images
without changing the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# (mode, format) cycled per image; RGBA and P are converted to RGB by ingest.
_VARIANTS = (
    ("RGB", "PNG"),
    ("L", "PNG"),
    ("RGB", "JPEG"),
    ("RGBA", "PNG"),
    ("L", "JPEG"),
    ("P", "PNG"),
)
_SUFFIX = {"PNG": ".png", "JPEG": ".jpg"}
_MIN_SIDE, _MAX_SIDE = 24, 80
_MAX_ASPECT = 1.4  # more would distort shapes and angles badly once resized to a square
_MIN_CONTRAST = 70.0  # luminance gap between figure and ground, so grayscale copies keep it
_SUPERSAMPLE = 4  # shapes are drawn this much larger and downscaled, for anti-aliased edges

SHAPES = ("circle", "cross", "square", "triangle")
TEXTURES = ("checks", "dots", "stripes")

Renderer = Callable[[np.random.Generator, str, int, int], Image.Image]


def _size(rng: np.random.Generator) -> tuple[int, int]:
    """A random (width, height) within the side and aspect bounds."""
    while True:
        width, height = (int(v) for v in rng.integers(_MIN_SIDE, _MAX_SIDE + 1, size=2))
        if max(width, height) / min(width, height) <= _MAX_ASPECT:
            return width, height


def _luminance(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random RGB colours whose luminances differ by at least ``_MIN_CONTRAST``."""
    while True:
        first, second = rng.uniform(0, 255, size=(2, 3))
        if abs(_luminance(first) - _luminance(second)) >= _MIN_CONTRAST:
            return first, second


def _background(rng: np.random.Generator, width: int, height: int, base: np.ndarray) -> np.ndarray:
    """A float (H, W, 3) linear gradient around ``base`` in a random direction, plus noise."""
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    ramp = (xs * math.cos(angle) + ys * math.sin(angle)) / max(width, height)
    ramp -= ramp.mean()
    tint = rng.uniform(-40, 40, size=3)
    noise = rng.normal(0, rng.uniform(4, 14), size=(height, width, 3))
    return base + ramp[..., None] * tint + noise


def _polygon(kind: str, cx: float, cy: float, r: float, theta: float) -> list[tuple[float, float]]:
    """Vertices of a square, triangle or cross of circumradius ``r`` rotated by ``theta``."""
    if kind == "square":
        points = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
        scale = r / math.sqrt(2)
    elif kind == "triangle":
        points = [(math.cos(a), math.sin(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
        scale = r
    else:  # a plus sign with arms one third of its span wide
        t = 1 / 3
        points = [(t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]
        points += [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t)]
        scale = r / math.hypot(1, t)
    cos, sin = math.cos(theta), math.sin(theta)
    return [(cx + scale * (x * cos - y * sin), cy + scale * (x * sin + y * cos)) for x, y in points]


def render_shape(rng: np.random.Generator, label: str, width: int, height: int) -> Image.Image:
    """One filled shape of random size (radius 20-42% of the short side), colour, position
    and rotation on a noisy gradient background."""
    ground, figure = _colour_pair(rng)
    canvas = np.clip(_background(rng, width, height, ground), 0, 255).astype(np.uint8)
    big = Image.fromarray(canvas).resize(
        (width * _SUPERSAMPLE, height * _SUPERSAMPLE), Image.Resampling.NEAREST
    )
    mask = Image.new("L", big.size, 0)
    s = _SUPERSAMPLE
    r = rng.uniform(0.20, 0.42) * min(width, height) * s
    cx = rng.uniform(r, width * s - r)
    cy = rng.uniform(r, height * s - r)
    draw = ImageDraw.Draw(mask)
    if label == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.polygon(_polygon(label, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=255)
    fill = Image.new("RGB", big.size, tuple(int(v) for v in figure))
    big.paste(fill, mask=mask)
    return big.resize((width, height), Image.Resampling.BOX)


def _texture(rng: np.random.Generator, label: str, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """A texture in [0, 1] with a random period, orientation and phase.

    Soft edges (a clipped, steep sine) rather than hard thresholds, so small images do not
    alias into some other pattern.
    """
    short = min(xs.shape)
    period = rng.uniform(0.16, 0.26) * short
    theta = rng.uniform(0, math.pi)
    u = (xs * math.cos(theta) + ys * math.sin(theta)) * 2 * math.pi / period
    v = (-xs * math.sin(theta) + ys * math.cos(theta)) * 2 * math.pi / period
    u += rng.uniform(0, 2 * math.pi)
    v += rng.uniform(0, 2 * math.pi)
    if label == "stripes":
        wave = np.sin(u)
    elif label == "checks":
        wave = np.sin(u) * np.sin(v) * 2
    else:  # round dots on a lattice: only the peaks of cos u + cos v
        wave = (np.cos(u) + np.cos(v) - 1.0) * 2
    return np.clip(0.5 + 1.5 * wave, 0, 1)


def render_texture(rng: np.random.Generator, label: str, width: int, height: int) -> Image.Image:
    """A rectangular patch (55-85% of each side) of stripes, checks or dots, at a random
    place on a noisy gradient background of another colour."""
    ground, ink = _colour_pair(rng)
    paper = ground + rng.uniform(-1, 1, size=3) * 30
    canvas = _background(rng, width, height, ground)
    pw = max(8, int(rng.uniform(0.55, 0.85) * width))
    ph = max(8, int(rng.uniform(0.55, 0.85) * height))
    x0 = int(rng.integers(0, width - pw + 1))
    y0 = int(rng.integers(0, height - ph + 1))
    ys, xs = np.mgrid[0:ph, 0:pw].astype(np.float64)
    amount = _texture(rng, label, xs, ys)[..., None]
    patch = paper * (1 - amount) + ink * amount
    canvas[y0 : y0 + ph, x0 : x0 + pw] = patch + rng.normal(0, 6, size=patch.shape)
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))


def _save(image: Image.Image, variant: int, rng: np.random.Generator, stem: Path) -> None:
    """Save in the variant's mode and format (fixed settings, so files repeat byte for byte)."""
    mode, fmt = _VARIANTS[variant % len(_VARIANTS)]
    if mode == "RGBA":
        # ingest drops alpha without compositing, so any alpha keeps the picture intact
        image = image.convert("RGBA")
        image.putalpha(int(rng.integers(128, 256)))
    elif mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    else:
        image = image.convert(mode)
    path = stem.with_suffix(_SUFFIX[fmt])
    if fmt == "JPEG":
        image.save(path, format="JPEG", quality=int(rng.integers(70, 96)))
    else:
        image.save(path, format="PNG", compress_level=6)


def _write(
    dest: Path, classes: tuple[str, ...], render: Renderer, *, per_class: int, seed: int
) -> None:
    """Render ``per_class`` images of each class into ``dest/<class>/``, round-robin."""
    dest = Path(dest)
    for label in classes:
        (dest / label).mkdir(parents=True, exist_ok=True)
    for index in range(per_class * len(classes)):
        label = classes[index % len(classes)]
        rng = np.random.default_rng([seed, index])
        width, height = _size(rng)
        image = render(rng, label, width, height)
        _save(image, index // len(classes), rng, dest / label / f"{label}_{index:04d}")


def write_shapes(dest: Path, *, per_class: int = 90, seed: int = 0) -> None:
    """Circles, crosses, squares and triangles (``per_class`` each, 360 by default)."""
    _write(dest, SHAPES, render_shape, per_class=per_class, seed=seed)


def write_textures(dest: Path, *, per_class: int = 110, seed: int = 0) -> None:
    """Patches of checks, dots and stripes (``per_class`` each, 330 by default)."""
    _write(dest, TEXTURES, render_texture, per_class=per_class, seed=seed)


GENERATORS: dict[str, Callable[..., None]] = {"shapes": write_shapes, "textures": write_textures}
"""Generated datasets by name: each is called as ``writer(dest, seed=...)``."""
