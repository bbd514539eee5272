"""Where the server's model comes from, and the proof that its files are the published ones.

A model is served from a model dir (``--model-dir``: what train wrote, or what KServe's
storage initializer copied to ``/mnt/models``) or from a registry version (``--registry``
with ``--version`` or ``--alias``). Either way the server knows the sha256 every file must
have before it reads one: the registry's ``READY`` list, or the dir's own
``checksums.json``. A file that differs (a flipped byte, a truncated upload, a swapped
weights file) refuses the start, in one line naming the file.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from imgclf.contracts import (
    CHECKSUMS_FILE,
    MODEL_FILE,
    READY_FILE,
    WEIGHTS_FILE,
    read_model_checksums,
)
from imgclf.errors import ConfigError, DataError
from imgclf.fsutil import sha256_file
from imgclf.registry import ModelRegistry

log = logging.getLogger(__name__)

#: Files the server reads; each must be in the checksum list it verifies against.
SERVED_FILES = (MODEL_FILE, WEIGHTS_FILE)


class IntegrityError(DataError):
    """A model file does not match the sha256 recorded when it was written."""


@dataclass
class ModelSource:
    """A local model dir, the checksums its files must have, and what it is (for logs)."""

    model_dir: Path
    checksums: dict[str, str]
    recorded_in: str
    description: str
    version: int | None = None
    _cleanup: Path | None = field(default=None, repr=False)

    def close(self) -> None:
        """Delete the local copy of a registry version (nothing for a model dir)."""
        if self._cleanup is not None:
            shutil.rmtree(self._cleanup, ignore_errors=True)
            self._cleanup = None


def verify(source: ModelSource) -> None:
    """Check every file the source's checksums list (which must include the served ones).

    IntegrityError on the first file that is missing or differs, naming it and where the
    expected sha256 was recorded.
    """
    model_dir, checksums, against = source.model_dir, source.checksums, source.recorded_in
    for name in SERVED_FILES:
        if name not in checksums:
            raise IntegrityError(
                f"{model_dir / name}: not listed in {against}; refusing to serve a file "
                "nobody recorded"
            )
    for rel, expected in sorted(checksums.items()):
        path = model_dir / rel
        if not path.is_file():
            raise IntegrityError(f"{path}: missing (listed in {against})")
        actual = sha256_file(path)
        if actual != expected:
            raise IntegrityError(
                f"{path}: sha256 {actual[:12]}... does not match {expected[:12]}... "
                f"recorded in {against}; refusing to serve a modified model"
            )


def from_model_dir(model_dir: str | Path) -> ModelSource:
    """A model dir checked against its own ``checksums.json``."""
    root = Path(model_dir)
    if not root.is_dir():
        raise DataError(f"{root}: model dir not found")
    return ModelSource(
        root, read_model_checksums(root), str(root / CHECKSUMS_FILE), f"model dir {root}"
    )


def from_registry(
    uri: str, name: str, *, version: int | None = None, alias: str | None = None
) -> ModelSource:
    """A registry version (``version``, else the one ``alias`` points to), downloaded to a
    temporary dir and checked against its ``READY`` list."""
    if version is not None and alias is not None:
        raise ConfigError("serve: give --version or --alias, not both")
    reg = ModelRegistry.open(uri)
    if version is None:
        chosen = alias or "production"
        version = reg.alias(name, chosen)
        if version is None:
            raise ConfigError(
                f"model {name!r} has no alias {chosen!r} in registry {reg.uri}; "
                "pass --version, or promote one first"
            )
    info = reg.get(name, version)
    tmp = Path(tempfile.mkdtemp(prefix=f"imgclf-serve-{name}-{version}-"))
    try:
        local = reg.download(name, version, tmp / "model")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("downloaded %s version %d from %s", name, version, reg.uri)
    return ModelSource(
        local,
        dict(info.files),
        f"{reg.uri}/{reg.version_prefix(name, version)}/{READY_FILE}",
        f"{name} version {version} from {reg.uri}",
        version=version,
        _cleanup=tmp,
    )
