"""ModelRegistry on a real LocalStore: versions, READY semantics, aliases, integrity."""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Any

import pytest

from _model_factory import build_model_dir
from _store_faults import CrashOnReady
from imgclf import contracts
from imgclf.cli import main
from imgclf.contracts import model_dir_checksums
from imgclf.errors import RegistryError
from imgclf.fsutil import read_json, sha256_file
from imgclf.registry import ModelRegistry
from imgclf.storage import LocalStore

NAME = "digits"
METRICS = {"accuracy": 0.97, "macro_f1": 0.96, "passed": True}
LINEAGE = {"dataset_hash": "d" * 64, "git_commit": "abc123", "params": {"epochs": 1}}


class RecordingStore:
    """A real LocalStore that records every mutating call (method, key)."""

    def __init__(self, inner: LocalStore) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.calls: list[tuple[str, str]] = []

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)

    def write_bytes(self, key: str, data: bytes) -> None:
        self.calls.append(("write_bytes", key))
        self.inner.write_bytes(key, data)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        self.calls.append(("create_exclusive", key))
        return self.inner.create_exclusive(key, data)

    def upload_file(self, path: Path, key: str) -> None:
        self.calls.append(("upload_file", key))
        self.inner.upload_file(path, key)

    def upload_tree(self, local_dir: Path, prefix: str, **options: Any) -> list[str]:
        self.calls.append(("upload_tree", prefix))
        return self.inner.upload_tree(local_dir, prefix, **options)

    def delete(self, key_or_prefix: str, recursive: bool = False) -> None:
        self.calls.append(("delete", key_or_prefix))
        self.inner.delete(key_or_prefix, recursive)


