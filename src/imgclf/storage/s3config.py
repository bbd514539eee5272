"""S3 connection settings: read from the environment the usual S3 way, tuned in params.yaml.

Credentials come only from the environment (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
or ``MINIO_ACCESS_KEY`` / ``MINIO_SECRET_KEY``), because params.yaml is committed to git and a
key in it would be published with the repository. Everything else (endpoint, TLS, region,
timeout, retries, multipart part size, parallel workers) can also be set in the ``s3:``
section of params.yaml, which then takes precedence over the environment so that a
checked-in pipeline behaves the same on every machine.

That section is read by the edge only (the CLI from ``--params``; a KFP component has none and
uses the environment), which hands it down with :func:`s3_params`; below the edge every store
asks :func:`resolve_s3_settings`, so no library module opens params.yaml or depends on the
working directory.

Environment variables read:

===========================================  ===========================================
``MINIO_ENDPOINT``, ``AWS_ENDPOINT_URL_S3``,   endpoint (first one set wins), either
``AWS_ENDPOINT_URL``                           ``http(s)://host:port`` or bare ``host:port``
``MINIO_SECURE``                               TLS for a bare ``host:port`` (default true)
``AWS_ACCESS_KEY_ID`` / ``MINIO_ACCESS_KEY``   access key
``AWS_SECRET_ACCESS_KEY`` / ``MINIO_SECRET_KEY``  secret key (never printed)
``AWS_SESSION_TOKEN``                          temporary-credential token (never printed)
``AWS_REGION`` / ``AWS_DEFAULT_REGION``        region
``IMGCLF_S3_TIMEOUT``                          connect/read timeout in seconds (default 10)
``IMGCLF_S3_RETRIES``                          retries on connection errors and 5xx (default 3)
``IMGCLF_S3_PART_SIZE``                        multipart part size in bytes (default 16 MiB)
``IMGCLF_S3_WORKERS``                          parallel transfers (default 8)
``IMGCLF_S3_CREATE_BUCKET``                    create a missing bucket on the first write
                                               (default false: a missing bucket is an error)
===========================================  ===========================================
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from imgclf.config import build, read_params
from imgclf.errors import ConfigError

MIB = 1 << 20
MIN_PART_SIZE = 5 * MIB  # S3's floor for every part but the last
MAX_PART_SIZE = 5 * 1024 * MIB
DEFAULT_ENDPOINT = "s3.amazonaws.com"

ENDPOINT_VARS = ("MINIO_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
ACCESS_KEY_VARS = ("AWS_ACCESS_KEY_ID", "MINIO_ACCESS_KEY")
SECRET_KEY_VARS = ("AWS_SECRET_ACCESS_KEY", "MINIO_SECRET_KEY")
REGION_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_SECRET_PARAM_KEYS = {
    "access_key",
    "secret_key",
    "access_key_id",
    "secret_access_key",
    "session_token",
    "aws_access_key_id",
    "aws_secret_access_key",
}


@dataclasses.dataclass(frozen=True)
class S3Params:
    """The non-secret knobs params.yaml's ``s3:`` section may set (None: not set there)."""

    endpoint: str | None = None
    secure: bool | None = None
    region: str | None = None
    timeout: float | None = None
    retries: int | None = None
    part_size: int | None = None
    workers: int | None = None
    create_bucket: bool | None = None


