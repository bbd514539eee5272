"""Pytest plugin: one real S3 server (SeaweedFS) per test session, and fixtures around it.

Registered in ``tests/conftest.py`` with ``pytest_plugins = ["s3_server"]`` (``tests/`` is on
``sys.path`` the way the other helper modules there are imported). Any test may use:

``s3_server`` (session)
    :class:`imgclf.dev.seaweed.S3ServerInfo`: ``endpoint`` (``http://127.0.0.1:<port>``),
    ``access_key``, ``secret_key``, ``pid`` (of the first start), ``env()``, ``settings()``.
    Started on free loopback ports over a temp data dir with generated credentials; stopped
    by pid at the end of the session. Fails (not skips) when ``weed`` is missing.
``s3_server_process`` (session)
    The :class:`imgclf.dev.seaweed.SeaweedServer` behind it, for fault tests::

        with s3_server_process.stopped():    # the store is down inside the block
            with pytest.raises(StorageError):
                store.publish_tree(model_dir, "models/m/1")
        # back up here: same endpoint, same data, new pid (s3_server_process.pid)

    or ``s3_server_process.stop()`` / ``.start()`` / ``.restart()``; see also
    :func:`restart_s3_server`. A test that stops the server must bring it back.
``s3_settings``
    :class:`imgclf.storage.s3config.S3Settings` for the server (5 s timeout), not from env.
``s3_env``
    Sets ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``
    (and clears ``MINIO_*`` endpoint/key variables that would take precedence) for the test,
    so ``open_store("s3://...")``, DVC (boto3) and subprocesses started with ``os.environ``
    reach the server. Returns the variables as a dict.
``s3_bucket``
    A fresh, empty bucket name for the test (created); emptied and removed afterwards.
``s3_uri``
    ``s3://<fresh bucket>/root`` for tests that go through ``open_store`` / DVC / KFP.
``s3_store``
    :class:`imgclf.storage.s3.S3Store` on ``s3://<fresh bucket>/root`` with ``s3_settings``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from imgclf.dev import S3ServerInfo, SeaweedServer
from imgclf.storage.s3 import S3Store, make_client
from imgclf.storage.s3config import ACCESS_KEY_VARS, ENDPOINT_VARS, SECRET_KEY_VARS, S3Settings

_CLEARED_VARS = (*ENDPOINT_VARS, *ACCESS_KEY_VARS, *SECRET_KEY_VARS, "MINIO_SECURE")


def new_bucket_name(tag: str = "t") -> str:
    """A unique, valid bucket name (lowercase, <= 63 chars) starting with ``tag``."""
    safe = "".join(c if c.isalnum() else "-" for c in tag.lower()).strip("-")[:30] or "t"
    return f"{safe}-{uuid.uuid4().hex[:16]}"


def restart_s3_server(server: SeaweedServer) -> S3ServerInfo:
    """Stop the session server by pid and start it again on the same ports and data dir."""
    return server.restart()


def delete_bucket(settings: S3Settings, bucket: str) -> None:
    """Remove every object of ``bucket`` and the bucket itself (frees its volumes)."""
    S3Store(bucket, "", settings).delete("", recursive=True)
    client = make_client(settings)
    if client.bucket_exists(bucket):
        client.remove_bucket(bucket)


@pytest.fixture(scope="session")
def s3_server_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """The session's SeaweedFS process (see the module docstring)."""
    server = SeaweedServer(tmp_path_factory.mktemp("s3data"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(s3_server_process: SeaweedServer) -> S3ServerInfo:
    """Endpoint and credentials of the session's S3 server."""
    return s3_server_process.info


@pytest.fixture
def s3_settings(s3_server_process: SeaweedServer) -> S3Settings:
    """Settings for the session server with a short timeout, independent of the environment."""
    if not s3_server_process.running:
        s3_server_process.start()  # a previous test stopped it and failed before restarting
    return s3_server_process.info.settings(timeout=5.0)


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, s3_server: S3ServerInfo) -> dict[str, str]:
    """Point the environment at the session server for one test."""
    for name in _CLEARED_VARS:
        monkeypatch.delenv(name, raising=False)
    env = s3_server.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def s3_bucket(
    request: pytest.FixtureRequest, s3_server_process: SeaweedServer, s3_settings: S3Settings
) -> Iterator[str]:
    """A fresh bucket for this test, removed with its objects afterwards."""
    name = new_bucket_name(request.node.name.split("[")[0].removeprefix("test_"))
    make_client(s3_settings).make_bucket(name, location=s3_settings.region)
    yield name
    if not s3_server_process.running:  # the test stopped it and failed before restarting
        s3_server_process.start()
    delete_bucket(s3_settings, name)


@pytest.fixture
def s3_uri(s3_bucket: str) -> str:
    """``s3://<fresh bucket>/root``."""
    return f"s3://{s3_bucket}/root"


@pytest.fixture
def s3_store(s3_bucket: str, s3_settings: S3Settings) -> S3Store:
    """An S3Store rooted at ``s3://<fresh bucket>/root``."""
    return S3Store(s3_bucket, "root", s3_settings)