@pytest.fixture
def reg(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry.open(str(tmp_path / "registry"))


@pytest.fixture
def models(tmp_path: Path) -> list[Path]:
    """Three model dirs with different weights."""
    return [build_model_dir(tmp_path / f"model{i}", seed=i) for i in range(3)]


def test_publish_list_get_round_trip(reg: ModelRegistry, models: list[Path]) -> None:
    assert reg.models() == []
    assert reg.list_versions(NAME) == []
    v1 = reg.publish(NAME, models[0], METRICS, LINEAGE)
    v2 = reg.publish(NAME, models[1], {**METRICS, "accuracy": 0.99}, LINEAGE)
    assert (v1, v2) == (1, 2)
    assert reg.models() == [NAME]

    listed = reg.list_versions(NAME)
    assert [i.version for i in listed] == [1, 2]
    assert [i.accuracy for i in listed] == [0.97, 0.99]
    assert all(i.dataset_hash == "d" * 64 and i.created_at for i in listed)
    assert listed[0].model_sha256 == sha256_file(models[0] / "model.safetensors")
    assert listed[0].model_sha256 != listed[1].model_sha256

    info = reg.get(NAME, 2)
    assert info.lineage["git_commit"] == "abc123"
    assert info.lineage["registered_by"] and info.lineage["created_at"]
    assert set(info.files) == {"model.json", "model.safetensors", "history.csv"}
    assert info.uri.endswith("models/digits/2/model")
    store = reg.store
    assert store.exists("models/digits/2/model/model.safetensors")
    assert json.loads(store.read_bytes("models/digits/2/metrics.json"))["accuracy"] == 0.99


def test_download_returns_identical_files_and_detects_tampering(
    reg: ModelRegistry, models: list[Path], tmp_path: Path
) -> None:
    reg.publish(NAME, models[0], METRICS, LINEAGE)
    dest = reg.download(NAME, 1, tmp_path / "fetched")
    for name in ("model.safetensors", "model.json", "history.csv"):
        assert (dest / name).read_bytes() == (models[0] / name).read_bytes()

    reg.store.write_bytes("models/digits/1/model/model.safetensors", b"not the weights")
    with pytest.raises(RegistryError, match="sha256"):
        reg.download(NAME, 1, tmp_path / "fetched")
    # The failed download left the earlier good copy in place (atomic_dir).
    assert (dest / "model.json").read_bytes() == (models[0] / "model.json").read_bytes()


def test_hidden_files_are_not_published(reg: ModelRegistry, models: list[Path]) -> None:
    (models[0] / ".model.json.tmp").write_text("half a file")
    reg.publish(NAME, models[0], METRICS, LINEAGE)
    assert ".model.json.tmp" not in reg.get(NAME, 1).files
    assert not reg.store.exists("models/digits/1/model/.model.json.tmp")
    assert reg.store.exists("models/digits/1/model/model.json")


def test_incomplete_version_is_invisible_and_its_number_not_reused(
    tmp_path: Path, models: list[Path]
) -> None:
    root = tmp_path / "registry"
    crashing = ModelRegistry(CrashOnReady(LocalStore(root)))
    with pytest.raises(OSError, match="simulated crash"):
        crashing.publish(NAME, models[0], METRICS, LINEAGE)

    reg = ModelRegistry.open(str(root))
    assert reg.store.exists("models/digits/1/model/model.safetensors")  # files did land
    assert reg.list_versions(NAME) == []
    assert reg.models() == []
    with pytest.raises(RegistryError, match="no complete version 1"):
        reg.get(NAME, 1)
    with pytest.raises(RegistryError, match="no complete version 1"):
        reg.promote(NAME, 1)

    assert reg.publish(NAME, models[1], METRICS, LINEAGE) == 2
    assert [i.version for i in reg.list_versions(NAME)] == [2]


def test_crash_before_ready_leaves_alias_unchanged(tmp_path: Path, models: list[Path]) -> None:
    root = tmp_path / "registry"
    reg = ModelRegistry.open(str(root))
    reg.publish(NAME, models[0], METRICS, LINEAGE)
    reg.promote(NAME, 1)
    alias_key = "models/digits/aliases/production.json"
    before = reg.store.read_bytes(alias_key)

    with pytest.raises(OSError, match="simulated crash"):
        ModelRegistry(CrashOnReady(LocalStore(root))).publish(NAME, models[1], METRICS, LINEAGE)
    assert reg.store.read_bytes(alias_key) == before
    assert reg.alias(NAME) == 1
    with pytest.raises(RegistryError):
        reg.promote(NAME, 2)
    assert reg.store.read_bytes(alias_key) == before


def test_promote_is_a_single_write(tmp_path: Path, models: list[Path]) -> None:
    recording = RecordingStore(LocalStore(tmp_path / "registry"))
    reg = ModelRegistry(recording)
    reg.publish(NAME, models[0], METRICS, LINEAGE)
    reg.publish(NAME, models[1], METRICS, LINEAGE)
    reg.promote(NAME, 1)
    recording.calls.clear()

    reg.promote(NAME, 2)
    assert recording.calls == [("write_bytes", "models/digits/aliases/production.json")]
    recording.calls.clear()
    reg.rollback(NAME)
    assert recording.calls == [("write_bytes", "models/digits/aliases/production.json")]


def test_publish_writes_ready_last(tmp_path: Path, models: list[Path]) -> None:
    recording = RecordingStore(LocalStore(tmp_path / "registry"))
    ModelRegistry(recording).publish(NAME, models[0], METRICS, LINEAGE)
    keys = [key for _, key in recording.calls]
    assert recording.calls[0] == ("create_exclusive", "models/digits/1/CLAIM")
    assert keys[-1] == "models/digits/1/READY"
    assert "models/digits/1/lineage.json" in keys and "models/digits/1/metrics.json" in keys
    # the model dir goes up as one tree (parallel on S3), not file by file
    assert ("upload_tree", "models/digits/1/model") in recording.calls
    assert not [call for call in recording.calls if call[0] == "upload_file"]


def test_publish_reuses_the_callers_checksums(
    reg: ModelRegistry, models: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    checksums = model_dir_checksums(models[0])
    monkeypatch.setattr(contracts, "sha256_file", _no_hashing)
    reg.publish(NAME, models[0], METRICS, LINEAGE, checksums=checksums)
    assert reg.get(NAME, 1).files == checksums
    assert reg.get(NAME, 1).model_sha256 == checksums["model.safetensors"]


def _no_hashing(path: Any) -> str:
    raise AssertionError(f"{path} hashed again")


def test_champion_is_what_the_alias_serves(reg: ModelRegistry, models: list[Path]) -> None:
    assert reg.champion(NAME) is None
    reg.publish(NAME, models[0], METRICS, LINEAGE)
    reg.publish(NAME, models[1], {"accuracy": 0.5}, {})
    reg.promote(NAME, 1)
    champion = reg.champion(NAME)
    assert champion is not None
    assert (champion.version, champion.metrics, champion.dataset_hash) == (1, METRICS, "d" * 64)
    assert champion.model_json == read_json(models[0] / "model.json")

    reg.promote(NAME, 2)
    champion = reg.champion(NAME)
    assert champion is not None and (champion.version, champion.dataset_hash) == (2, None)
    with pytest.raises(FrozenInstanceError):
        champion.version = 1  # type: ignore[misc]


def test_champion_of_an_incomplete_or_malformed_alias_is_an_error(
    reg: ModelRegistry, models: list[Path]
) -> None:
    reg.publish(NAME, models[0], METRICS, LINEAGE)
    reg.promote(NAME, 1)
    reg.store.delete("models/digits/1/READY")
    with pytest.raises(RegistryError, match=r"production\.json points at version 1, which has no"):
        reg.champion(NAME)
    reg.store.write_bytes("models/digits/aliases/production.json", b'{"version": "one"}')
    with pytest.raises(RegistryError, match=r"production\.json: expected \{'version': N\}"):
        reg.champion(NAME)
    reg.store.write_bytes("models/digits/aliases/production.json", b"{not json")
    with pytest.raises(RegistryError, match=r"production\.json: not valid JSON"):
        reg.champion(NAME)


def test_promote_and_rollback_walk_history(reg: ModelRegistry, models: list[Path]) -> None:
    for model in models:
        reg.publish(NAME, model, METRICS, LINEAGE)
    assert reg.alias(NAME) is None
    for version in (1, 2, 3):
        reg.promote(NAME, version)
    doc = reg.alias_doc(NAME)
    assert doc is not None and (doc["version"], doc["previous"]) == (3, 2)
    assert reg.get(NAME, 3).aliases == ("production",)

    assert reg.rollback(NAME)["version"] == 2
    assert reg.rollback(NAME)["version"] == 1
    assert reg.alias(NAME) == 1
    with pytest.raises(RegistryError, match="no earlier complete version"):
        reg.rollback(NAME)
    assert reg.alias(NAME) == 1


def test_rollback_returns_to_the_recorded_previous_not_the_next_lower(
    reg: ModelRegistry, models: list[Path]
) -> None:
    for model in models:
        reg.publish(NAME, model, METRICS, LINEAGE)
    reg.promote(NAME, 1)
    reg.promote(NAME, 3)  # version 2 never served
    doc = reg.rollback(NAME)
    assert (doc["version"], doc["rolled_back_from"]) == (1, 3)


def test_repromoting_current_version_keeps_previous(reg: ModelRegistry, models: list[Path]) -> None:
    reg.publish(NAME, models[0], METRICS, LINEAGE)
    reg.publish(NAME, models[1], METRICS, LINEAGE)
    reg.promote(NAME, 1)
    reg.promote(NAME, 2)
    reg.promote(NAME, 2)
    doc = reg.alias_doc(NAME)
    assert doc is not None and doc["previous"] == 1


def test_aliases_are_independent(reg: ModelRegistry, models: list[Path]) -> None:
    reg.publish(NAME, models[0], METRICS, LINEAGE)
    reg.publish(NAME, models[1], METRICS, LINEAGE)
    reg.promote(NAME, 1, alias="production")
    reg.promote(NAME, 2, alias="staging")
    assert (reg.alias(NAME, "production"), reg.alias(NAME, "staging")) == (1, 2)
    assert [i.aliases for i in reg.list_versions(NAME)] == [("production",), ("staging",)]


def test_rollback_without_alias_fails(reg: ModelRegistry, models: list[Path]) -> None:
    reg.publish(NAME, models[0], METRICS, LINEAGE)
    with pytest.raises(RegistryError, match="no alias 'production'"):
        reg.rollback(NAME)


@pytest.mark.parametrize("bad", ["Digits", "my_model", "-x", "x-", "1abc", "", "a" * 64])
def test_invalid_model_names_are_rejected(reg: ModelRegistry, models: list[Path], bad: str) -> None:
    with pytest.raises(RegistryError, match="invalid model name"):
        reg.publish(bad, models[0], METRICS, LINEAGE)
    assert reg.store.list("models/") == []


def test_invalid_alias_is_rejected(reg: ModelRegistry, models: list[Path]) -> None:
    reg.publish(NAME, models[0], METRICS, LINEAGE)
    with pytest.raises(RegistryError, match="invalid alias"):
        reg.promote(NAME, 1, alias="../prod")


def test_publish_requires_a_non_empty_dir(reg: ModelRegistry, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="not found"):
        reg.publish(NAME, tmp_path / "missing", METRICS, LINEAGE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="empty"):
        reg.publish(NAME, tmp_path / "empty", METRICS, LINEAGE)


# -- `imgclf registry ...` ---------------------------------------------------------------


@pytest.fixture
def params_file(tmp_path: Path, models: list[Path]) -> Path:
    """A params.yaml whose registry section points at a registry with versions 1 and 2."""
    root = tmp_path / "cli-registry"
    reg = ModelRegistry.open(str(root))
    reg.publish(NAME, models[0], METRICS, LINEAGE)
    reg.publish(NAME, models[1], {**METRICS, "accuracy": 0.985}, LINEAGE)
    params = tmp_path / "params.yaml"
    params.write_text(f"registry:\n  uri: {root}\n  model_name: {NAME}\n  alias: production\n")
    return params


def test_cli_list_promote_rollback(params_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = ["--params", str(params_file)]
    assert main(["registry", "promote", NAME, "1", *p]) == 0
    assert "alias 'production' -> version 1" in capsys.readouterr().out
    assert main(["registry", "promote", NAME, "2", *p]) == 0
    assert "version 2 (previous: 1)" in capsys.readouterr().out

    assert main(["registry", "list", *p]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["MODEL", "VERSION", "CREATED", "ACCURACY", "DATASET", "ALIASES"]
    rows = [line.split() for line in lines[1:]]
    assert [(r[0], r[1], r[3], r[-1]) for r in rows] == [
        (NAME, "1", "0.9700", "-"),
        (NAME, "2", "0.9850", "production"),
    ]

    assert main(["registry", "rollback", NAME, *p]) == 0
    assert "alias 'production' -> version 1" in capsys.readouterr().out
    assert main(["registry", "list", "--model", NAME, "--json", *p]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(v["version"], v["aliases"]) for v in listed] == [(1, ["production"]), (2, [])]


def test_cli_registry_flag_overrides_params(
    params_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "other-registry"
    assert main(["registry", "list", "--params", str(params_file), "--registry", str(empty)]) == 0
    assert "no versions of any model" in capsys.readouterr().out


def test_cli_show(params_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["registry", "show", NAME, "2", "--params", str(params_file)]) == 0
    out = capsys.readouterr().out
    assert "0.9850" in out and "abc123" in out and "model.safetensors" in out
    assert main(["registry", "show", NAME, "2", "--json", "--params", str(params_file)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == 2 and shown["lineage"]["git_commit"] == "abc123"


def test_cli_errors_are_one_line(params_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = ["--params", str(params_file)]
    assert main(["registry", "promote", NAME, "7", *p]) == RegistryError.exit_code
    err = capsys.readouterr().err
    assert "no complete version 7" in err and "ready versions: 1, 2" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["registry", "rollback", NAME, "--alias", "staging", *p]) != 0
    assert "no alias 'staging'" in capsys.readouterr().err