@dataclasses.dataclass(frozen=True)
class S3Settings:
    """Everything needed to talk to one S3 endpoint; the secret never appears in its repr."""

    endpoint: str = DEFAULT_ENDPOINT
    secure: bool = True
    access_key: str | None = dataclasses.field(default=None, repr=False)
    secret_key: str | None = dataclasses.field(default=None, repr=False)
    session_token: str | None = dataclasses.field(default=None, repr=False)
    region: str | None = None
    timeout: float = 10.0
    retries: int = 3
    part_size: int = 16 * MIB
    workers: int = 8
    # Off by default: a write to a bucket that does not exist is far more often a typo in a
    # URI than a wish for a new bucket, and would quietly start an empty registry.
    create_bucket: bool = False

    def __post_init__(self) -> None:
        for name in _LIMITS:
            _check_value(name, getattr(self, name), f"S3Settings.{name}")

    def __repr__(self) -> str:
        key = _mask(self.access_key) if self.access_key else None
        return (
            f"S3Settings(endpoint={self.url!r}, access_key={key!r}, region={self.region!r}, "
            f"timeout={self.timeout}, retries={self.retries}, part_size={self.part_size}, "
            f"workers={self.workers})"
        )

    __str__ = __repr__

    @property
    def url(self) -> str:
        """The endpoint as a URL (``http://host:port``), the form users recognise in errors."""
        return f"{'https' if self.secure else 'http'}://{self.endpoint}"

    def redact(self, text: str) -> str:
        """``text`` with the secret key and session token blanked, for error messages."""
        for secret in (self.secret_key, self.session_token):
            if secret:
                text = text.replace(secret, "***")
        return text

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
        where: str = "s3",
    ) -> S3Settings:
        """Settings from ``env`` (default ``os.environ``), then ``overrides`` (a params section).

        ``where`` names the overrides' origin (``params.yaml:s3``) in error messages.
        """
        env = os.environ if env is None else env
        params = _params(overrides or {}, where)
        values: dict[str, Any] = {}

        env_endpoint = _first(env, ENDPOINT_VARS)
        env_secure = _env_bool(env, "MINIO_SECURE")
        if env_endpoint is not None:
            var, text = env_endpoint
            host, scheme_secure = parse_endpoint(text, var)
            values["endpoint"] = host
            values["secure"] = _agree(scheme_secure, env_secure, f"{var} and MINIO_SECURE")
        elif env_secure is not None:
            values["secure"] = env_secure
        if params.endpoint is not None:
            host, scheme_secure = parse_endpoint(params.endpoint, f"{where}.endpoint")
            values["endpoint"] = host
            secure = _agree(scheme_secure, params.secure, f"{where}.endpoint and {where}.secure")
            values["secure"] = env_secure if secure is None else secure
        elif params.secure is not None:
            values["secure"] = params.secure
        if values.get("secure") is None:
            values.pop("secure", None)

        credentials = env_credentials(env)
        if credentials is not None:
            values["access_key"], values["secret_key"] = credentials
        if env.get("AWS_SESSION_TOKEN"):
            values["session_token"] = env["AWS_SESSION_TOKEN"]
        region = _first(env, REGION_VARS)
        if region is not None:
            values["region"] = region[1]

        for name, var, parse in (
            ("timeout", "IMGCLF_S3_TIMEOUT", float),
            ("retries", "IMGCLF_S3_RETRIES", int),
            ("part_size", "IMGCLF_S3_PART_SIZE", int),
            ("workers", "IMGCLF_S3_WORKERS", int),
        ):
            raw = env.get(var, "").strip()
            if raw:
                try:
                    values[name] = parse(raw)
                except ValueError:
                    raise ConfigError(f"{var}={raw!r}: expected a {parse.__name__}") from None
                _check_value(name, values[name], var)

        create_bucket = _env_bool(env, "IMGCLF_S3_CREATE_BUCKET")
        if create_bucket is not None:
            values["create_bucket"] = create_bucket

        for name in ("region", "timeout", "retries", "part_size", "workers", "create_bucket"):
            value = getattr(params, name)
            if value is not None:
                _check_value(name, value, f"{where}.{name}")
                values[name] = value
        return cls(**values)

    @classmethod
    def load(cls, params_path: str | Path, env: Mapping[str, str] | None = None) -> S3Settings:
        """Settings from the environment and the ``s3:`` section of ``params_path`` (if any)."""
        section = params_section(read_params(params_path), Path(params_path).name)
        return cls.from_env(env, section, where=f"{Path(params_path).name}:s3")

    def public_dict(self) -> dict[str, Any]:
        """The settings without credentials, safe to log or save next to outputs."""
        out = dataclasses.asdict(self)
        out["access_key"] = _mask(self.access_key) if self.access_key else None
        out.pop("secret_key")
        out.pop("session_token")
        out["url"] = self.url
        return out


def params_section(params: Mapping[str, Any], file_label: str) -> Mapping[str, Any]:
    """The ``s3:`` section of already-read params (empty if absent); ConfigError if malformed."""
    section = params.get("s3") or {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"{file_label}:s3: expected a mapping")
    return section


# params.yaml's `s3:` section and the file it came from, as the edge handed them down
_PARAMS: contextvars.ContextVar[tuple[Mapping[str, Any], str]] = contextvars.ContextVar(
    "imgclf_s3_params", default=({}, "params.yaml")
)


@contextlib.contextmanager
def s3_params(section: Mapping[str, Any], file_label: str) -> Iterator[None]:
    """Use ``section`` (``s3:`` of the params file ``file_label``) for every S3 store opened
    in the block. Only an edge calls this: the CLI with ``--params``, a test.

    It is a context rather than an argument of every step because stores are opened deep in
    the registry, the sources and the weights loader; the values still come from one place.
    Settings are resolved when a store is opened, so a command that never touches S3 is not
    failed by a broken S3 environment.
    """
    token = _PARAMS.set((dict(section), file_label))
    try:
        yield
    finally:
        _PARAMS.reset(token)


