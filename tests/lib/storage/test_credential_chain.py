"""S3 credentials from the standard chain: environment, ~/.aws/credentials, ~/.mc/config.json,
an IAM role. Checked against the session's real S3 server (SeaweedFS, tests/s3_server.py).

The acceptance case sets up a user who has nothing but ``~/.aws/credentials`` (every
AWS_*/MINIO_* credential variable removed, ``HOME`` a temp dir, the endpoint in the
environment as before) and shows that imgclf, in process and as a command, and ``dvc
push`` reach the server with it. The IAM case serves the server's keys from a loopback
container-credentials endpoint, the way ECS and EKS Pod Identity hand them out.
"""

from __future__ import annotations

import configparser
import http.server
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from _repo_copy import sh
from imgclf.dev import S3ServerInfo
from imgclf.errors import ConfigError, StorageError
from imgclf.storage import open_store
from imgclf.storage.s3 import S3Store, make_client
from imgclf.storage.s3config import (
    AWS_CREDENTIALS_FILE,
    IAM_VARS,
    MC_CONFIG_FILE,
    S3Settings,
    credential_providers,
)

pytestmark = pytest.mark.s3

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY",
    "AWS_SECRET_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "MINIO_ACCESS_KEY",
    "MINIO_SECRET_KEY",
    "MINIO_ALIAS",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "IMGCLF_S3_IAM",
    *IAM_VARS,
)


def write_aws_credentials(home: Path, profiles: dict[str, dict[str, str]]) -> Path:
    """``home/.aws/credentials`` with ``profiles``, as ``aws configure`` writes it."""
    parser = configparser.ConfigParser()
    parser.read_dict(profiles)
    path = home / AWS_CREDENTIALS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        parser.write(f)
    return path


def aws_keys(access: str, secret: str) -> dict[str, str]:
    return {"aws_access_key_id": access, "aws_secret_access_key": secret}


def write_mc_config(home: Path, aliases: dict[str, dict[str, str]]) -> Path:
    """``home/.mc/config.json`` as ``mc alias set`` writes it (version 10)."""
    path = home / MC_CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {
        "version": "10",
        "aliases": {name: {"api": "s3v4", **a} for name, a in aliases.items()},
    }
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def bare_env(monkeypatch: pytest.MonkeyPatch, home: Path, s3_server: S3ServerInfo) -> Path:
    """The process environment of a user with the endpoint set but no credential variable,
    and an empty HOME; returns HOME."""
    for name in [k for k in os.environ if k.startswith(("AWS_", "MINIO_"))]:
        monkeypatch.delenv(name)
    for name in CREDENTIAL_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_REGION", s3_server.region)
    return home


# -- acceptance: nothing but ~/.aws/credentials -----------------------------------------------


@pytest.fixture
def only_aws_file(bare_env: Path, s3_server: S3ServerInfo) -> Path:
    write_aws_credentials(
        bare_env, {"default": aws_keys(s3_server.access_key, s3_server.secret_key)}
    )
    return bare_env


def test_store_reaches_the_server_with_only_the_credentials_file(
    only_aws_file: Path, s3_server: S3ServerInfo, s3_bucket: str
) -> None:
    store = open_store(f"s3://{s3_bucket}/root")
    assert isinstance(store, S3Store)
    assert store.settings.credentials_from == f"{only_aws_file / AWS_CREDENTIALS_FILE} [default]"
    store.write_bytes("hello.txt", b"from ~/.aws/credentials")
    assert store.read_bytes("hello.txt") == b"from ~/.aws/credentials"
    assert s3_server.secret_key not in repr(store.settings)


def test_cli_command_reaches_the_server_with_only_the_credentials_file(
    only_aws_file: Path, s3_server: S3ServerInfo, s3_bucket: str, tmp_path: Path
) -> None:
    env = {
        "HOME": str(only_aws_file),
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "AWS_REGION": s3_server.region,
    }
    registry = f"s3://{s3_bucket}/registry"
    res = sh(tmp_path, "imgclf", "registry", "list", "--registry", registry, "--json", env=env)
    assert json.loads(res.stdout) == []
    (only_aws_file / AWS_CREDENTIALS_FILE).unlink()
    denied = sh(
        tmp_path, "imgclf", "registry", "list", "--registry", registry, check=False, env=env
    )
    assert denied.returncode != 0 and "access denied" in denied.stderr


