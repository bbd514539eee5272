"""The pipeline on S3: a real SeaweedFS server, the real CLI, DVC and its ``minio`` remote.

What a user of the MinIO / S3 README section relies on:

- ``ingest.source: s3://bucket/prefix`` (a tree or one archive object) gives the same
  dataset as the same images on disk, and no credential ever lands in an output;
- every step reads and writes ``s3://`` locations through the CLI; an output is trusted
  only with its ``_SUCCESS`` marker, a failed validation still leaves its report there;
- ``dvc repro`` with an S3 source and an S3 registry, then ``imgclf registry`` on it;
- ``dvc push`` / ``dvc pull`` through the committed ``minio`` remote, and
  ``imgclf data ensure`` trying the remote only when it can work;
- faults: the server going down in the middle of a publish, wrong credentials and an
  unreachable or silent endpoint all fail fast, on one line, without the secret.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import socket
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from _dataset_factory import pattern_image
from _model_factory import build_model_dir
from _repo_copy import REPO, TINY_TRAIN, clone_repo, sh
from imgclf.config import IngestConfig
from imgclf.data.sources import SourceOptions, materialize_source, open_source
from imgclf.data.versioned import pull_blocker
from imgclf.dev import S3ServerInfo, SeaweedServer, free_ports
from imgclf.errors import ConfigError, DataError, StorageError
from imgclf.registry import ModelRegistry
from imgclf.steps import ingest
from imgclf.storage import Store
from imgclf.storage.s3 import S3Store, make_client
from imgclf.storage.s3config import ENDPOINT_VARS, S3Settings
from imgclf.storage.staging import MARKER, local_input
from s3_server import delete_bucket

pytestmark = pytest.mark.s3

DVC_BUCKET = "imgclf-dvc"  # the bucket of the committed `minio` remote (.dvc/config)


# --- helpers ----------------------------------------------------------------------------------


def write_raw_tree(root: Path, *, per_class: int, size: int = 16, seed: int = 0) -> Path:
    """``<class>/<n>.png`` for three learnable classes (see _dataset_factory), as raw input."""
    rng = np.random.default_rng(seed)
    for index, label in enumerate(("p0", "p1", "p2")):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            pattern_image(index, size, rng).save(folder / f"{label}_{n:03d}.png")
    return root


def tree_digest(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root``."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def files_under(*roots: Path) -> Iterator[Path]:
    """Every file below ``roots`` (a file root is itself), skipping git's object store."""
    for root in roots:
        if root.is_file():
            yield root
            continue
        for path in root.rglob("*"):
            if path.is_file() and ".git" not in path.relative_to(root).parts:
                yield path


def leaks(paths: Iterable[Path], texts: Iterable[str], needles: dict[str, str]) -> list[str]:
    """``"<where>: <needle name>"`` for every needle found in a file or a captured text."""
    found = []
    encoded = {name: value.encode() for name, value in needles.items()}
    for path in paths:
        data = path.read_bytes()
        found += [f"{path}: {name}" for name, value in encoded.items() if value in data]
    for i, text in enumerate(texts):
        found += [f"log {i}: {name}" for name, value in needles.items() if value in text]
    return found


def s3_cli_env(server: S3ServerInfo, **extra: str) -> dict[str, str]:
    """The variables `imgclf dev s3` prints, plus ``extra``."""
    return {**server.env(), **extra}


class StopServerAfterTreeUpload:
    """A Store that takes the real S3 server down once a tree upload went through.

    Everything else is passed to the wrapped store, so the registry publishes for real until
    the server is gone: an outage in the middle of a publish, after the model files landed
    and before its metrics, lineage and READY marker.
    """

    def __init__(self, store: Store, server: SeaweedServer) -> None:
        self.inner = store
        self.server = server

    def upload_tree(self, local_dir: Path, prefix: str, **options: Any) -> list[str]:
        keys = self.inner.upload_tree(local_dir, prefix, **options)
        self.server.stop()
        return keys

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# --- ingest from s3:// --------------------------------------------------------------------------