def resolve_s3_settings(
    overrides: Mapping[str, Any] | None = None,
    overrides_label: str = "ingest.s3",
    env: Mapping[str, str] | None = None,
) -> S3Settings:
    """Settings for a new connection: the environment, then the edge's ``s3:`` section, then
    ``overrides`` (``ingest.s3``: another endpoint for the dataset bucket only)."""
    section, file_label = _PARAMS.get()
    if overrides:
        merged = {**section, **overrides}
        return S3Settings.from_env(env, merged, where=f"{file_label}:{overrides_label}")
    return S3Settings.from_env(env, section, where=f"{file_label}:s3")


def env_credentials(env: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """(access key, secret key) from the environment, None if neither is set.

    One without the other is a ConfigError: silently falling back to anonymous access would
    turn a typo in a variable name into a confusing "access denied" much later.
    """
    env = os.environ if env is None else env
    access = _first(env, ACCESS_KEY_VARS)
    secret = _first(env, SECRET_KEY_VARS)
    if access is None and secret is None:
        return None
    if secret is None:
        assert access is not None
        raise ConfigError(
            f"{access[0]} is set but {' / '.join(SECRET_KEY_VARS)} is not; "
            "set both or neither (anonymous access)"
        )
    if access is None:
        raise ConfigError(
            f"{secret[0]} is set but {' / '.join(ACCESS_KEY_VARS)} is not; "
            "set both or neither (anonymous access)"
        )
    return access[1], secret[1]


def parse_endpoint(text: str, where: str) -> tuple[str, bool | None]:
    """``http(s)://host:port`` or ``host:port`` -> (``host:port``, TLS from the scheme or None).

    The minio SDK wants a bare host; users paste URLs (AWS_ENDPOINT_URL is a URL), so both
    are accepted and anything with a path, query or credentials in it is refused.
    """
    raw = text.strip()
    if not raw:
        raise ConfigError(f"{where}: empty S3 endpoint")
    secure: bool | None = None
    if "://" in raw:
        parts = urlsplit(raw)
        if parts.scheme not in ("http", "https"):
            raise ConfigError(f"{where}={raw!r}: scheme must be http or https")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(f"{where}={raw!r}: an S3 endpoint has no path; use host:port")
        if parts.username or parts.password:
            raise ConfigError(
                f"{where}: credentials do not belong in the endpoint; "
                "use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
            )
        secure = parts.scheme == "https"
        host = parts.netloc
    else:
        host = raw.rstrip("/")
        if "/" in host or "@" in host:
            raise ConfigError(f"{where}={raw!r}: expected host:port or http(s)://host:port")
    try:
        port = urlsplit(f"//{host}").port
    except ValueError:
        raise ConfigError(f"{where}={raw!r}: invalid port") from None
    if not urlsplit(f"//{host}").hostname or (port is not None and not 0 < port < 65536):
        raise ConfigError(f"{where}={raw!r}: expected host:port or http(s)://host:port")
    return host, secure


def _params(overrides: Mapping[str, Any], where: str) -> S3Params:
    secret = sorted(set(overrides) & _SECRET_PARAM_KEYS)
    if secret:
        raise ConfigError(
            f"{where}.{secret[0]}: credentials are read only from the environment "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY); remove them from params"
        )
    return build(S3Params, overrides, where)


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str] | None:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return name, value
    return None


def _env_bool(env: Mapping[str, str], name: str) -> bool | None:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return None
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigError(f"{name}={env[name]!r}: expected true or false")


def _agree(from_scheme: bool | None, explicit: bool | None, where: str) -> bool | None:
    """The TLS choice; a URL scheme that contradicts an explicit flag is a mistake to report."""
    if from_scheme is not None and explicit is not None and from_scheme != explicit:
        raise ConfigError(
            f"{where} disagree: the endpoint scheme says secure={from_scheme}, "
            f"the flag says secure={explicit}"
        )
    return from_scheme if from_scheme is not None else explicit


_LIMITS: dict[str, tuple[Any, str]] = {
    "timeout": (lambda v: v > 0, "must be > 0 seconds"),
    "retries": (lambda v: v >= 0, "must be >= 0"),
    "part_size": (
        lambda v: MIN_PART_SIZE <= v <= MAX_PART_SIZE,
        f"must be between {MIN_PART_SIZE} (5 MiB) and {MAX_PART_SIZE} (5 GiB) bytes",
    ),
    "workers": (lambda v: v >= 1, "must be >= 1"),
}


def _check_value(name: str, value: Any, label: str) -> None:
    """Raise ConfigError naming ``label`` (env var or params key) if ``value`` is out of range."""
    if name in _LIMITS:
        ok, why = _LIMITS[name]
        if not ok(value):
            raise ConfigError(f"{label}={value!r}: {why}")


def _mask(access_key: str) -> str:
    """Enough of the access key to tell which identity is used, not enough to reuse it."""
    return access_key[:4] + "…" if len(access_key) > 8 else "…"
