"""The Store contract, checked on LocalStore here and on S3Store in test_storage_s3.py.

:class:`StoreContract` holds the cases every backend must pass (round trips of nested and
unicode trees, prefix listing, exists/delete, missing keys, publish markers); a backend's
test class inherits it and provides a ``store`` fixture, so both stores are held to the
same behaviour that steps and the registry rely on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from imgclf.errors import StorageError
from imgclf.fsutil import sha256_file
from imgclf.storage import LocalStore, Store, is_published, publish_tree

# nested dirs, spaces, accents, CJK, an empty file and a binary file
TREE = {
    "a.txt": b"alpha\n",
    "empty.dat": b"",
    "nested/deep/er/b.bin": bytes(range(256)) * 40,
    "ünïcødé/naïve café.txt": "crème brûlée\n".encode(),
    "日本語/ファイル.json": json.dumps({"猫": 1}, ensure_ascii=False).encode(),
    "space dir/with space.txt": b"spaces\n",
}


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    """Write ``files`` (relative POSIX path -> bytes) under ``root``."""
    for rel, data in files.items():
        path = root.joinpath(*rel.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` as relative POSIX path -> bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


class StoreContract:
    """Cases every :class:`Store` backend passes; subclasses provide the ``store`` fixture."""

    def test_is_a_store(self, store: Store) -> None:
        assert isinstance(store, Store)

    def test_tree_round_trip_nested_and_unicode(self, store: Store, tmp_path: Path) -> None:
        src = write_tree(tmp_path / "src", TREE)
        keys = store.upload_tree(src, "data/v1")
        assert keys == sorted(f"data/v1/{rel}" for rel in TREE)
        assert store.list("data/v1") == keys

        dst = tmp_path / "dst"
        paths = store.download_tree("data/v1", dst)
        assert sorted(p.relative_to(dst).as_posix() for p in paths) == sorted(TREE)
        assert read_tree(dst) == TREE
        assert not [p for p in dst.rglob(".*")], "temp files left behind"

    def test_download_tree_of_whole_store(self, store: Store, tmp_path: Path) -> None:
        store.upload_tree(write_tree(tmp_path / "src", TREE), "")
        dst = tmp_path / "dst"
        store.download_tree("", dst)
        assert read_tree(dst) == TREE

    def test_write_read_overwrite(self, store: Store) -> None:
        store.write_bytes("x/y.json", b'{"v": 1}')
        assert store.read_bytes("x/y.json") == b'{"v": 1}'
        store.write_bytes("x/y.json", b'{"v": 2}')
        assert store.read_bytes("x/y.json") == b'{"v": 2}'
        assert store.list("x") == ["x/y.json"]

    def test_single_file_up_and_down(self, store: Store, tmp_path: Path) -> None:
        src = tmp_path / "model.safetensors"
        src.write_bytes(os.urandom(70_000))
        store.upload_file(src, "models/m/1/model.safetensors")
        dst = tmp_path / "new" / "dir" / "copy.bin"
        store.download_file("models/m/1/model.safetensors", dst)
        assert dst.read_bytes() == src.read_bytes()
        assert sorted(p.name for p in dst.parent.iterdir()) == ["copy.bin"]

    def test_list_prefixes(self, store: Store) -> None:
        for key in ("p/a.txt", "p/sub/b.txt", "p/sub/deeper/c.txt", "pq/d.txt", "top.txt"):
            store.write_bytes(key, key.encode())
        assert store.list("p") == ["p/a.txt", "p/sub/b.txt", "p/sub/deeper/c.txt"]
        assert store.list("p/") == store.list("p")
        assert store.list("p", recursive=False) == ["p/a.txt", "p/sub/"]
        assert store.list("p/sub", recursive=False) == ["p/sub/b.txt", "p/sub/deeper/"]
        assert store.list("", recursive=False) == ["p/", "pq/", "top.txt"]
        assert len(store.list()) == 5
        assert store.list("missing") == []
        assert store.list("top.txt") == []  # a file is not a directory

    def test_exists_and_delete(self, store: Store) -> None:
        store.write_bytes("d/one.txt", b"1")
        store.write_bytes("d/sub/two.txt", b"2")
        store.write_bytes("dd/keep.txt", b"k")
        assert store.exists("d/one.txt")
        assert not store.exists("d")  # a directory is not an object
        assert not store.exists("d/none.txt")

        store.delete("d/one.txt")
        assert not store.exists("d/one.txt")
        store.delete("d/one.txt")  # deleting what is gone is not an error

        store.delete("d", recursive=True)
        assert store.list("d") == []
        assert store.list("dd") == ["dd/keep.txt"]

    def test_missing_key_is_a_storage_error_naming_it(self, store: Store, tmp_path: Path) -> None:
        with pytest.raises(StorageError, match="nothing-here"):
            store.read_bytes("nothing-here.txt")
        with pytest.raises(StorageError, match="nothing-here"):
            store.download_file("nothing-here.txt", tmp_path / "x")
        assert not (tmp_path / "x").exists()

    def test_keys_cannot_leave_the_store(self, store: Store) -> None:
        with pytest.raises(StorageError, match="leaves the store"):
            store.write_bytes("../outside.txt", b"x")

    def test_publish_tree_writes_marker_last_with_manifest(
        self, store: Store, tmp_path: Path
    ) -> None:
        src = write_tree(tmp_path / "model", {"model.json": b"{}", "w/weights.bin": b"w" * 999})
        assert not is_published(store, "models/m/1")
        keys = publish_tree(store, src, "models/m/1")
        assert keys == ["models/m/1/model.json", "models/m/1/w/weights.bin"]
        assert is_published(store, "models/m/1")
        manifest = json.loads(store.read_bytes("models/m/1/READY"))
        assert manifest["files"] == {
            "model.json": sha256_file(src / "model.json"),
            "w/weights.bin": sha256_file(src / "w" / "weights.bin"),
        }

    def test_publish_refuses_bad_input_before_touching_store(
        self, store: Store, tmp_path: Path
    ) -> None:
        src = write_tree(tmp_path / "v", {"a.txt": b"a"})
        publish_tree(store, src, "out", marker="_DONE")
        assert is_published(store, "out", marker="_DONE")
        (src / "_DONE").write_bytes(b"reserved name")  # makes the next publish fail
        with pytest.raises(StorageError, match="reserved"):
            publish_tree(store, src, "out", marker="_DONE")
        with pytest.raises(StorageError, match="not a directory"):
            publish_tree(store, tmp_path / "missing", "out", marker="_DONE")
        assert is_published(store, "out", marker="_DONE")  # refused before touching the store


class TestLocalStore(StoreContract):
    """The contract on the local filesystem."""

    @pytest.fixture
    def store(self, tmp_path: Path) -> LocalStore:
        return LocalStore(tmp_path / "store")

    def test_writes_leave_no_temp_files(self, store: LocalStore, tmp_path: Path) -> None:
        src = write_tree(tmp_path / "src", TREE)
        store.upload_tree(src, "t")
        store.write_bytes("t/x.bin", b"x")
        assert not [p for p in store.root.rglob("*") if p.name.startswith(".")]