def test_s3_source_reads_trees_and_archives_like_local_ones(
    tmp_path: Path,
    s3_env: dict[str, str],
    s3_bucket: str,
    s3_settings: S3Settings,
) -> None:
    raw = write_raw_tree(tmp_path / "raw", per_class=4)
    store = S3Store(s3_bucket, "", s3_settings)
    store.upload_tree(raw, "flat")
    for split in ("train", "val", "test"):
        store.upload_tree(raw, f"split/{split}")
    tar_path = tmp_path / "data.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        tf.add(raw, arcname="photos")  # wrapped in one folder, as people pack them
    store.upload_file(tar_path, "archives/data.tar.gz")
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as zf:
        for path in sorted(raw.rglob("*.png")):
            zf.write(path, path.relative_to(raw).as_posix())
    store.write_bytes("archives/no-suffix", zipped.getvalue())  # kind found from the content

    expected = tree_digest(raw)
    for uri in ("flat", "archives/data.tar.gz", "archives/no-suffix"):
        got = materialize_source(f"s3://{s3_bucket}/{uri}", tmp_path / "out" / uri)
        assert tree_digest(got) == expected, uri
    split = materialize_source(f"s3://{s3_bucket}/split/", tmp_path / "out" / "split")
    splits = ("train", "val", "test")
    assert set(tree_digest(split)) == {f"{s}/{rel}" for s in splits for rel in expected}

    summary = ingest.run(
        IngestConfig(source=f"s3://{s3_bucket}/flat", s3={"timeout": 4, "workers": 2}),
        out_dir=tmp_path / "dataset",
    )
    assert summary["source"] == f"s3://{s3_bucket}/flat"
    assert summary["num_images"] == 12 and summary["num_errors"] == 0
    found = leaks(
        files_under(tmp_path / "dataset"),
        [],
        {"secret": s3_env["AWS_SECRET_ACCESS_KEY"], "access key": s3_env["AWS_ACCESS_KEY_ID"]},
    )
    assert found == []


def test_s3_source_errors_name_the_uri_never_the_secret(
    tmp_path: Path,
    s3_env: dict[str, str],
    s3_bucket: str,
    s3_settings: S3Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = S3Store(s3_bucket, "", s3_settings)
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w:gz") as tf:
        info = tarfile.TarInfo("../escaped.png")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"png"))
    store.write_bytes("bad/data.tar.gz", evil.getvalue())
    store.write_bytes("notes/readme.txt", b"not an archive")

    with pytest.raises(DataError, match=r"refused member '\.\./escaped\.png'"):
        open_source(f"s3://{s3_bucket}/bad/data.tar.gz").materialize(tmp_path / "a")
    assert not (tmp_path / "escaped.png").exists()
    with pytest.raises(DataError, match=rf"s3://{s3_bucket}/nothing.*no objects"):
        open_source(f"s3://{s3_bucket}/nothing").materialize(tmp_path / "b")
    with pytest.raises(DataError, match="archive object not found"):
        open_source(f"s3://{s3_bucket}/missing.zip").materialize(tmp_path / "c")
    with pytest.raises(DataError, match=r"neither a \.tar\.gz"):
        open_source(f"s3://{s3_bucket}/notes/readme.txt").materialize(tmp_path / "d")

    with pytest.raises(ConfigError, match="credentials do not belong") as err:
        open_source(f"s3://AKIAEXAMPLE:topsecret@{s3_bucket}/x").materialize(tmp_path / "e")
    assert "topsecret" not in str(err.value)
    with pytest.raises(ConfigError, match="only from the environment") as err:
        options = SourceOptions(s3={"secret_key": "hush"})
        open_source(f"s3://{s3_bucket}/x", options).materialize(tmp_path / "f")
    assert "hush" not in str(err.value)


# --- every step on s3:// through the CLI --------------------------------------------------------


