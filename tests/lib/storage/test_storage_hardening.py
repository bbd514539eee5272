"""Store hardening: exclusive creates, streamed content hashes, modification times, and
no bucket created behind the user's back.

The Store cases run on a LocalStore and on the session's real S3 server (SeaweedFS, see
tests/s3_server.py); races are forced with a barrier, never timed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from imgclf.cli import main
from imgclf.errors import StorageError
from imgclf.storage import LocalStore, Store, open_store
from imgclf.storage.s3config import S3Settings, s3_params
from imgclf.storage.staging import local_output
from s3_server import delete_bucket, new_bucket_name

WRITERS = 20


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    s3_store: Store = request.getfixturevalue("s3_store")
    return s3_store


def _race(store: Store, key: str) -> list[bool]:
    """``create_exclusive(key, "writer <i>")`` from WRITERS threads released together."""
    barrier = threading.Barrier(WRITERS)

    def create(writer: int) -> bool:
        barrier.wait()
        return store.create_exclusive(key, f"writer {writer}".encode())

    with ThreadPoolExecutor(WRITERS) as pool:
        return list(pool.map(create, range(WRITERS)))


def _assert_one_winner(store: Store, key: str, results: list[bool]) -> None:
    assert results.count(True) == 1, results
    winner = results.index(True)
    assert store.read_bytes(key) == f"writer {winner}".encode()
    assert store.create_exclusive(key, b"late") is False
    assert store.read_bytes(key) == f"writer {winner}".encode()


def test_create_exclusive_has_exactly_one_winner(store: Store) -> None:
    results = _race(store, "locks/version/CLAIM")
    _assert_one_winner(store, "locks/version/CLAIM", results)
    assert store.list("locks") == ["locks/version/CLAIM"]  # no temp or probe objects left


@pytest.mark.s3
def test_seaweedfs_enforces_conditional_puts(s3_store: Store) -> None:
    from imgclf.storage.s3 import S3Store

    assert isinstance(s3_store, S3Store)
    assert s3_store.conditional_writes() is True
    assert s3_store.list("") == []  # the probe object is removed


@pytest.mark.s3
def test_create_exclusive_by_listing_has_exactly_one_winner(
    s3_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The protocol used where a server ignores ``If-None-Match``."""
    from imgclf.storage.s3 import S3Store

    monkeypatch.setattr(S3Store, "conditional_writes", lambda self: False)
    results = _race(s3_store, "locks/CLAIM")
    if any(results):
        _assert_one_winner(s3_store, "locks/CLAIM", results)
    else:  # every contender saw another: nobody owns the key, which stays uncreated
        assert not s3_store.exists("locks/CLAIM")
    assert s3_store.create_exclusive("locks/CLAIM", b"late") is False


def test_content_sha256_and_modified_times(store: Store) -> None:
    data = bytes(range(256)) * 9000  # several read chunks
    store.write_bytes("m/weights.bin", data)
    store.write_bytes("m/sub/model.json", b"{}")
    assert store.content_sha256("m/weights.bin") == hashlib.sha256(data).hexdigest()
    with pytest.raises(StorageError, match=r"missing\.bin"):
        store.content_sha256("m/missing.bin")

    times = store.modified_times("m")
    assert sorted(times) == store.list("m") == ["m/sub/model.json", "m/weights.bin"]
    now = dt.datetime.now(dt.UTC)
    assert all(
        when.tzinfo is not None and when <= now + dt.timedelta(minutes=5) for when in times.values()
    )
    assert store.modified_times("nothing") == {}


@pytest.mark.s3
def test_content_sha256_hashes_the_bytes_not_the_metadata(s3_store: Store) -> None:
    from imgclf.storage.s3 import S3Store

    assert isinstance(s3_store, S3Store)
    stale = {"sha256": hashlib.sha256(b"original").hexdigest()}
    s3_store.client.put_object(
        s3_store.bucket, "root/w.bin", io.BytesIO(b"tampered"), 8, metadata=stale
    )
    assert s3_store.content_sha256("w.bin") == hashlib.sha256(b"tampered").hexdigest()


# -- buckets ---------------------------------------------------------------------------------


@pytest.fixture
def missing_bucket(s3_settings: S3Settings) -> Iterator[str]:
    """A bucket name nobody created; removed afterwards if a test created it."""
    name = new_bucket_name("missing")
    yield name
    delete_bucket(s3_settings, name)


@pytest.mark.s3
def test_writing_to_a_missing_bucket_is_refused_in_one_line(
    s3_settings: S3Settings, missing_bucket: str, tmp_path: Path
) -> None:
    from imgclf.storage.s3 import S3Store, make_client

    store = S3Store(missing_bucket, "registry", s3_settings)
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "a.txt").write_bytes(b"a")
    writes = {
        "write_bytes": lambda: store.write_bytes("a.txt", b"a"),
        "create_exclusive": lambda: store.create_exclusive("CLAIM", b"token"),
        "upload_file": lambda: store.upload_file(tmp_path / "tree" / "a.txt", "a.txt"),
        "upload_tree": lambda: store.upload_tree(tmp_path / "tree", "t"),
    }
    for what, write in writes.items():
        with pytest.raises(StorageError) as refused:
            write()
        message = str(refused.value)
        assert f"bucket {missing_bucket} does not exist at {s3_settings.url}" in message, what
        assert "s3.create_bucket: true" in message and "\n" not in message
    assert not make_client(s3_settings).bucket_exists(missing_bucket)


@pytest.mark.s3
def test_buckets_are_created_when_asked(
    s3_env: dict[str, str],
    s3_settings: S3Settings,
    missing_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from imgclf.storage.s3 import S3Store, make_client

    client = make_client(s3_settings)
    with s3_params({"create_bucket": True}, "params.yaml"):
        open_store(f"s3://{missing_bucket}/a").write_bytes("k", b"v")
    assert client.bucket_exists(missing_bucket)
    delete_bucket(s3_settings, missing_bucket)

    monkeypatch.setenv("IMGCLF_S3_CREATE_BUCKET", "true")
    open_store(f"s3://{missing_bucket}/b").write_bytes("k", b"v")
    assert client.bucket_exists(missing_bucket)
    delete_bucket(s3_settings, missing_bucket)

    S3Store(missing_bucket, "", s3_settings).ensure_bucket()  # `imgclf dev s3 --bucket`
    assert client.bucket_exists(missing_bucket)


@pytest.mark.s3
def test_step_output_in_a_missing_bucket_fails_before_the_step_runs(
    s3_env: dict[str, str],
    missing_bucket: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ran = False
    with (
        pytest.raises(StorageError, match=f"bucket {missing_bucket} does not exist"),
        local_output(f"s3://{missing_bucket}/dataset"),
    ):
        ran = True
    assert not ran

    params = tmp_path / "params.yaml"
    params.write_text("ingest: {}\n")
    out = f"s3://{missing_bucket}/dataset"
    assert main(["ingest", "--out", out, "--params", str(params)]) == StorageError.exit_code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"bucket {missing_bucket} does not exist" in err
