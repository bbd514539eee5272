"""S3 connection settings: read from the environment the usual S3 way, tuned in params.yaml.

Credentials never come from params.yaml, which is committed to git: a key in it would be
published with the repository. They are looked up the way the AWS CLI and boto3 (so also
DVC) look them up, with the minio SDK's credential providers, first match wins:

1. the environment: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or ``MINIO_ACCESS_KEY``
   / ``MINIO_SECRET_KEY``) and ``AWS_SESSION_TOKEN``; one key without the other is an error;
2. the shared credentials file (``AWSConfigProvider``): ``AWS_SHARED_CREDENTIALS_FILE`` or
   ``$HOME/.aws/credentials``, profile ``AWS_PROFILE`` (default ``default``); a profile
   named by ``AWS_PROFILE`` that has no keys there is an error, not a silent fallback;
3. the MinIO client's ``$HOME/.mc/config.json`` (``MinioClientConfigProvider``): the alias
   ``MINIO_ALIAS``, else the alias whose URL is the endpoint in use;
4. an IAM role (``IamAwsProvider``), only when the environment says one is there:
   ``AWS_WEB_IDENTITY_TOKEN_FILE`` (+ ``AWS_ROLE_ARN``; EKS IRSA),
   ``AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`` / ``_FULL_URI`` (ECS, EKS Pod Identity), or
   ``IMGCLF_S3_IAM=true`` (EC2 instance metadata). It is never probed otherwise, because
   asking 169.254.169.254 off EC2 waits for a timeout on every laptop and CI run;
   ``IMGCLF_S3_IAM=false`` turns it off. These credentials expire, so the client keeps the
   provider chain (``ChainedProvider``) and the SDK renews them.

With none of these the access is anonymous, as before (public buckets). Sources 1-3 are
read when the settings are resolved, so the keys sit in :class:`S3Settings` (masked in its
repr, redacted from errors) and its repr says which source answered.

Everything else (endpoint, TLS, region, timeout, retries, multipart part size, parallel
workers) can also be set in the ``s3:`` section of params.yaml, which then takes precedence
over the environment so that a checked-in pipeline behaves the same on every machine.

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
``HOME``                                       where ``.aws/credentials`` and
                                               ``.mc/config.json`` are looked for
``AWS_SHARED_CREDENTIALS_FILE``                credentials file instead of
                                               ``$HOME/.aws/credentials``
``AWS_PROFILE``                                its profile (default ``default``)
``MINIO_ALIAS``                                alias in ``$HOME/.mc/config.json``
                                               (default: the one whose URL is the endpoint)
``AWS_WEB_IDENTITY_TOKEN_FILE``                IAM role via web identity (EKS IRSA), with
                                               ``AWS_ROLE_ARN`` / ``AWS_ROLE_SESSION_NAME``;
                                               turns the IAM provider on
``AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`` /   IAM role of an ECS task or EKS Pod Identity;
``AWS_CONTAINER_CREDENTIALS_FULL_URI``         turns the IAM provider on
``IMGCLF_S3_IAM``                              true: also ask EC2 instance metadata; false:
                                               never use an IAM role (default: only when
                                               one of the variables above is set)
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

import configparser
import contextlib
import contextvars
import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import urllib3
from minio.credentials import (
    AWSConfigProvider,
    ChainedProvider,
    Credentials,
    IamAwsProvider,
    MinioClientConfigProvider,
    Provider,
    StaticProvider,
)

from imgclf.config import build, read_params
from imgclf.errors import ConfigError, StorageError

MIB = 1 << 20
MIN_PART_SIZE = 5 * MIB  # S3's floor for every part but the last
MAX_PART_SIZE = 5 * 1024 * MIB
DEFAULT_ENDPOINT = "s3.amazonaws.com"

ENDPOINT_VARS = ("MINIO_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
ACCESS_KEY_VARS = ("AWS_ACCESS_KEY_ID", "MINIO_ACCESS_KEY")
SECRET_KEY_VARS = ("AWS_SECRET_ACCESS_KEY", "MINIO_SECRET_KEY")
REGION_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")
# Set by EKS (IRSA, Pod Identity) and ECS in the pod/task: an IAM role is there to ask.
IAM_VARS = (
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)
AWS_CREDENTIALS_FILE = Path(".aws", "credentials")  # under HOME, as the AWS CLI reads it
MC_CONFIG_FILE = Path(".mc", "config.json")  # under HOME, as `mc alias set` writes it

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
    # Which source answered (``environment``, ``~/.aws/credentials [default]``, ...); None:
    # anonymous. Names a file or a variable, never a key.
    credentials_from: str | None = None
    # Renewing credentials (an IAM role), used when there is no static key; not compared,
    # since two chains over the same sources are the same settings.
    credentials: Provider | None = dataclasses.field(default=None, repr=False, compare=False)
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
            f"S3Settings(endpoint={self.url!r}, access_key={key!r}, "
            f"credentials_from={self.credentials_from!r}, region={self.region!r}, "
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
        # last, because the mc alias is chosen by the endpoint and IAM calls use the timeout
        values.update(
            resolve_credentials(
                env,
                values.get("endpoint", DEFAULT_ENDPOINT),
                values.get("region"),
                values.get("timeout", cls.timeout),
            )
        )
        return cls(**values)

    @classmethod
    def load(cls, params_path: str | Path, env: Mapping[str, str] | None = None) -> S3Settings:
        """Settings from the environment and the ``s3:`` section of ``params_path`` (if any)."""
        section = params_section(read_params(params_path), Path(params_path).name)
        return cls.from_env(env, section, where=f"{Path(params_path).name}:s3")

    def public_dict(self) -> dict[str, Any]:
        """The settings without credentials, safe to log or save next to outputs."""
        # not dataclasses.asdict: it would deep-copy the provider and its connection pool
        hidden = {"secret_key", "session_token", "credentials"}
        out = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in hidden
        }
        out["access_key"] = _mask(self.access_key) if self.access_key else None
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


def credential_providers(
    env: Mapping[str, str] | None = None,
    endpoint: str = DEFAULT_ENDPOINT,
    region: str | None = None,
    timeout: float = 10.0,
) -> list[tuple[str, Provider]]:
    """The credential sources that apply, in the AWS CLI's order, each with a label naming it.

    Everything is taken from ``env`` (default ``os.environ``) so a test or a caller with its
    own environment gets the same answer as a process started with it; files are found
    through ``HOME`` (none without it). The environment's keys come first as a
    StaticProvider rather than the SDK's EnvAWSProvider / EnvMinioProvider: those read only
    ``os.environ`` and drop a half-set pair silently, where :func:`env_credentials` reports
    it. The IAM provider is listed only when the environment points at a role (module
    docstring), so nothing here waits on a metadata endpoint that is not there.
    """
    env = os.environ if env is None else env
    providers: list[tuple[str, Provider]] = []
    pair = env_credentials(env)
    if pair is not None:
        token = env.get("AWS_SESSION_TOKEN", "").strip() or None
        providers.append(("environment", StaticProvider(*pair, session_token=token)))
    home = env.get("HOME") or env.get("USERPROFILE")
    aws_file = env.get("AWS_SHARED_CREDENTIALS_FILE") or (
        str(Path(home, AWS_CREDENTIALS_FILE)) if home else None
    )
    if aws_file:
        profile = env.get("AWS_PROFILE") or "default"
        providers.append(
            (f"{aws_file} [{profile}]", AWSConfigProvider(filename=aws_file, profile=profile))
        )
    if home:
        mc_file = Path(home, MC_CONFIG_FILE)
        alias = env.get("MINIO_ALIAS") or _mc_alias_for(mc_file, endpoint)
        if alias is not None:
            providers.append(
                (
                    f"{mc_file} [{alias}]",
                    MinioClientConfigProvider(filename=str(mc_file), alias=alias),
                )
            )
    iam = _iam_provider(env, region, timeout)
    if iam is not None:
        providers.append(iam)
    return providers


def resolve_credentials(
    env: Mapping[str, str] | None = None,
    endpoint: str = DEFAULT_ENDPOINT,
    region: str | None = None,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """The credential fields of :class:`S3Settings`: the first source that has keys.

    Environment and files are read now, so their keys are known (masked in reprs, redacted
    from errors) and a missing one means anonymous access as before. An IAM role is not
    asked now (that is a network call, and its keys expire): the chain of every source goes
    to the client, which asks it on the first request and again when the keys run out.
    ``{}`` when no source applies: anonymous.
    """
    env = os.environ if env is None else env
    providers = credential_providers(env, endpoint, region, timeout)
    for label, provider in providers:
        if isinstance(provider, RoleProvider):
            return {
                "credentials_from": label,
                "credentials": ChainedProvider([p for _, p in providers]),
            }
        found = _retrieve(label, provider, env)
        if found is not None:
            return {
                "access_key": found.access_key,
                "secret_key": found.secret_key,
                "session_token": found.session_token,
                "credentials_from": label,
            }
    return {}


def _retrieve(label: str, provider: Provider, env: Mapping[str, str]) -> Credentials | None:
    """``provider``'s keys, None if it has none; a source the user named explicitly and that
    fails is a ConfigError (the SDK's ValueError names the file and profile, never a key)."""
    try:
        return provider.retrieve()
    except configparser.Error as exc:
        # the parser's message quotes the offending line, which may hold a key
        raise ConfigError(f"{label}: cannot parse the file ({type(exc).__name__})") from None
    except ValueError as exc:
        if isinstance(provider, AWSConfigProvider) and env.get("AWS_PROFILE"):
            raise ConfigError(
                f"AWS_PROFILE={env['AWS_PROFILE']}: {exc}; set both aws_access_key_id and "
                "aws_secret_access_key in that profile, or unset AWS_PROFILE"
            ) from None
        if isinstance(provider, MinioClientConfigProvider) and env.get("MINIO_ALIAS"):
            raise ConfigError(f"MINIO_ALIAS={env['MINIO_ALIAS']}: {exc}") from None
        return None


def _mc_alias_for(config_file: Path, endpoint: str) -> str | None:
    """The alias of ``~/.mc/config.json`` whose URL is ``endpoint``, None if none is.

    Matched by endpoint rather than the SDK's default alias ``s3``: keys saved for one server
    are not sent to another, and mc's stock ``s3`` entry holds placeholder keys.
    """
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not valid JSON"
        raise ConfigError(f"{config_file}: cannot read it ({reason})") from None
    aliases = (config.get("aliases") or config.get("hosts")) if isinstance(config, dict) else None
    if not isinstance(aliases, dict):
        return None
    for alias, entry in aliases.items():
        url = entry.get("url") if isinstance(entry, dict) else None
        if isinstance(url, str) and urlsplit(url).netloc == endpoint:
            return str(alias)
    return None


def _iam_provider(
    env: Mapping[str, str], region: str | None, timeout: float
) -> tuple[str, Provider] | None:
    """The IAM provider when the environment points at a role (or IMGCLF_S3_IAM=true).

    Its HTTP client gets the store's timeout and few retries: the SDK's default has no
    timeout, so an unreachable STS or metadata endpoint would hang the first request.
    """
    wanted = _env_bool(env, "IMGCLF_S3_IAM")
    if wanted is False or (wanted is None and not any(env.get(v) for v in IAM_VARS)):
        return None
    if env.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
        label = f"IAM role via web identity ({env.get('AWS_ROLE_ARN') or 'no AWS_ROLE_ARN'})"
    elif env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or env.get(
        "AWS_CONTAINER_CREDENTIALS_FULL_URI"
    ):
        label = "IAM role via container credentials"
    else:
        label = "IAM role via EC2 instance metadata"
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=timeout, read=timeout),
        retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)),
    )
    # The SDK prefers os.environ over these arguments; passing them makes an explicit ``env``
    # work too. auth_token is left out on purpose: the SDK also uses it as a token *file*.
    provider = IamAwsProvider(
        http_client=http,
        token_file=env.get("AWS_WEB_IDENTITY_TOKEN_FILE") or None,
        role_arn=env.get("AWS_ROLE_ARN") or None,
        role_session_name=env.get("AWS_ROLE_SESSION_NAME") or None,
        region=region,
        relative_uri=env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or None,
        full_uri=env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI") or None,
    )
    return label, RoleProvider(provider, label)


class RoleProvider(Provider):
    """An IamAwsProvider whose failure is one StorageError line naming the role's source.

    The SDK's own errors quote the STS request URL, whose query carries the web identity
    token, and ChainedProvider would reduce them to "All providers fail to fetch
    credentials"; neither helps a user, the first leaks a secret.
    """

    def __init__(self, provider: IamAwsProvider, label: str) -> None:
        self._provider = provider
        self.label = label

    def retrieve(self) -> Credentials:
        """The role's current keys (cached by the SDK until they are about to expire)."""
        try:
            return self._provider.retrieve()
        except (ValueError, OSError, urllib3.exceptions.HTTPError) as exc:
            raise StorageError(
                f"{self.label}: the role gave no S3 credentials ({type(exc).__name__}); check "
                "AWS_ROLE_ARN and the token file, or set IMGCLF_S3_IAM=false"
            ) from None


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
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), ~/.aws/credentials, "
            "~/.mc/config.json or an IAM role; remove them from params"
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