def test_dvc_push_uses_the_same_credentials_file(
    only_aws_file: Path, s3_server: S3ServerInfo, s3_bucket: str, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "data.txt").write_text("versioned by dvc\n", encoding="utf-8")
    env = {"HOME": str(only_aws_file), "AWS_REGION": s3_server.region}
    sh(repo, "git", "init", "-q", env=env)
    sh(repo, "dvc", "init", "-q", env=env)
    sh(repo, "dvc", "add", "-q", "data.txt", env=env)
    sh(repo, "dvc", "remote", "add", "-d", "store", f"s3://{s3_bucket}/dvcstore", env=env)
    sh(repo, "dvc", "remote", "modify", "store", "endpointurl", s3_server.endpoint, env=env)
    sh(repo, "dvc", "push", "-q", env=env)
    pushed = make_client(s3_server.settings()).list_objects(s3_bucket, "dvcstore/", recursive=True)
    assert [o.object_name for o in pushed], "dvc push stored nothing"


# -- which source wins ---------------------------------------------------------------------


def test_aws_profile_selects_the_profile(home: Path) -> None:
    path = write_aws_credentials(
        home,
        {
            "default": aws_keys("AKIADEFAULT", SECRET),
            "dev": aws_keys("AKIADEVPROFILE", "dev-" + SECRET),
        },
    )
    env = {"HOME": str(home)}
    assert S3Settings.from_env(env).access_key == "AKIADEFAULT"
    dev = S3Settings.from_env({**env, "AWS_PROFILE": "dev"})
    assert (dev.access_key, dev.secret_key) == ("AKIADEVPROFILE", "dev-" + SECRET)
    assert dev.credentials_from == f"{path} [dev]"
    with pytest.raises(ConfigError, match=r"AWS_PROFILE=ops: .*profile ops") as err:
        S3Settings.from_env({**env, "AWS_PROFILE": "ops"})
    assert SECRET not in str(err.value)


def test_shared_credentials_file_variable_and_session_token(tmp_path: Path) -> None:
    elsewhere = write_aws_credentials(
        tmp_path / "elsewhere",
        {"default": {**aws_keys("AKIAELSEWHERE", SECRET), "aws_session_token": "tok-123"}},
    )
    s = S3Settings.from_env({"AWS_SHARED_CREDENTIALS_FILE": str(elsewhere)})
    assert (s.access_key, s.session_token) == ("AKIAELSEWHERE", "tok-123")
    assert "tok-123" not in repr(s) and "tok-123" not in str(s.public_dict())


def test_environment_beats_the_file(home: Path) -> None:
    write_aws_credentials(home, {"default": aws_keys("AKIAFROMFILE", SECRET)})
    env = {"HOME": str(home), "AWS_ACCESS_KEY_ID": "AKIAFROMENV", "AWS_SECRET_ACCESS_KEY": SECRET}
    s = S3Settings.from_env(env)
    assert (s.access_key, s.credentials_from) == ("AKIAFROMENV", "environment")
    minio_env = {"HOME": str(home), "MINIO_ACCESS_KEY": "minio", "MINIO_SECRET_KEY": SECRET}
    assert S3Settings.from_env(minio_env).access_key == "minio"
    # a half-set pair is still the clear error it was, not a silent fall-through to the file
    with pytest.raises(ConfigError, match="set both or neither"):
        S3Settings.from_env({"HOME": str(home), "AWS_ACCESS_KEY_ID": "AKIAFROMENV"})


def test_a_malformed_credentials_file_is_named_without_its_content(home: Path) -> None:
    path = home / AWS_CREDENTIALS_FILE
    path.parent.mkdir()
    path.write_text(f"aws_secret_access_key = {SECRET}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot parse the file") as err:
        S3Settings.from_env({"HOME": str(home)})
    assert str(path) in str(err.value) and SECRET not in str(err.value)


def test_mc_alias_for_the_endpoint(home: Path, s3_server: S3ServerInfo, s3_bucket: str) -> None:
    config = write_mc_config(
        home,
        {
            "s3": {
                "url": "https://s3.amazonaws.com",
                "accessKey": "YOUR-ACCESS-KEY-HERE",
                "secretKey": "YOUR-SECRET-KEY-HERE",
            },
            "local": {
                "url": s3_server.endpoint,
                "accessKey": s3_server.access_key,
                "secretKey": s3_server.secret_key,
            },
        },
    )
    env = {"HOME": str(home), "AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_REGION": "us-east-1"}
    s = S3Settings.from_env(env)
    assert (s.access_key, s.credentials_from) == (s3_server.access_key, f"{config} [local]")
    store = S3Store(s3_bucket, "mc", s)
    store.write_bytes("k", b"via mc alias")
    assert store.read_bytes("k") == b"via mc alias"

    assert S3Settings.from_env({**env, "MINIO_ALIAS": "s3"}).access_key == "YOUR-ACCESS-KEY-HERE"
    with pytest.raises(ConfigError, match="MINIO_ALIAS=nope"):
        S3Settings.from_env({**env, "MINIO_ALIAS": "nope"})
    other = S3Settings.from_env({**env, "AWS_ENDPOINT_URL": "http://127.0.0.1:1"})
    assert other.access_key is None, "keys saved for one server are not sent to another"


