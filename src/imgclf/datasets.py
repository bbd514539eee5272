"""The DVC-versioned raw ``data/`` folder: fill it from a source, or restore it.

``data.dvc`` pins the exact content of ``data/``. A fresh clone has no ``data/`` and may
have no reachable DVC remote, yet the demo must run offline. The embedded sample
(``sample:digits``) is rendered deterministically, so ``ensure_data`` can rebuild it and
then *prove* it is the versioned dataset by letting DVC compare it with ``data.dvc``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from imgclf.errors import DataError

log = logging.getLogger(__name__)


def _dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("dvc") or str(Path(sys.prefix) / "bin" / "dvc")
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, check=False)


def materialize_into(source: str, dest: Path, *, image_size: int = 32) -> Path:
    """Write ``source`` as raw ``<class>/<image>`` files into ``dest`` (replaced atomically)."""
    from imgclf.sources import materialize_source

    return materialize_source(source, dest, image_size=image_size)


def _tracked_path(dvc_file: Path) -> Path:
    try:
        spec = yaml.safe_load(dvc_file.read_text(encoding="utf-8"))
        return dvc_file.parent / spec["outs"][0]["path"]
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError) as exc:
        raise DataError(f"{dvc_file}: cannot read the tracked path ({exc})") from None


def _out_md5(dvc_file: Path) -> str:
    spec = yaml.safe_load(dvc_file.read_text(encoding="utf-8"))
    return str(spec["outs"][0].get("md5", ""))


def _matches(dvc_file: Path) -> bool:
    """True if the workspace copy of the tracked folder has exactly the hash ``dvc_file`` pins.

    ``dvc status`` cannot say so on a fresh clone (it reports "not in cache"), so let
    ``dvc commit`` hash the folder into the cache and compare the md5 it would record; the
    ``.dvc`` file itself is always left byte-for-byte as it was.
    """
    pinned_text = dvc_file.read_text(encoding="utf-8")
    pinned = _out_md5(dvc_file)
    res = _dvc("commit", "--force", dvc_file.name, cwd=dvc_file.parent)
    try:
        if res.returncode != 0:
            raise DataError(f"`dvc commit {dvc_file.name}` failed: {res.stderr.strip()}")
        return _out_md5(dvc_file) == pinned
    finally:
        dvc_file.write_text(pinned_text, encoding="utf-8")


def ensure_data(dvc_file: Path, *, sample: str = "sample:digits", image_size: int = 32) -> str:
    """Make the folder tracked by ``dvc_file`` present and identical to what it pins.

    Order: keep an existing folder (a user's changed data is never overwritten, only
    reported); else ``dvc pull`` from the configured remote; else rebuild ``sample`` and
    check it against ``dvc_file``. Returns a one-line account of what happened.
    """
    dvc_file = dvc_file.resolve()
    if not dvc_file.is_file():
        raise DataError(f"{dvc_file}: not found (run `dvc add data` to version a dataset)")
    data = _tracked_path(dvc_file)
    if data.exists():
        if _matches(dvc_file):
            return f"{data.name}/ matches {dvc_file.name}"
        return (
            f"{data.name}/ differs from {dvc_file.name}: using it as it is; "
            f"run `dvc add {data.name}` to version it"
        )
    env_remote = os.environ.get("IMGCLF_SKIP_DVC_PULL") != "1"
    if env_remote:
        pulled = _dvc("pull", dvc_file.name, cwd=dvc_file.parent)
        if pulled.returncode == 0 and data.exists() and _matches(dvc_file):
            return f"restored {data.name}/ with `dvc pull` (DVC cache or remote)"
        log.info("dvc pull did not restore %s/; rebuilding it from %s", data.name, sample)
    materialize_into(sample, data, image_size=image_size)
    if not _matches(dvc_file):
        raise DataError(
            f"rebuilt {data.name}/ from {sample}, but it does not match {dvc_file.name}; "
            f"`dvc pull` it from the remote, or run `dvc add {data.name}` if you meant to "
            "change the dataset"
        )
    return f"rebuilt {data.name}/ from {sample}; it matches {dvc_file.name}"