@pytest.mark.slow
def test_every_step_reads_and_writes_s3_through_the_cli(
    tmp_path: Path,
    s3_server: S3ServerInfo,
    s3_env: dict[str, str],
    s3_bucket: str,
    s3_settings: S3Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    registry = f"s3://{s3_bucket}/registry"
    params = {
        "ingest": {},
        "validate": {},
        "train": TINY_TRAIN,
        "evaluate": {"min_accuracy": 0.0},
        "deploy": {"apply": False},
        "registry": {"uri": registry},
    }
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(work)
    raw = write_raw_tree(tmp_path / "raw", per_class=40)
    store = S3Store(s3_bucket, "", s3_settings)
    store.upload_tree(raw, "raw")
    run = f"s3://{s3_bucket}/run"
    env = s3_cli_env(s3_server)

    def imgclf(*args: str) -> str:
        return sh(work, "imgclf", *args, env=env).stdout

    store.write_bytes("run/dataset/stale.txt", b"from an older run")
    imgclf("ingest", "--source", f"s3://{s3_bucket}/raw", "--out", f"{run}/dataset")
    assert not store.exists("run/dataset/stale.txt"), "an output replaces the old one"
    marker = json.loads(store.read_bytes(f"run/dataset/{MARKER}"))
    listed = {k.removeprefix("run/dataset/") for k in store.list("run/dataset")} - {MARKER}
    assert set(marker["files"]) == listed and "dataset.json" in listed
    imgclf("validate", "--dataset", f"{run}/dataset", "--out", f"{run}/validation")
    imgclf("train", "--dataset", f"{run}/dataset", "--out", f"{run}/model")
    imgclf(
        "evaluate",
        *("--dataset", f"{run}/dataset", "--model", f"{run}/model", "--out", f"{run}/eval"),
    )
    imgclf(
        "deploy", "--dataset", f"{run}/dataset", "--model", f"{run}/model",
        "--eval", f"{run}/eval", "--out", f"{run}/deploy",
    )  # fmt: skip
    deploy = json.loads(store.read_bytes("run/deploy/deploy.json"))
    assert deploy["promoted"] is True and deploy["version"] == 1
    assert deploy["smoke"]["passed"] is True and store.exists("run/deploy/smoke.md")
    assert deploy["storage_uri"] == f"{registry}/models/digits/1/model"
    assert store.exists(f"run/deploy/{MARKER}")

    assert "production" in imgclf("registry", "list", "--registry", registry)
    assert "model.safetensors" in imgclf("registry", "show", "digits", "1", "--registry", registry)
    second = build_model_dir(tmp_path / "second", seed=7)
    reg = ModelRegistry(S3Store(s3_bucket, "registry", s3_settings))
    assert reg.publish("digits", second, {"accuracy": 0.5}, {"dataset_hash": "x"}) == 2
    assert "-> version 2" in imgclf("registry", "promote", "digits", "2", "--registry", registry)
    assert "-> version 1" in imgclf("registry", "rollback", "digits", "--registry", registry)
    assert reg.alias("digits") == 1

    # a failed validation: the report is readable at the output URI, which is not trusted
    (raw / "p0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 24)
    store.upload_file(raw / "p0" / "broken.png", "raw/p0/broken.png")
    imgclf("ingest", "--source", f"s3://{s3_bucket}/raw", "--out", f"{run}/dataset")
    failed = sh(
        work,
        *("imgclf", "validate", "--dataset", f"{run}/dataset", "--out", f"{run}/validation"),
        check=False,
        env=env,
    )
    assert failed.returncode == 3, failed.stderr
    assert "broken.png" in failed.stderr and f"{run}/validation/report.json" in failed.stderr
    assert "imgclf-out-" not in failed.stderr and "Traceback" not in failed.stderr
    assert not store.exists(f"run/validation/{MARKER}")
    report = json.loads(store.read_bytes("run/validation/report.json"))
    assert report["blocking_success"] is False
    with (
        pytest.raises(StorageError, match=f"{run}/validation: no {MARKER} marker"),
        local_input(f"{run}/validation"),
    ):
        pass


def test_outputs_refuse_the_bucket_root_and_inputs_need_the_marker(
    tmp_path: Path, s3_server: S3ServerInfo, s3_bucket: str, s3_settings: S3Settings
) -> None:
    store = S3Store(s3_bucket, "", s3_settings)
    store.write_bytes("keep.txt", b"precious")
    env = s3_cli_env(s3_server)
    args = ("ingest", "--source", "sample:digits", "--out", f"s3://{s3_bucket}")
    res = sh(tmp_path, "imgclf", *args, check=False, env=env)
    assert res.returncode == 2 and "needs its own prefix" in res.stderr
    assert store.read_bytes("keep.txt") == b"precious"
    args = ("deploy", "--model", f"s3://{s3_bucket}/none", "--eval", "e", "--out", "d")
    res = sh(tmp_path, "imgclf", *args, check=False, env=env)
    assert res.returncode == 1 and f"s3://{s3_bucket}/none: no {MARKER} marker" in res.stderr


# --- dvc repro with an S3 source and registry ---------------------------------------------------


@pytest.mark.slow
def test_dvc_repro_with_s3_source_and_registry_leaks_no_credentials(
    tmp_path: Path, s3_server: S3ServerInfo, s3_bucket: str, s3_settings: S3Settings
) -> None:
    registry = f"s3://{s3_bucket}/registry"
    repo = clone_repo(
        tmp_path,
        min_accuracy=0.0,
        params={"ingest": {"source": f"s3://{s3_bucket}/digits"}, "registry": {"uri": registry}},
    )
    sh(repo, "imgclf", "data", "sample", "--out", "data")
    S3Store(s3_bucket, "digits", s3_settings).upload_tree(repo / "data", "")
    env = s3_cli_env(s3_server, IMGCLF_S3_TIMEOUT="10")

    repro = sh(repo, "dvc", "repro", env=env)
    dataset = json.loads((repo / "out/dataset/dataset.json").read_text())
    assert dataset["source"] == f"s3://{s3_bucket}/digits" and dataset["num_images"] == 1797
    deploy = json.loads((repo / "out/deploy/deploy.json").read_text())
    assert deploy["promoted"] is True and deploy["version"] == 1
    assert deploy["registry"] == registry
    listed = sh(repo, "imgclf", "registry", "list", "--registry", registry, env=env)
    row = next(line for line in listed.stdout.splitlines() if line.startswith("digits"))
    assert row.split()[1] == "1" and row.split()[-1] == "production"
    assert not (repo / "registry").exists(), "nothing may fall back to the local registry"

    downloaded = tmp_path / "registry-copy"
    S3Store(s3_bucket, "registry", s3_settings).download_tree("", downloaded)
    assert (downloaded / "models/digits/1/READY").is_file()
    for part in ("out/deploy/deploy.json", ".dvc/config", "pipelines/training_pipeline.yaml"):
        assert (repo / part).is_file(), part
    # every file of the checkout: out/, .dvc/ (config, DVC's logs), dvc.lock, pipelines/, ...
    scanned = [*files_under(repo), *files_under(downloaded)]
    texts = [repro.stdout, repro.stderr, listed.stdout, listed.stderr]
    needles = {"secret key": s3_server.secret_key, "access key": s3_server.access_key}
    assert leaks(scanned, texts, needles) == []


# --- the DVC remote -----------------------------------------------------------------------------


@pytest.fixture
def dvc_bucket(s3_server: S3ServerInfo, s3_settings: S3Settings) -> Iterator[str]:
    """The committed remote's bucket on the session server, removed afterwards."""
    client = make_client(s3_settings)
    if not client.bucket_exists(DVC_BUCKET):
        client.make_bucket(DVC_BUCKET)
    yield DVC_BUCKET
    delete_bucket(s3_settings, DVC_BUCKET)


def test_committed_dvc_remote_is_minio_without_credentials() -> None:
    text = (REPO / ".dvc/config").read_text()
    assert "remote = minio" in text
    assert "url = s3://imgclf-dvc/store" in text
    assert "endpointurl = http://127.0.0.1:8333" in text
    for key in ("access_key_id", "secret_access_key", "session_token", "password"):
        assert key not in text
    assert ".dvc/config.local" in (REPO / ".gitignore").read_text()


def _unused_endpoint() -> str:
    return f"http://127.0.0.1:{free_ports(1)[0]}"


@pytest.mark.slow
def test_dvc_push_then_pull_into_a_fresh_clone_restores_data(
    tmp_path: Path, s3_server: S3ServerInfo, dvc_bucket: str
) -> None:
    repo = clone_repo(tmp_path, min_accuracy=0.0)
    no_aws_files = {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    creds = s3_cli_env(s3_server, **no_aws_files)
    creds.pop("AWS_ENDPOINT_URL")  # the endpoint comes from the DVC remote's config

    # no credentials: the default remote is not even tried (no slow S3 retries, no errors)
    offline = {**no_aws_files, "IMGCLF_SKIP_DVC_PULL": None}
    ensured = sh(repo, "imgclf", "data", "ensure", env=offline)
    assert "rebuilt data/ from sample:digits; it matches data.dvc" in ensured.stdout
    assert "no S3 credentials for DVC remote 'minio'" in ensured.stderr
    assert "ERROR" not in ensured.stderr and "Traceback" not in ensured.stderr

    sh(repo, "dvc", "remote", "modify", "--local", "minio", "endpointurl", s3_server.endpoint)
    sh(repo, "dvc", "push", env=creds)
    pushed = make_client(s3_server.settings()).list_objects(dvc_bucket, "store/", recursive=True)
    assert any(True for _ in pushed)

    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    assert not (clone / "data").exists() and not (clone / ".dvc/config.local").exists()
    sh(clone, "dvc", "remote", "modify", "--local", "minio", "endpointurl", s3_server.endpoint)
    sh(clone, "dvc", "pull", "data.dvc", env=creds)  # stages never ran here: no dvc.lock
    expected = tree_digest(repo / "data")
    assert len(expected) == 1797 and tree_digest(clone / "data") == expected
    assert sh(clone, "git", "status", "--porcelain").stdout == ""

    # `imgclf data ensure`: the DVC cache first, then the remote, then the sample
    shutil.rmtree(clone / "data")
    ensured = sh(clone, "imgclf", "data", "ensure", env=creds)
    assert ensured.stdout.strip() == "restored data/ from the DVC cache"
    shutil.rmtree(clone / "data")
    shutil.rmtree(clone / ".dvc/cache")
    ensured = sh(clone, "imgclf", "data", "ensure", env={**creds, "IMGCLF_SKIP_DVC_PULL": None})
    assert ensured.stdout.strip() == "restored data/ with `dvc pull` from the DVC remote"
    assert tree_digest(clone / "data") == expected

    shutil.rmtree(clone / "data")
    shutil.rmtree(clone / ".dvc/cache")
    down = _unused_endpoint()
    sh(clone, "dvc", "remote", "modify", "--local", "minio", "endpointurl", down)
    ensured = sh(clone, "imgclf", "data", "ensure", env={**creds, "IMGCLF_SKIP_DVC_PULL": None})
    assert f"endpoint {down} is not reachable" in ensured.stderr  # so no slow S3 retries
    assert "rebuilt data/ from sample:digits" in ensured.stdout
    assert tree_digest(clone / "data") == expected
    for path in (repo / ".dvc/config", clone / ".dvc/config", clone / ".dvc/config.local"):
        assert s3_server.secret_key not in path.read_text()


def test_pull_blocker_needs_a_remote_credentials_and_a_live_endpoint(
    tmp_path: Path, s3_server: S3ServerInfo
) -> None:
    dvc_dir = tmp_path / ".dvc"
    dvc_dir.mkdir()
    shutil.copy(REPO / ".dvc/config", dvc_dir / "config")
    local = dvc_dir / "config.local"
    no_aws_files = {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    env = {**no_aws_files, "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "hush"}

    assert "no S3 credentials for DVC remote 'minio'" in str(pull_blocker(tmp_path, no_aws_files))
    local.write_text(f"['remote \"minio\"']\n    endpointurl = {s3_server.endpoint}\n")
    assert pull_blocker(tmp_path, env) is None
    local.write_text(
        f"['remote \"minio\"']\n    endpointurl = {s3_server.endpoint}\n"
        "    access_key_id = AKIAEXAMPLE\n    secret_access_key = hush\n"
    )
    assert pull_blocker(tmp_path, no_aws_files) is None
    down = _unused_endpoint()
    local.write_text(f"['remote \"minio\"']\n    endpointurl = {down}\n")
    blocker = pull_blocker(tmp_path, env)
    assert blocker == f"DVC remote 'minio' endpoint {down} is not reachable"
    local.unlink()
    (dvc_dir / "config").write_text("[core]\n    analytics = false\n")
    assert pull_blocker(tmp_path, env) == "no default DVC remote"


# --- faults -------------------------------------------------------------------------------------


def _registry_versions(server: S3ServerInfo, uri: str, cwd: Path) -> list[dict[str, Any]]:
    listed = sh(cwd, "imgclf", "registry", "list", "--registry", uri, "--json", env=server.env())
    return json.loads(listed.stdout)


def test_server_down_mid_publish_leaves_production_alone_and_a_retry_succeeds(
    tmp_path: Path,
    s3_server_process: SeaweedServer,
    s3_bucket: str,
    s3_settings: S3Settings,
) -> None:
    uri = f"s3://{s3_bucket}/registry"
    store = S3Store(s3_bucket, "registry", s3_settings)
    reg = ModelRegistry(store)
    first = build_model_dir(tmp_path / "m1", seed=1)
    assert reg.publish("digits", first, {"accuracy": 0.9}, {}) == 1
    reg.promote("digits", 1)
    second = build_model_dir(tmp_path / "m2", seed=2)

    flaky = ModelRegistry(StopServerAfterTreeUpload(store, s3_server_process))
    try:
        with pytest.raises(StorageError) as err:
            flaky.publish("digits", second, {"accuracy": 0.95}, {})
        assert not s3_server_process.running, "the outage did not happen during the publish"
    finally:
        s3_server_process.start()
    assert s3_server_process.info.endpoint in str(err.value)
    assert s3_settings.secret_key not in str(err.value)

    info = s3_server_process.info
    versions = _registry_versions(info, uri, tmp_path)
    assert [(v["version"], v["aliases"]) for v in versions] == [(1, ["production"])]
    assert store.list("models/digits/2"), "the interrupted publish left objects (not trusted)"
    args = ("registry", "show", "digits", "2", "--registry", uri)
    shown = sh(tmp_path, "imgclf", *args, check=False, env=info.env())
    assert shown.returncode != 0 and "no complete version 2" in shown.stderr

    assert reg.publish("digits", second, {"accuracy": 0.95}, {}) == 3  # numbers never reused
    reg.promote("digits", 3)
    versions = _registry_versions(info, uri, tmp_path)
    assert [(v["version"], v["aliases"]) for v in versions] == [(1, []), (3, ["production"])]


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """An endpoint that accepts TCP connections and never answers (a hung server)."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as sock:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("fault", ["wrong secret", "refused", "silent"])
@pytest.mark.parametrize("command", ["registry list", "ingest"])
def test_cli_fails_fast_on_one_line_without_the_secret(
    tmp_path: Path,
    s3_server: S3ServerInfo,
    s3_bucket: str,
    silent_endpoint: str,
    fault: str,
    command: str,
) -> None:
    wrong_secret = "wrong-" + s3_server.secret_key[::-1]
    env = s3_cli_env(s3_server, IMGCLF_S3_TIMEOUT="2")
    endpoint = {"wrong secret": s3_server.endpoint, "refused": _unused_endpoint()}
    env["AWS_ENDPOINT_URL"] = endpoint.get(fault, silent_endpoint)
    if fault == "wrong secret":
        env["AWS_SECRET_ACCESS_KEY"] = wrong_secret
    args = {
        "registry list": ("registry", "list", "--registry", f"s3://{s3_bucket}/registry"),
        "ingest": ("ingest", "--source", f"s3://{s3_bucket}/raw", "--out", "dataset"),
    }[command]

    # how long one request may wait is tested in test_storage_s3, on the retry policy itself;
    # here the subprocess timeout only guards against a hang
    res = sh(tmp_path, "imgclf", *args, check=False, env=env, timeout=300)

    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0 and len(lines) == 1, res.stderr
    assert env["AWS_ENDPOINT_URL"] in lines[0] and f"s3://{s3_bucket}" in lines[0]
    assert "Traceback" not in res.stderr + res.stdout
    for secret in (s3_server.secret_key, wrong_secret):
        assert secret not in res.stderr + res.stdout
    assert not (tmp_path / "dataset").exists()


def test_params_file_named_on_the_command_line_gives_the_s3_settings_from_any_directory(
    tmp_path: Path, s3_server: S3ServerInfo, s3_bucket: str, s3_settings: S3Settings
) -> None:
    # The endpoint is only in other.yaml; the working directory's params.yaml names a dead one
    # and the environment names none, so the command works only if --params reaches S3.
    raw = write_raw_tree(tmp_path / "raw", per_class=4)
    S3Store(s3_bucket, "", s3_settings).upload_tree(raw, "raw")
    other = tmp_path / "conf" / "other.yaml"
    other.parent.mkdir()
    other.write_text(
        yaml.safe_dump(
            {
                "s3": {"endpoint": s3_server.endpoint, "timeout": 5},
                "ingest": {},
                "registry": {"uri": (uri := f"s3://{s3_bucket}/registry")},
            }
        )
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dead_endpoint = _unused_endpoint()
    (elsewhere / "params.yaml").write_text(yaml.safe_dump({"s3": {"endpoint": dead_endpoint}}))
    env = {k: v for k, v in s3_server.env().items() if k not in ENDPOINT_VARS}

    listed = sh(elsewhere, "imgclf", "--params", str(other), "registry", "list", "--json", env=env)
    assert json.loads(listed.stdout) == []
    ingested = sh(
        elsewhere,
        "imgclf",
        "ingest",
        "--params",
        str(other),
        "--source",
        f"s3://{s3_bucket}/raw",
        "--out",
        str(tmp_path / "dataset"),
        env=env,
    )
    assert json.loads(ingested.stdout)["num_images"] == 12

    # without --params the default is the working directory's params.yaml
    dead = sh(elsewhere, "imgclf", "registry", "list", "--registry", uri, check=False, env=env)
    assert dead.returncode != 0 and dead_endpoint in dead.stderr, dead.stderr