def test_no_credentials_is_anonymous_as_before(
    home: Path, s3_server: S3ServerInfo, s3_bucket: str
) -> None:
    env = {"HOME": str(home), "AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_REGION": "us-east-1"}
    s = S3Settings.from_env(env)
    assert (s.access_key, s.credentials_from, s.credentials) == (None, None, None)
    assert [label for label, _ in credential_providers(env)] == [
        f"{home / AWS_CREDENTIALS_FILE} [default]"
    ]
    with pytest.raises(StorageError, match="access denied") as err:
        S3Store(s3_bucket, "anon", s).write_bytes("k", b"x")
    assert "~/.aws/credentials" in str(err.value)


def test_iam_is_not_asked_unless_the_environment_points_at_a_role(home: Path) -> None:
    env = {"HOME": str(home)}
    assert not any("IAM" in label for label, _ in credential_providers(env))
    irsa = {**env, "AWS_WEB_IDENTITY_TOKEN_FILE": str(home / "token"), "AWS_ROLE_ARN": "arn:x"}
    labels = [label for label, _ in credential_providers(irsa)]
    assert labels[-1] == "IAM role via web identity (arn:x)"
    assert not any(
        "IAM" in label for label, _ in credential_providers({**irsa, "IMGCLF_S3_IAM": "false"})
    )
    imds = [label for label, _ in credential_providers({**env, "IMGCLF_S3_IAM": "true"})]
    assert imds[-1] == "IAM role via EC2 instance metadata"
    s = S3Settings.from_env(irsa)  # nothing is fetched yet: no network while resolving
    assert s.access_key is None and s.credentials is not None
    assert s.credentials_from == "IAM role via web identity (arn:x)"


# -- an IAM role: container credentials from a loopback endpoint -------------------------------


class CredentialsEndpoint(http.server.ThreadingHTTPServer):
    """Serves one set of keys the way the ECS / EKS Pod Identity agent does."""

    def __init__(self) -> None:
        self.body: dict[str, str] = {"Code": "Denied"}
        self.status = 403
        self.authorizations: list[str | None] = []
        super().__init__(("127.0.0.1", 0), _CredentialsHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/creds"


class _CredentialsHandler(http.server.BaseHTTPRequestHandler):
    server: CredentialsEndpoint

    def do_GET(self) -> None:
        self.server.authorizations.append(self.headers.get("Authorization"))
        data = json.dumps(self.server.body).encode()
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def credentials_endpoint(
    bare_env: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[CredentialsEndpoint]:
    """A loopback credentials endpoint the environment points at (answers 403 until told)."""
    server = CredentialsEndpoint()
    # the SDK's IAM provider reads these from os.environ, so they go there
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", server.url)
    monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", "pod-identity-token")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_container_role_credentials_reach_the_server(
    credentials_endpoint: CredentialsEndpoint, s3_server: S3ServerInfo, s3_bucket: str
) -> None:
    credentials_endpoint.status = 200
    credentials_endpoint.body = {
        "AccessKeyId": s3_server.access_key,
        "SecretAccessKey": s3_server.secret_key,
        "Token": "",
        "Expiration": "2099-01-01T00:00:00Z",
    }
    store = open_store(f"s3://{s3_bucket}/role")
    assert store.settings.access_key is None
    assert store.settings.credentials_from == "IAM role via container credentials"
    store.write_bytes("k", b"via role")
    assert store.read_bytes("k") == b"via role"
    assert credentials_endpoint.authorizations == ["pod-identity-token"], "fetched once, cached"


def test_a_failing_role_is_one_line_without_secrets(
    credentials_endpoint: CredentialsEndpoint, s3_bucket: str
) -> None:
    with pytest.raises(StorageError, match="IAM role via container credentials") as err:
        open_store(f"s3://{s3_bucket}/role").write_bytes("k", b"x")
    assert "pod-identity-token" not in str(err.value) and "\n" not in str(err.value)


# -- secrets stay out of reprs and logs ---------------------------------------------------------


def test_file_secrets_never_in_repr_or_logs(
    only_aws_file: Path,
    s3_server: S3ServerInfo,
    s3_bucket: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    store = open_store(f"s3://{s3_bucket}/logged")
    assert isinstance(store, S3Store)
    store.write_bytes("k", b"1")
    store.read_bytes("k")
    with pytest.raises(StorageError):
        store.read_bytes("missing")
    for obj in (store.settings, store):
        assert s3_server.secret_key not in repr(obj) and s3_server.secret_key not in str(obj)
    assert s3_server.secret_key not in str(store.settings.public_dict())
    assert "credentials" not in store.settings.public_dict()
    assert s3_server.secret_key not in caplog.text
    assert store.settings.redact(f"x{s3_server.secret_key}y") == "x***y"
