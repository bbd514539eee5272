"""The folder layouts a source may hold: ``<class>/<image>`` or ``train|val|test/<class>/<image>``.

Every source ends as a local folder in one of these layouts; scanning it is the same for all.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import NoReturn

from imgclf.contracts import SPLITS
from imgclf.errors import DataError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
"""File suffixes (lower case) that count as images; anything else in a class folder is ignored."""

IGNORED_TOP_LEVEL = frozenset({"__MACOSX"})  # resource forks that macOS zips add


@dataclasses.dataclass(frozen=True, slots=True)
class RawImage:
    """One candidate image found in a source tree, before decoding.

    A dataset may list millions of these, so each is small: slots, and the tree's root
    Path shared by all instead of a Path object (and its parts) per file.
    """

    root: Path
    """The root of the tree (the same object for every image of one scan)."""
    rel: str
    """POSIX path relative to the tree root: sort key and the path ``materialize_source`` keeps."""
    label: str
    """The class, i.e. the name of the class folder."""
    split: str | None
    """``train``/``val``/``test`` when the source was already split, else None."""

    @property
    def path(self) -> Path:
        """The file on disk."""
        return self.root.joinpath(*self.rel.split("/"))


def find_images(root: Path, *, label: str, allow_external_links: bool = False) -> list[RawImage]:
    """List the images of a tree in ImageFolder or split layout, sorted by relative path.

    A tree is split when its top-level folders are all named train/val/test and each holds
    class folders. Hidden files and folders are skipped, as are files without an image
    suffix; files directly under the root (or a split folder) are ignored, as torchvision's
    ImageFolder does. An empty tree or a class folder without a single image file raises
    DataError naming ``label`` and the folder, since a silently missing class would only
    surface as a confusing training failure.

    The tree is untrusted input, so these raise DataError as well, naming the path:

    - a symlink (class folder or image) that resolves outside ``root``, unless
      ``allow_external_links``: otherwise ``ln -s /etc/hostname cats/x.png`` copies a file
      of this machine into a dataset that may be published; links staying inside ``root``
      are followed;
    - an image name that is not a regular file (a FIFO would block the read forever, a
      broken link fail it);
    - a class folder whose name is not valid UTF-8 (it becomes a label, written to JSON,
      CSV and model files, which all need text); shown with ``\\x`` escapes.
    """
    guard = _Guard(Path(root), label, allow_external_links)
    root = guard.root
    top = guard.visible_dirs(root)
    if not top:
        raise DataError(
            f"ingest.source {label!r}: no class folders found; expected <class>/<image> or "
            "train|val|test/<class>/<image>"
        )
    is_split = all(d.name in SPLITS for d in top) and all(guard.visible_dirs(d) for d in top)
    groups = (
        [(split_dir.name, cls) for split_dir in top for cls in guard.visible_dirs(split_dir)]
        if is_split
        else [(None, cls) for cls in top]
    )
    images: list[RawImage] = []
    for split, class_dir in groups:
        guard.check_name(class_dir)
        found = _class_images(guard, class_dir, split)
        if not found:
            raise DataError(
                f"ingest.source {label!r}: class folder "
                f"{guard.quoted(class_dir)} has no images "
                f"(allowed: {' '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        images.extend(found)
    return sorted(images, key=lambda image: image.rel)


class _Guard:
    """The checks :func:`find_images` applies to every entry it takes from the tree."""

    def __init__(self, root: Path, label: str, allow_external_links: bool) -> None:
        self.root = root
        self.label = label
        self.allow_external_links = allow_external_links
        self._resolved_root = root.resolve()

    def quoted(self, path: Path) -> str:
        """``path`` relative to the root, quoted for a message; undecodable bytes of a
        (Linux) name shown as ``\\xNN`` rather than failing the print or the message."""
        rel = path.relative_to(self.root).as_posix()
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            raw = rel.encode("utf-8", "surrogateescape")
            return "'" + raw.decode("utf-8", "backslashreplace") + "'"
        return repr(rel)

    def refuse(self, path: Path, why: str) -> NoReturn:
        """Raise the one-line DataError naming the source and ``path``."""
        raise DataError(f"ingest.source {self.label!r}: {self.quoted(path)} {why}")

    def visible_dirs(self, path: Path) -> list[Path]:
        """Sub-folders of ``path`` that are not hidden, sorted by name, links checked.

        Only folders are checked: files beside the class folders are ignored anyway, so a
        linked README there is harmless.
        """
        found = []
        for entry in path.iterdir():
            if not entry.name.startswith(".") and entry.is_dir():
                self.check_link(entry)
                found.append(entry)
        return sorted(found, key=lambda e: e.name)

    def check_link(self, path: Path) -> None:
        """Refuse a symlink that resolves outside the root (or loops), unless allowed."""
        if not path.is_symlink():
            return
        try:
            target = path.resolve()
        except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python 3.11/3.12)
            self.refuse(path, "is a symlink loop")
        if self.allow_external_links or target.is_relative_to(self._resolved_root):
            return
        self.refuse(
            path,
            f"is a symlink leading outside the source (to {str(target)!r}); refused so no "
            "file from elsewhere on this machine enters the dataset (set "
            "ingest.allow_external_links: true to follow such links)",
        )

    def check_name(self, class_dir: Path) -> None:
        """Refuse a class folder name that is not valid UTF-8 (Linux names are bytes)."""
        try:
            class_dir.name.encode("utf-8")
        except UnicodeEncodeError:
            self.refuse(class_dir, "is not a valid UTF-8 name; rename the class folder")

    def check_file(self, path: Path) -> None:
        """Refuse an image name that is an outside link or not a regular file."""
        self.check_link(path)
        if not path.is_file():
            self.refuse(path, "is not a regular file (a broken link, FIFO, socket or device)")


def _class_images(guard: _Guard, class_dir: Path, split: str | None) -> list[RawImage]:
    """Image files anywhere below one class folder (sub-folders too, as ImageFolder does).

    Symlinked sub-folders are not entered (``os.walk`` default), which also keeps a link
    cycle from recursing forever.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(dirpath) / name
            guard.check_file(path)
            rel = path.relative_to(guard.root).as_posix()
            found.append(RawImage(root=guard.root, rel=rel, label=class_dir.name, split=split))
    return found
