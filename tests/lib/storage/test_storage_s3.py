"""S3Store against a real S3 server (SeaweedFS on loopback, started once per session).

The Store contract cases come from test_storage_local.StoreContract; the S3-only cases cover
multipart uploads, sha256 integrity, publish markers across a server crash, retries through
a real fault-injecting TCP proxy, timeouts, wrong credentials and keeping the secret out of
every message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from test_storage_local import TREE, StoreContract, read_tree, write_tree

from imgclf.dev import S3ServerInfo, SeaweedServer, free_ports
from imgclf.errors import ConfigError, StorageError
from imgclf.fsutil import sha256_file
from imgclf.storage import is_published, open_store, publish_tree
from imgclf.storage.s3 import S3Store, make_client
from imgclf.storage.s3config import MIB, S3Settings
from s3_server import delete_bucket, new_bucket_name

pytestmark = pytest.mark.s3

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


class TestS3Store(StoreContract):
    """The shared Store contract on S3."""

    @pytest.fixture
    def store(self, s3_store: S3Store) -> S3Store:
        return s3_store


def test_large_file_is_uploaded_in_parts(
    s3_bucket: str, s3_settings: S3Settings, tmp_path: Path
) -> None:
    store = S3Store(s3_bucket, "big", dataclasses.replace(s3_settings, part_size=5 * MIB))
    src = tmp_path / "weights.bin"
    src.write_bytes(hashlib.sha256(b"seed").digest() * (12 * MIB // 32) + b"tail")
    store.upload_file(src, "weights.bin")

    stat = store.client.stat_object(s3_bucket, "big/weights.bin")
    assert stat.size == src.stat().st_size
    assert stat.etag.endswith("-3")  # S3 multipart ETag: digest of part digests + part count
    assert stat.metadata["x-amz-meta-sha256"] == sha256_file(src)
    assert store.sha256("weights.bin") == sha256_file(src)

    dst = tmp_path / "out" / "weights.bin"
    store.download_file("weights.bin", dst)
    assert sha256_file(dst) == sha256_file(src)


def test_many_files_in_parallel(s3_store: S3Store, tmp_path: Path) -> None:
    files = {f"shard{i % 7}/img_{i:03d}.png": i.to_bytes(2, "big") * (i + 1) for i in range(120)}
    src = write_tree(tmp_path / "src", files)
    assert s3_store.settings.workers == 8
    assert len(s3_store.upload_tree(src, "ds")) == 120
    dst = tmp_path / "dst"
    assert len(s3_store.download_tree("ds", dst)) == 120
    assert read_tree(dst) == files


def test_sha256_is_stored_and_verified(s3_store: S3Store, tmp_path: Path) -> None:
    bucket, client = s3_store.bucket, s3_store.client
    s3_store.write_bytes("good.txt", b"good")
    stat = client.stat_object(bucket, "root/good.txt")
    assert stat.metadata["x-amz-meta-sha256"] == hashlib.sha256(b"good").hexdigest()
    assert s3_store.sha256("good.txt") == hashlib.sha256(b"good").hexdigest()

    # content replaced behind our back while the metadata still describes the old bytes
    stale = {"sha256": hashlib.sha256(b"original").hexdigest()}
    client.put_object(bucket, "root/bad.txt", io.BytesIO(b"tampered"), 8, metadata=stale)
    with pytest.raises(StorageError, match="sha256 mismatch") as err:
        s3_store.read_bytes("bad.txt")
    assert f"s3://{bucket}/root/bad.txt" in str(err.value)
    with pytest.raises(StorageError, match="sha256 mismatch"):
        s3_store.download_file("bad.txt", tmp_path / "bad.txt")
    assert list(tmp_path.iterdir()) == [], "a failed download left a file behind"

    # objects written by other tools carry no hash: still readable, hashed on demand
    client.put_object(bucket, "root/plain.txt", io.BytesIO(b"plain"), 5)
    assert s3_store.read_bytes("plain.txt") == b"plain"
    assert s3_store.sha256("plain.txt") == hashlib.sha256(b"plain").hexdigest()


def test_open_store_uses_env_and_creates_bucket_on_first_write_when_asked(
    s3_env: dict[str, str],
    s3_settings: S3Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # run from the repository root on purpose: its params.yaml is not read below the CLI
    monkeypatch.setenv("IMGCLF_S3_CREATE_BUCKET", "true")  # off by default: a typo'd bucket
    bucket = new_bucket_name("ondemand")
    store = open_store(f"s3://{bucket}/pre/fix")
    assert isinstance(store, S3Store)
    assert store.settings.url == s3_env["AWS_ENDPOINT_URL"]
    client = make_client(s3_settings)
    try:
        assert store.list() == []
        assert not store.exists("a.txt")
        assert not client.bucket_exists(bucket), "reads must not create buckets"
        store.write_bytes("a.txt", b"1")
        assert client.bucket_exists(bucket)
        assert [o.object_name for o in client.list_objects(bucket, recursive=True)] == [
            "pre/fix/a.txt"
        ]
    finally:
        delete_bucket(s3_settings, bucket)


def test_publish_interrupted_by_server_crash_is_never_trusted(
    s3_server_process: SeaweedServer,
    s3_bucket: str,
    s3_settings: S3Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = dataclasses.replace(s3_settings, workers=1, timeout=3.0)
    store = S3Store(s3_bucket, "models", settings)
    store.publish_tree(write_tree(tmp_path / "v1", {"w.bin": b"1"}), "m/1")
    assert store.is_published("m/1")

    many = write_tree(tmp_path / "v2", {f"part/{i:04d}.bin": b"x" * 256 for i in range(100)})
    uploads: list[str] = []
    upload_file = store.upload_file

    def upload_crashing_before_the_21st(path: Path, key: str) -> None:
        # the server dies at a fixed point of the publish, however fast this machine is
        if len(uploads) == 20:
            s3_server_process.kill()
        uploads.append(key)
        upload_file(path, key)

    monkeypatch.setattr(store, "upload_file", upload_crashing_before_the_21st)
    try:
        with pytest.raises(StorageError) as err:
            store.publish_tree(many, "m/1")
    finally:
        s3_server_process.start()

    assert s3_server_process.info.endpoint in str(err.value)
    assert not store.is_published("m/1"), "a half-published prefix must not carry the marker"
    assert len(store.list("m/1")) == 21  # w.bin and the 20 parts written before the crash
    S3Store(s3_bucket, "models", s3_settings).publish_tree(many, "m/1")
    assert store.is_published("m/1"), "a complete publish after the outage is trusted again"


class FaultyProxy:
    """A real TCP proxy to the S3 server that spoils the first ``failures`` connections.

    ``mode="reset"`` drops them with a TCP RST (a crashed or restarting server, a dropped
    load-balancer connection); ``mode="503"`` answers them with S3's 503 SlowDown error.
    Later connections are piped to the server byte for byte (SigV4 signs the Host header,
    which passes through unchanged).
    """

    _SLOW_DOWN = (
        b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
        b"<Message>Please reduce your request rate.</Message></Error>"
    )

    def __init__(self, upstream_port: int, mode: str, failures: int) -> None:
        self.upstream_port = upstream_port
        self.mode = mode
        self.failures = failures
        self.connections = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> FaultyProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                spoil = self.connections <= self.failures
            threading.Thread(target=self._serve, args=(conn, spoil), daemon=True).start()

    def _serve(self, conn: socket.socket, spoil: bool) -> None:
        if not spoil:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=_pipe, args=(upstream, conn), daemon=True).start()
            _pipe(conn, upstream)
            return
        if self.mode == "503":
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                head += chunk
            conn.sendall(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
                + f"Content-Length: {len(self._SLOW_DOWN)}\r\n".encode()
                + b"Connection: close\r\n\r\n"
                + self._SLOW_DOWN
            )
        else:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@pytest.mark.parametrize("mode", ["reset", "503"])
def test_transient_failures_are_retried(
    mode: str, s3_server: S3ServerInfo, s3_bucket: str, s3_settings: S3Settings
) -> None:
    S3Store(s3_bucket, "r", s3_settings).write_bytes("k.txt", b"value")
    with FaultyProxy(s3_server.ports["s3"], mode, failures=2) as proxy:
        settings = dataclasses.replace(s3_settings, endpoint=f"127.0.0.1:{proxy.port}")
        store = S3Store(s3_bucket, "r", settings)
        assert store.read_bytes("k.txt") == b"value"
        assert proxy.connections == 3  # two spoiled, one that got through


# a reset can land while the client is still inside connect(): either wording is right
@pytest.mark.parametrize(
    ("mode", "reason"), [("reset", "connection lost|cannot connect"), ("503", "SlowDown")]
)
def test_persistent_failures_give_up_with_a_clear_error(
    mode: str, reason: str, s3_server: S3ServerInfo, s3_bucket: str, s3_settings: S3Settings
) -> None:
    with FaultyProxy(s3_server.ports["s3"], mode, failures=100) as proxy:
        settings = dataclasses.replace(s3_settings, endpoint=f"127.0.0.1:{proxy.port}", retries=2)
        with pytest.raises(StorageError, match=reason) as err:
            S3Store(s3_bucket, "r", settings).read_bytes("k.txt")
        assert proxy.connections == 3  # the first try and two retries
    assert f"127.0.0.1:{proxy.port}" in str(err.value)
    assert s3_bucket in str(err.value)


class BackoffClock:
    """Stands in for ``time`` inside imgclf.storage.s3client: sleeps advance the clock at once.

    The retry loop's budget is then checked on what it decided to wait, not on how fast this
    machine happens to be; real time still passes for the connection attempts themselves.
    """

    def __init__(self) -> None:
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return time.monotonic() + sum(self.slept)

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


@pytest.mark.parametrize("retries", [3, 50])
def test_unreachable_endpoint_fails_within_the_timeout(
    retries: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    (port,) = free_ports(1)  # nothing listens there
    settings = S3Settings(
        endpoint=f"127.0.0.1:{port}",
        secure=False,
        access_key="AKIAEXAMPLE",
        secret_key=SECRET,
        region="us-east-1",
        timeout=1.5,
        retries=retries,
    )
    clock = BackoffClock()
    monkeypatch.setattr("imgclf.storage.s3client.time", clock)
    with pytest.raises(StorageError) as err:
        S3Store("some-bucket", "p", settings).list()
    assert clock.slept, "a refused connection is retried"
    assert sum(clock.slept) <= settings.timeout, "the waits alone exceed IMGCLF_S3_TIMEOUT"
    assert len(clock.slept) <= retries
    message = str(err.value)
    assert f"after {len(clock.slept) + 1} attempts" in message
    assert f"http://127.0.0.1:{port}" in message and "some-bucket" in message
    assert "cannot connect" in message
    assert SECRET not in message and "\n" not in message


def accepted_connections(server: socket.socket) -> int:
    """Drain and count the connections the kernel completed on ``server`` (never answered)."""
    server.setblocking(False)
    count = 0
    while True:
        try:
            conn, _ = server.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


def test_silent_endpoint_fails_after_one_timeout_not_one_per_retry() -> None:
    # accepts TCP connections (kernel backlog) but never answers: a hung server
    with socket.create_server(("127.0.0.1", 0), backlog=16) as silent:
        port = silent.getsockname()[1]
        settings = S3Settings(
            endpoint=f"127.0.0.1:{port}",
            secure=False,
            access_key="AKIAEXAMPLE",
            secret_key=SECRET,
            region="us-east-1",
            timeout=1.0,
            retries=3,
        )
        with pytest.raises(StorageError, match="no answer within 1s") as err:
            S3Store("hung-bucket", "", settings).exists("x")
        assert accepted_connections(silent) == 1, "a request that timed out was sent again"
    assert f"127.0.0.1:{port}" in str(err.value) and "hung-bucket" in str(err.value)
    assert "attempts" not in str(err.value)


@pytest.mark.parametrize("wrong", ["secret", "access"])
def test_wrong_credentials_name_endpoint_and_bucket_not_secret(
    wrong: str, s3_server: S3ServerInfo, s3_bucket: str, s3_settings: S3Settings
) -> None:
    if wrong == "secret":
        settings = dataclasses.replace(s3_settings, secret_key=SECRET)
    else:
        settings = dataclasses.replace(s3_settings, access_key="AKIANOSUCHUSER")
    store = S3Store(s3_bucket, "p", settings)
    for action in (store.list, lambda: store.exists("k"), lambda: store.write_bytes("k", b"1")):
        with pytest.raises(StorageError, match="access denied") as err:
            action()
        message = str(err.value)
        assert s3_server.endpoint in message and s3_bucket in message
        assert SECRET not in message and s3_server.secret_key not in message
        assert "AWS_SECRET_ACCESS_KEY" in message and "\n" not in message


def test_secret_never_in_repr(s3_server: S3ServerInfo, s3_settings: S3Settings) -> None:
    store = S3Store("b-repr", "p", s3_settings)
    for obj in (s3_settings, store, s3_server):
        assert s3_server.secret_key not in repr(obj)
        assert s3_server.secret_key not in str(obj)
    assert s3_server.secret_key not in str(s3_settings.public_dict())
    assert s3_settings.redact(f"x{s3_server.secret_key}y") == "x***y"


# -- settings: environment and params.yaml (no server needed) ----------------------------------


def test_settings_defaults_and_env() -> None:
    assert S3Settings.from_env({}) == S3Settings()
    assert S3Settings().url == "https://s3.amazonaws.com"
    env = {
        "AWS_ENDPOINT_URL": "http://localhost:9000",
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "eu-west-1",
        "IMGCLF_S3_TIMEOUT": "2.5",
        "IMGCLF_S3_RETRIES": "5",
        "IMGCLF_S3_WORKERS": "16",
        "IMGCLF_S3_PART_SIZE": str(8 * MIB),
    }
    s = S3Settings.from_env(env)
    assert (s.endpoint, s.secure, s.region) == ("localhost:9000", False, "eu-west-1")
    assert (s.access_key, s.secret_key) == ("AKIAEXAMPLE", SECRET)
    assert (s.timeout, s.retries, s.workers, s.part_size) == (2.5, 5, 16, 8 * MIB)
    # MinIO-style names, a bare host:port and an explicit TLS flag
    minio_env = {
        "MINIO_ENDPOINT": "minio.kubeflow:9000",
        "MINIO_SECURE": "false",
        "MINIO_ACCESS_KEY": "minio",
        "MINIO_SECRET_KEY": SECRET,
        "AWS_ENDPOINT_URL": "https://ignored.example",
    }
    s = S3Settings.from_env(minio_env)
    assert (s.endpoint, s.secure, s.access_key) == ("minio.kubeflow:9000", False, "minio")
    assert S3Settings.from_env({"MINIO_ENDPOINT": "minio:9000"}).secure is True


def test_params_section_overrides_env_but_never_holds_keys(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(
        "train: {epochs: 1}\n"
        "s3:\n  endpoint: https://minio.example:9443\n  timeout: 3\n  workers: 4\n"
        f"  part_size: {6 * MIB}\n  retries: 0\n  region: ap-south-1\n",
        encoding="utf-8",
    )
    env = {
        "AWS_ENDPOINT_URL": "http://localhost:9000",
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "IMGCLF_S3_TIMEOUT": "20",
    }
    s = S3Settings.load(params, env)
    assert (s.endpoint, s.secure, s.region) == ("minio.example:9443", True, "ap-south-1")
    assert (s.timeout, s.workers, s.part_size, s.retries) == (3.0, 4, 6 * MIB, 0)
    assert s.secret_key == SECRET
    assert S3Settings.load(tmp_path / "absent.yaml", env).endpoint == "localhost:9000"

    params.write_text("s3:\n  secret_key: oops\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"params.yaml:s3.secret_key.*environment"):
        S3Settings.load(params, env)


@pytest.mark.parametrize(
    ("env", "params", "match"),
    [
        ({"MINIO_ENDPOINT": "ftp://host:21"}, {}, "MINIO_ENDPOINT.*http or https"),
        ({"AWS_ENDPOINT_URL": "http://host:9000/bucket"}, {}, "no path"),
        ({"AWS_ENDPOINT_URL": "http://host:notaport"}, {}, "invalid port"),
        ({"AWS_ENDPOINT_URL": "https://h:1", "MINIO_SECURE": "false"}, {}, "disagree"),
        ({"MINIO_SECURE": "maybe"}, {}, "MINIO_SECURE"),
        ({"AWS_ACCESS_KEY_ID": ""}, {}, "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID"),
        ({"IMGCLF_S3_TIMEOUT": "soon"}, {}, "IMGCLF_S3_TIMEOUT"),
        ({"IMGCLF_S3_TIMEOUT": "0"}, {}, "IMGCLF_S3_TIMEOUT.*> 0"),
        ({}, {"part_size": 1024}, r"s3.part_size.*5 MiB"),
        ({}, {"workers": 0}, "s3.workers"),
        ({}, {"workers": "8"}, "s3.workers.*integer"),
        ({}, {"endpoint_url": "x"}, "unknown key"),
        ({}, {"access_key": "x"}, "only from the environment"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_setting(
    env: dict[str, str], params: dict[str, object], match: str
) -> None:
    full_env = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": SECRET, **env}
    with pytest.raises(ConfigError, match=match) as err:
        S3Settings.from_env(full_env, params)
    assert SECRET not in str(err.value)


def test_bad_uris_are_config_errors() -> None:
    settings = S3Settings(endpoint="127.0.0.1:1", secure=False)
    with pytest.raises(ConfigError, match="no bucket"):
        S3Store.from_uri("s3:///prefix", settings)
    with pytest.raises(ConfigError, match="invalid bucket name"):
        S3Store.from_uri("s3://Bad_Bucket/x", settings)


def test_publish_helpers_accept_any_store(s3_store: S3Store, tmp_path: Path) -> None:
    keys = publish_tree(s3_store, write_tree(tmp_path / "tree", TREE), "datasets/d/1")
    assert is_published(s3_store, "datasets/d/1")
    assert s3_store.list("datasets/d/1") == sorted([*keys, "datasets/d/1/READY"])
    out = tmp_path / "out"
    s3_store.download_tree("datasets/d/1", out)
    (out / "READY").unlink()
    assert read_tree(out) == TREE
