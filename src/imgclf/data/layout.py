"""The folder layouts a source may hold: ``<class>/<image>`` or ``train|val|test/<class>/<image>``.

Every source ends as a local folder in one of these layouts; scanning it is the same for all.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from imgclf.contracts import SPLITS
from imgclf.errors import DataError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
"""File suffixes (lower case) that count as images; anything else in a class folder is ignored."""

IGNORED_TOP_LEVEL = frozenset({"__MACOSX"})  # resource forks that macOS zips add


@dataclasses.dataclass(frozen=True)
class RawImage:
    """One candidate image found in a source tree, before decoding."""

    path: Path
    """The file on disk."""
    rel: str
    """POSIX path relative to the tree root: sort key and the path ``materialize_source`` keeps."""
    label: str
    """The class, i.e. the name of the class folder."""
    split: str | None
    """``train``/``val``/``test`` when the source was already split, else None."""


def find_images(root: Path, *, label: str) -> list[RawImage]:
    """List the images of a tree in ImageFolder or split layout, sorted by relative path.

    A tree is split when its top-level folders are all named train/val/test and each holds
    class folders. Hidden files and folders are skipped, as are files without an image
    suffix; files directly under the root (or a split folder) are ignored, as torchvision's
    ImageFolder does. An empty tree or a class folder without a single image file raises
    DataError naming ``label`` and the folder, since a silently missing class would only
    surface as a confusing training failure.
    """
    root = Path(root)
    top = _visible_dirs(root)
    if not top:
        raise DataError(
            f"ingest.source {label!r}: no class folders found; expected <class>/<image> or "
            "train|val|test/<class>/<image>"
        )
    is_split = all(d.name in SPLITS for d in top) and all(_visible_dirs(d) for d in top)
    groups = (
        [(split_dir.name, cls) for split_dir in top for cls in _visible_dirs(split_dir)]
        if is_split
        else [(None, cls) for cls in top]
    )
    images: list[RawImage] = []
    for split, class_dir in groups:
        found = _class_images(root, class_dir, split)
        if not found:
            raise DataError(
                f"ingest.source {label!r}: class folder "
                f"{class_dir.relative_to(root).as_posix()!r} has no images "
                f"(allowed: {' '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        images.extend(found)
    return sorted(images, key=lambda image: image.rel)


def _visible_dirs(path: Path) -> list[Path]:
    """Sub-folders of ``path`` that are not hidden, sorted by name."""
    return sorted(
        (e for e in path.iterdir() if e.is_dir() and not e.name.startswith(".")),
        key=lambda e: e.name,
    )


def _class_images(root: Path, class_dir: Path, split: str | None) -> list[RawImage]:
    """Image files anywhere below one class folder (sub-folders too, as ImageFolder does)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            found.append(RawImage(path=path, rel=rel, label=class_dir.name, split=split))
    return found
