"""The DVC-versioned raw ``data/`` folder: fill it from a source, or restore it.

``data.dvc`` pins the exact content of ``data/``. A fresh clone has no ``data/`` and may
have no reachable DVC remote, yet the demo must run offline. The embedded sample
(``sample:digits``) is rendered deterministically, so ``ensure_data`` can rebuild it and
then *prove* it is the versioned dataset by letting DVC compare it with ``data.dvc``.

The repository's default remote (``minio``, a local S3 server) is usually not running on a
fresh machine, and an S3 client facing a closed port retries for many seconds. So
``dvc pull`` is tried only when it can work: the remote has credentials (environment or
``.dvc/config.local``) and its endpoint accepts a TCP connection; it runs with a time
limit (``IMGCLF_DVC_PULL_TIMEOUT`` seconds, default 120).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from imgclf.errors import ConfigError, DataError

log = logging.getLogger(__name__)

PULL_TIMEOUT_VAR = "IMGCLF_DVC_PULL_TIMEOUT"
DEFAULT_PULL_TIMEOUT = 120.0
CONNECT_TIMEOUT = 2.0
"""Seconds to wait for a TCP connection to the remote's endpoint before pulling."""


def _dvc(*args: str, cwd: Path, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("dvc") or str(Path(sys.prefix) / "bin" / "dvc")
    return subprocess.run(
        [exe, *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=timeout
    )


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


def _dvc_config(repo: Path) -> Mapping[str, Any]:
    """The merged DVC config (system, global, ``.dvc/config``, ``.dvc/config.local``)."""
    from dvc.config import Config
    from dvc.exceptions import DvcException

    try:
        return Config(dvc_dir=str(repo / ".dvc"))
    except DvcException as exc:
        raise DataError(f"{repo / '.dvc'}: cannot read the DVC config: {exc}") from None


def _in_cache(config: Mapping[str, Any], repo: Path, md5: str) -> bool:
    """True if the object ``md5`` names (``<hash>.dir`` for a folder's listing) is cached."""
    if not md5:
        return False
    cache_dir = (config.get("cache") or {}).get("dir")
    root = Path(cache_dir) if cache_dir else repo / ".dvc" / "cache"
    return (root / "files" / "md5" / md5[:2] / md5[2:]).is_file()


def _has_s3_credentials(remote: Mapping[str, Any], env: Mapping[str, str]) -> bool:
    """Whether boto (DVC's S3 client) will find credentials for ``remote``."""
    if remote.get("access_key_id") and remote.get("secret_access_key"):
        return True
    if remote.get("profile") or remote.get("credentialpath"):
        return True
    if remote.get("allow_anonymous_login"):
        return True
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return True
    if env.get("AWS_PROFILE"):
        return True
    shared = env.get("AWS_SHARED_CREDENTIALS_FILE") or str(Path.home() / ".aws" / "credentials")
    return Path(shared).is_file()


def _reachable(url: str) -> bool:
    """True if ``host:port`` of ``url`` accepts a TCP connection within CONNECT_TIMEOUT."""
    parts = urlsplit(url)
    if not parts.hostname:
        return True  # not a URL we can probe; let DVC try
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT):
            return True
    except (OSError, ValueError):
        return False


def pull_blocker(repo: Path, env: Mapping[str, str] | None = None) -> str | None:
    """Why ``dvc pull`` cannot work in ``repo`` right now, or None if it is worth trying.

    Checked without network beyond one TCP connect: a default remote exists; an S3 remote
    has credentials (env ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile, or
    ``access_key_id``/``secret_access_key`` in ``.dvc/config.local``); and its endpoint
    (``endpointurl``, else ``AWS_ENDPOINT_URL``) accepts connections. The reason names the
    remote and what to set, never a credential.
    """
    env = os.environ if env is None else env
    config = _dvc_config(repo)
    name = (config.get("core") or {}).get("remote")
    if not name:
        return "no default DVC remote"
    remote = (config.get("remote") or {}).get(name)
    if remote is None:
        return f"default DVC remote {name!r} is not defined"
    url = str(remote.get("url", ""))
    if not url.startswith("s3://"):
        return None
    if not _has_s3_credentials(remote, env):
        return (
            f"no S3 credentials for DVC remote {name!r} (set AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY, or `dvc remote modify --local` it)"
        )
    endpoint = remote.get("endpointurl") or env.get("AWS_ENDPOINT_URL_S3")
    endpoint = endpoint or env.get("AWS_ENDPOINT_URL")
    if endpoint and not _reachable(str(endpoint)):
        return f"DVC remote {name!r} endpoint {endpoint} is not reachable"
    return None


def _pull_timeout(env: Mapping[str, str]) -> float:
    raw = env.get(PULL_TIMEOUT_VAR, "").strip()
    if not raw:
        return DEFAULT_PULL_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ConfigError(f"{PULL_TIMEOUT_VAR}={raw!r}: expected a number of seconds > 0")
    return value


def _restore(dvc_file: Path, data: Path) -> str | None:
    """Restore ``data`` from the DVC cache, else the remote; an account of how, or None.

    The cache needs no network (``dvc checkout``); the remote is tried only when
    :func:`pull_blocker` finds nothing in the way. Failures are logged, not raised: the
    caller falls back to rebuilding the sample.
    """
    repo = dvc_file.parent
    config = _dvc_config(repo)
    if _in_cache(config, repo, _out_md5(dvc_file)):
        res = _dvc("checkout", dvc_file.name, cwd=repo)
        if res.returncode == 0 and data.exists() and _matches(dvc_file):
            return f"restored {data.name}/ from the DVC cache"
        log.info("the DVC cache does not hold all of %s/", data.name)
    if os.environ.get("IMGCLF_SKIP_DVC_PULL") == "1":
        log.info("not trying `dvc pull`: IMGCLF_SKIP_DVC_PULL=1")
        return None
    blocker = pull_blocker(repo)
    if blocker is not None:
        log.info("not trying `dvc pull`: %s", blocker)
        return None
    timeout = _pull_timeout(os.environ)
    try:
        pulled = _dvc("pull", dvc_file.name, cwd=repo, timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("`dvc pull` took more than %gs (%s); giving up", timeout, PULL_TIMEOUT_VAR)
        return None
    if pulled.returncode == 0 and data.exists() and _matches(dvc_file):
        return f"restored {data.name}/ with `dvc pull` from the DVC remote"
    last = (pulled.stderr.strip().splitlines() or ["no output"])[-1]
    log.warning("`dvc pull` did not restore %s/: %s", data.name, last)
    return None


def ensure_data(dvc_file: Path, *, sample: str = "sample:digits", image_size: int = 32) -> str:
    """Make the folder tracked by ``dvc_file`` present and identical to what it pins.

    Order: keep an existing folder (a user's changed data is never overwritten, only
    reported); else restore it from the DVC cache or, when credentials and the endpoint
    are there, ``dvc pull`` it; else rebuild ``sample`` and check it against ``dvc_file``.
    Returns a one-line account of what happened.
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
    restored = _restore(dvc_file, data)
    if restored is not None:
        return restored
    from imgclf.data.sources import materialize_source

    materialize_source(sample, data, image_size=image_size)
    if not _matches(dvc_file):
        raise DataError(
            f"rebuilt {data.name}/ from {sample}, but it does not match {dvc_file.name}; "
            f"`dvc pull` it from the remote, or run `dvc add {data.name}` if you meant to "
            "change the dataset"
        )
    return f"rebuilt {data.name}/ from {sample}; it matches {dvc_file.name}"
