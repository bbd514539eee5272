"""Registry hardening: concurrent publishes, tampered versions, ``verify`` and ``gc``.

Each property is checked through the public interface (``ModelRegistry``, the ``imgclf``
CLI, the evaluate step, the serving source) on a local directory and, where the store
matters, on the session's real S3 server (SeaweedFS, see tests/s3_server.py). Concurrency
is forced with barriers and a start file, never with sleeps or timing assertions.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from _dataset_factory import build_tiny_dataset
from _model_factory import build_model_dir
from _store_faults import CrashOnReady
from imgclf.cli import main
from imgclf.config import RegistryConfig, TrainConfig
from imgclf.contracts import MODEL_FILE, WEIGHTS_FILE
from imgclf.errors import RegistryError
from imgclf.fsutil import sha256_file
from imgclf.registry import ModelRegistry, VersionIntegrityError
from imgclf.registry.retrain import should_retrain

pytestmark = pytest.mark.timeout(300)

NAME = "digits"
WRITERS = 20
LATER = dt.timedelta(hours=25)  # past the default 24 h grace period of gc


@pytest.fixture(scope="module")
def writer_models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One model dir per concurrent writer, each with its own weights."""
    root = tmp_path_factory.mktemp("writers")
    return [build_model_dir(root / f"model{i}", seed=i) for i in range(WRITERS)]


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def registry_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh registry: a local directory, or ``s3://<fresh bucket>/root`` with the
    environment pointing at the session server (so subprocesses reach it too)."""
    if request.param == "local":
        return str(tmp_path / "registry")
    request.getfixturevalue("s3_env")
    return str(request.getfixturevalue("s3_uri"))


def _assert_distinct_and_verified(uri: str, models: list[Path], versions: list[int]) -> None:
    """Every writer got its own number, and each version holds exactly its writer's files."""
    assert len(set(versions)) == len(models), f"shared version numbers: {sorted(versions)}"
    reg = ModelRegistry.open(uri)
    assert reg.ready_versions(NAME) == sorted(versions)
    assert reg.verify() == []
    for writer, version in enumerate(versions):
        info = reg.get(NAME, version)
        assert info.lineage["writer"] == writer
        assert info.model_sha256 == sha256_file(models[writer] / WEIGHTS_FILE)


# -- 1. concurrent publishes --------------------------------------------------------------


def _publish_from_threads(uri: str, models: list[Path]) -> list[int]:
    barrier = threading.Barrier(len(models))

    def publish(writer: int) -> int:
        reg = ModelRegistry.open(uri)  # its own store and connections, like a separate deploy
        barrier.wait()
        return reg.publish(NAME, models[writer], {"accuracy": 0.9}, {"writer": writer})

    with ThreadPoolExecutor(len(models)) as pool:
        return list(pool.map(publish, range(len(models))))


def test_concurrent_publishes_from_threads_get_distinct_versions(
    registry_uri: str, writer_models: list[Path]
) -> None:
    versions = _publish_from_threads(registry_uri, writer_models)
    _assert_distinct_and_verified(registry_uri, writer_models, versions)


_PUBLISHER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from imgclf.registry import ModelRegistry

    uri, model_dir, ready, go, writer = sys.argv[1:]
    reg = ModelRegistry.open(uri)
    Path(ready).touch()
    while not Path(go).exists():
        time.sleep(0.005)
    print(reg.publish("digits", model_dir, {"accuracy": 0.9}, {"writer": int(writer)}))
    """
)


def test_concurrent_publishes_from_processes_get_distinct_versions(
    registry_uri: str, writer_models: list[Path], tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    go = gate / "go"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _PUBLISHER,
                registry_uri,
                *map(str, (model, gate / f"ready{i}", go, i)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, model in enumerate(writer_models)
    ]
    try:
        # start every publish at once: each process is up, imported and connected first
        while len(list(gate.glob("ready*"))) < WRITERS:
            dead = [p for p in procs if p.poll() is not None]
            assert not dead, dead[0].communicate()[1]
            time.sleep(0.01)
        go.touch()
        outputs = [p.communicate() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0] * WRITERS, [err for _, err in outputs if err]
    versions = [int(out.strip()) for out, _ in outputs]
    _assert_distinct_and_verified(registry_uri, writer_models, versions)


@pytest.mark.s3
def test_concurrent_publishes_on_s3_without_conditional_puts(
    s3_env: dict[str, str], s3_uri: str, writer_models: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that ignores ``If-None-Match`` (old MinIO) gets the listing protocol."""
    from imgclf.storage.s3 import S3Store

    monkeypatch.setattr(S3Store, "conditional_writes", lambda self: False)
    versions = _publish_from_threads(s3_uri, writer_models)
    _assert_distinct_and_verified(s3_uri, writer_models, versions)


# -- 2. tampered versions -------------------------------------------------------------------


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _weights(root: Path, version: int) -> Path:
    return root / "models" / NAME / str(version) / "model" / WEIGHTS_FILE


@pytest.fixture
def local_registry(tmp_path: Path, writer_models: list[Path]) -> tuple[ModelRegistry, Path]:
    """Versions 1 (promoted to production) and 2 in a local registry, and a params.yaml
    pointing the CLI at it."""
    root = tmp_path / "registry"
    reg = ModelRegistry.open(str(root))
    for seed in (0, 1):
        reg.publish(NAME, writer_models[seed], {"accuracy": 0.9}, {"writer": seed})
    reg.promote(NAME, 1)
    params = tmp_path / "params.yaml"
    params.write_text(f"registry:\n  uri: {root}\n  model_name: {NAME}\n")
    return reg, params


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("offset", [0, -1], ids=["header-byte", "payload-byte"])
def test_flipped_byte_is_found_by_verify_and_refused_by_every_read(
    local_registry: tuple[ModelRegistry, Path],
    writer_models: list[Path],
    tmp_path: Path,
    offset: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from imgclf.serving.source import from_registry

    reg, params = local_registry
    p = ["--params", str(params)]
    assert main(["registry", "verify", *p]) == 0
    assert "2 complete version(s)" in capsys.readouterr().out

    weights = _weights(Path(reg.uri), 1)
    _flip_byte(weights, offset)

    assert main(["registry", "verify", *p]) == RegistryError.exit_code
    out, err = capsys.readouterr()
    assert out.splitlines()[0].startswith(f"{weights}: sha256 ")
    assert "1 damaged file(s) in 1 of 2 complete version(s)" in _one_line(err)
    assert main(["registry", "verify", NAME, "2", *p]) == 0
    capsys.readouterr()
    assert main(["registry", "show", NAME, "1", *p]) != 0
    out, err = capsys.readouterr()
    assert "DAMAGED" in out and str(weights) in _one_line(err)

    dest = tmp_path / "fetched"
    with pytest.raises(VersionIntegrityError, match="sha256") as refused:
        reg.download(NAME, 1, dest)
    assert str(weights) in str(refused.value) and "\n" not in str(refused.value)
    assert not dest.exists()
    with pytest.raises(RegistryError, match=str(weights)):
        from_registry(reg.uri, NAME, alias="production").close()
    # deploy must publish these weights again rather than reuse the damaged version
    assert reg.find_by_sha256(NAME, sha256_file(writer_models[0] / WEIGHTS_FILE)) is None


def test_files_added_or_removed_after_publishing_are_reported(
    local_registry: tuple[ModelRegistry, Path], tmp_path: Path
) -> None:
    reg, _ = local_registry
    model = Path(reg.uri) / "models" / NAME / "2" / "model"
    (model / "extra.pt").write_bytes(b"not published")
    (model / "history.csv").unlink()
    details = {Path(p.where).name: p.detail for p in reg.verify(NAME)}
    assert details == {
        "extra.pt": "not listed in READY (added after publishing)",
        "history.csv": "missing (listed in READY)",
    }
    with pytest.raises(VersionIntegrityError, match="and 1 more"):
        reg.download(NAME, 2, tmp_path / "fetched")


def test_edited_model_json_is_refused_by_champion_and_the_retrain_check(
    local_registry: tuple[ModelRegistry, Path], tmp_path: Path
) -> None:
    reg, _ = local_registry
    model_json = Path(reg.uri) / "models" / NAME / "1" / "model" / MODEL_FILE
    doc = json.loads(model_json.read_text())
    model_json.write_text(json.dumps({**doc, "classes": ["p0", "p1", "p2"]}))
    with pytest.raises(VersionIntegrityError, match=f"{model_json}: sha256"):
        reg.champion(NAME)
    dataset = build_tiny_dataset(tmp_path / "ds", per_split={"train": 1, "val": 1, "test": 1})
    with pytest.raises(RegistryError, match=str(model_json)):
        should_retrain(dataset, RegistryConfig(uri=reg.uri, model_name=NAME))


@pytest.mark.s3
def test_object_replaced_on_s3_is_found_and_refused(
    s3_env: dict[str, str], s3_uri: str, writer_models: list[Path], tmp_path: Path
) -> None:
    import io

    reg = ModelRegistry.open(s3_uri)
    reg.publish(NAME, writer_models[0], {"accuracy": 0.9}, {"writer": 0})
    store: Any = reg.store
    name = f"{store.prefix}/models/{NAME}/1/model/{WEIGHTS_FILE}"
    data = bytearray((writer_models[0] / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0x01
    # what another tool (mc cp, aws s3 cp) leaves: other bytes, no x-amz-meta-sha256
    store.client.put_object(store.bucket, name, io.BytesIO(bytes(data)), len(data))
    problems = reg.verify()
    assert [p.where for p in problems] == [f"{s3_uri}/models/{NAME}/1/model/{WEIGHTS_FILE}"]
    with pytest.raises(VersionIntegrityError, match=f"{WEIGHTS_FILE}: sha256"):
        reg.download(NAME, 1, tmp_path / "fetched")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset dir, model dir): a real model the evaluate step can load and score."""
    from imgclf.steps import train

    root = tmp_path_factory.mktemp("trained")
    dataset = build_tiny_dataset(root / "ds")
    cfg = TrainConfig(
        model="simple_cnn", image_size=12, min_steps=0, epochs=1, batch_size=8,
        augment="none", patience=0, device="cpu",
    )  # fmt: skip
    train.run(cfg, dataset_dir=dataset, out_dir=root / "model")
    return dataset, root / "model"


@pytest.mark.parametrize("offset", [0, -1], ids=["header-byte", "payload-byte"])
def test_evaluate_refuses_a_tampered_champion_in_one_line(
    trained: tuple[Path, Path], tmp_path: Path, offset: int, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset, model = trained
    root = tmp_path / "registry"
    reg = ModelRegistry.open(str(root))
    reg.promote(NAME, reg.publish(NAME, model, {"accuracy": 0.5}, {}))
    params = tmp_path / "params.yaml"
    params.write_text(
        f"registry:\n  uri: {root}\n  model_name: {NAME}\n"
        "evaluate:\n  min_accuracy: 0.0\n  max_regression: 0.0\n"
    )
    _flip_byte(_weights(root, 1), offset)

    out = tmp_path / "eval"
    args = ["--dataset", str(dataset), "--model", str(model), "--out", str(out)]
    assert main(["evaluate", *args, "--params", str(params)]) == RegistryError.exit_code
    line = _one_line(capsys.readouterr().err)
    assert "cannot look up the champion" in line and str(_weights(root, 1)) in line
    assert not out.exists()


# -- 4. garbage collection ------------------------------------------------------------------


def _publish(reg: ModelRegistry, model: Path, name: str = NAME, *, dies: bool = False) -> None:
    if not dies:
        reg.publish(name, model, {"accuracy": 0.9}, {})
        return
    with pytest.raises(OSError, match="simulated crash before READY"):
        ModelRegistry(CrashOnReady(reg.store)).publish(name, model, {}, {})


def _versions_present(reg: ModelRegistry, name: str = NAME) -> list[int]:
    heads = {k.split("/")[2] for k in reg.store.list(f"models/{name}/")}
    return sorted(int(h) for h in heads if h.isdigit())


def test_gc_removes_old_incomplete_versions_only(
    registry_uri: str, writer_models: list[Path]
) -> None:
    reg = ModelRegistry.open(registry_uri)
    _publish(reg, writer_models[0])  # 1: production
    _publish(reg, writer_models[1], dies=True)  # 2
    _publish(reg, writer_models[2])  # 3
    _publish(reg, writer_models[3], dies=True)  # 4: named by an alias, kept
    _publish(reg, writer_models[4], dies=True)  # 5
    _publish(reg, writer_models[5], "other", dies=True)  # a model with no complete version
    reg.promote(NAME, 1)
    reg.store.write_bytes(f"models/{NAME}/aliases/staging.json", b'{"version": 4}')
    assert _versions_present(reg) == [1, 2, 3, 4, 5]

    assert reg.gc() == []  # within the grace period: could be a publish still uploading
    later = dt.datetime.now(dt.UTC) + LATER
    planned = reg.gc(now=later, dry_run=True)
    assert [(e.name, e.version, e.removed) for e in planned] == [
        (NAME, 2, False),
        (NAME, 5, False),
        ("other", 1, False),
    ]
    assert _versions_present(reg) == [1, 2, 3, 4, 5]

    removed = reg.gc(NAME, now=later)
    assert [(e.version, e.removed) for e in removed] == [(2, True), (5, True)]
    assert all(e.objects >= 4 for e in removed)  # CLAIM, model files, metrics, lineage
    assert _versions_present(reg) == [1, 3, 4]
    assert reg.ready_versions(NAME) == [1, 3] and reg.alias(NAME) == 1
    assert reg.verify() == []
    assert [e.name for e in reg.gc(now=later)] == ["other"]
    assert _versions_present(reg, "other") == []


def test_cli_gc_removes_versions_older_than_the_grace_period(
    tmp_path: Path, writer_models: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "registry"
    reg = ModelRegistry.open(str(root))
    _publish(reg, writer_models[0])
    _publish(reg, writer_models[1], dies=True)  # 2: died two days ago
    _publish(reg, writer_models[2], dies=True)  # 3: died just now (or still uploading)
    two_days_ago = time.time() - 48 * 3600
    for path in (root / "models" / NAME / "2").rglob("*"):
        os.utime(path, (two_days_ago, two_days_ago))
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    p = ["--registry", str(root), "--params", str(params)]

    assert main(["registry", "gc", "--dry-run", *p]) == 0
    out = capsys.readouterr().out
    assert f"would remove {root}/models/{NAME}/2: incomplete" in out
    assert "would remove 1 incomplete version(s) older than 24 h" in out
    assert _versions_present(reg) == [1, 2, 3]

    assert main(["registry", "gc", NAME, *p]) == 0
    assert f"removed {root}/models/{NAME}/2: incomplete" in capsys.readouterr().out
    assert _versions_present(reg) == [1, 3]

    assert main(["registry", "gc", "--older-than", "-1", *p]) != 0
    _one_line(capsys.readouterr().err)
