"""Writing a dataset's tar shards (``imgclf.data.shards``) and moving them through S3.

The layout is the contract of docs/CONTRACTS.md ("Shards"): member names and order, the
image members byte-identical to the stored files, ``.cls`` and ``.json`` members, the index,
the size limit, reproducible bytes, integrity checks, and ``ingest.write_images``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from imgclf.config import IngestConfig, SplitRatios
from imgclf.contracts import (
    IMAGES_DIR,
    SHARDS_DIR,
    SHARDS_FILE,
    SPLITS,
    ManifestRow,
    read_dataset_info,
    read_manifest,
    sample_key,
    shard_name,
    shard_order,
    write_dataset,
)
from imgclf.data.shards import (
    archive_bytes,
    member_bytes,
    read_index,
    verify_shards,
    write_shards,
)
from imgclf.errors import ConfigError, DataError
from imgclf.steps import ingest
from imgclf.storage.s3 import S3Store
from imgclf.storage.s3config import MIB, S3Settings
from imgclf.storage.staging import local_input, local_output


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]


def split_members(dataset: Path, split: str) -> list[list[tuple[tarfile.TarInfo, bytes]]]:
    """The members of each of a split's shards, in index order."""
    return [members(dataset / s["name"]) for s in read_index(dataset)["splits"][split]["shards"]]


def usable_rows(dataset: Path, split: str) -> list[dict[str, str]]:
    return [r for r in read_manifest(dataset) if r["split"] == split and not r["error"]]


def shard_rows(dataset: Path, split: str) -> list[dict[str, str]]:
    """The usable rows of ``split`` in the order its shards hold them (the seeded order)."""
    rows = usable_rows(dataset, split)
    return [rows[i] for i in shard_order(len(rows), read_index(dataset)["order_seed"])]


@pytest.fixture
def source(tmp_path: Path, make_images) -> Path:
    """Three classes of PNGs and JPEGs, and one undecodable file (kept out of the shards)."""
    root = tmp_path / "src"
    make_images(root / "ants", 14, size=(20, 16), prefix="ant")
    make_images(root / "bees", 10, size=(18, 12), fmt="jpg", prefix="bee")
    make_images(root / "wasps", 9, size=(16, 16), prefix="wasp")
    (root / "bees" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


@pytest.fixture
def dataset(tmp_path: Path, source: Path) -> Path:
    out = tmp_path / "ds"
    ingest.run(IngestConfig(source=str(source), shard_bytes=16 * 1024), out_dir=out)
    return out


def test_layout_member_order_and_tar_headers(dataset: Path) -> None:
    index = read_index(dataset)
    assert index["format"] == "webdataset" and index["version"] == 2
    assert index["classes"] == read_dataset_info(dataset)["classes"]
    assert set(index["splits"]) == set(SPLITS)
    on_disk = sorted(p.name for p in (dataset / SHARDS_DIR).iterdir())
    listed = sorted(s["name"] for e in index["splits"].values() for s in e["shards"])
    assert [f"{SHARDS_DIR}/{n}" for n in on_disk] == listed
    for split in SPLITS:
        shards = index["splits"][split]["shards"]
        assert [s["name"] for s in shards] == [shard_name(split, i) for i in range(len(shards))]
        names = [m.name for shard in split_members(dataset, split) for m, _ in shard]
        rows = shard_rows(dataset, split)
        expected = []
        for i, row in enumerate(rows):
            ext = Path(row["path"]).suffix.lower().lstrip(".")
            expected += [f"{sample_key(i)}.{ext}", f"{sample_key(i)}.cls", f"{sample_key(i)}.json"]
        assert names == expected
        for shard in split_members(dataset, split):
            for info, _ in shard:
                assert (info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode) == (
                    0, 0, 0, "", "", 0o644,
                )  # fmt: skip
                assert info.isreg()


def test_members_are_the_stored_images_labels_and_paths(dataset: Path) -> None:
    classes = read_index(dataset)["classes"]
    for split in SPLITS:
        flat = [pair for shard in split_members(dataset, split) for pair in shard]
        rows = shard_rows(dataset, split)
        assert len(flat) == 3 * len(rows)
        for i, row in enumerate(rows):
            (_, image), (_, cls), (_, meta) = flat[3 * i : 3 * i + 3]
            assert sha256(image) == row["sha256"] == sha256((dataset / row["path"]).read_bytes())
            assert int(cls.decode("ascii")) == classes.index(row["label"])
            assert json.loads(meta.decode("utf-8")) == {
                "path": row["path"],
                "label": row["label"],
                "sha256": row["sha256"],
            }


def test_errors_are_left_out_and_the_index_counts_and_hashes(dataset: Path) -> None:
    rows = read_manifest(dataset)
    assert sum(1 for r in rows if r["error"]) == 1
    index = read_index(dataset)
    for split in SPLITS:
        entry = index["splits"][split]
        assert entry["samples"] == len(usable_rows(dataset, split)) > 0
        assert sum(s["samples"] for s in entry["shards"]) == entry["samples"]
        for shard in entry["shards"]:
            data = (dataset / shard["name"]).read_bytes()
            assert shard["bytes"] == len(data) and shard["sha256"] == sha256(data)
            assert shard["samples"] == len(members(dataset / shard["name"])) // 3
    verify_shards(dataset)


def test_a_split_without_samples_has_an_empty_entry(tmp_path: Path, source: Path) -> None:
    out = tmp_path / "all-train"
    ingest.run(IngestConfig(source=str(source), split=SplitRatios(1.0, 0.0, 0.0)), out_dir=out)
    index = read_index(out)
    assert index["splits"]["val"] == {"samples": 0, "shards": []}
    assert index["splits"]["test"] == {"samples": 0, "shards": []}
    assert index["splits"]["train"]["samples"] == 33
    assert len(index["splits"]["train"]["shards"]) == 1  # 256 MiB by default


@pytest.mark.parametrize("limit", [1, 20 * 1024, 60 * 1024])
def test_a_shard_starts_when_the_next_sample_would_pass_shard_bytes(
    dataset: Path, limit: int
) -> None:
    index = write_shards(dataset, shard_bytes=limit, progress=False)
    for split in SPLITS:
        shards = index["splits"][split]["shards"]
        contents = []
        for shard, pairs in zip(shards, split_members(dataset, split), strict=True):
            assert shard["bytes"] <= limit or shard["samples"] == 1
            assert shard["bytes"] == archive_bytes(sum(member_bytes(m.size) for m, _ in pairs))
            contents.append([member_bytes(m.size) for m, _ in pairs])
        for current, following in itertools.pairwise(contents):
            first_sample = sum(following[:3])
            assert archive_bytes(sum(current) + first_sample) > limit  # it did not fit
    if limit == 1:
        assert all(s["samples"] == 1 for e in index["splits"].values() for s in e["shards"])
    verify_shards(dataset)


def test_rewriting_gives_identical_bytes_and_removes_stale_shards(
    tmp_path: Path, source: Path, dataset: Path
) -> None:
    again = tmp_path / "again"
    ingest.run(IngestConfig(source=str(source), shard_bytes=16 * 1024), out_dir=again)
    first, second = read_index(dataset), read_index(again)
    assert first == second and len(first["splits"]["train"]["shards"]) > 1
    assert (dataset / SHARDS_FILE).read_bytes() == (again / SHARDS_FILE).read_bytes()

    fewer = write_shards(again, shard_bytes=256 * MIB, progress=False)
    assert all(len(e["shards"]) == 1 for e in fewer["splits"].values())
    assert sorted(p.name for p in (again / SHARDS_DIR).iterdir()) == [
        f"{s}-000000.tar" for s in sorted(SPLITS)
    ]
    seed = first["order_seed"]
    assert write_shards(again, shard_bytes=16 * 1024, progress=False, seed=seed) == first


def test_verify_shards_names_a_shard_with_a_flipped_byte(dataset: Path) -> None:
    shard = dataset / read_index(dataset)["splits"]["train"]["shards"][1]["name"]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=shard.name):
        verify_shards(dataset)
    shard.unlink()
    with pytest.raises(DataError, match=f"{shard.name}.*missing"):
        verify_shards(dataset)


def test_read_index_refuses_another_format_naming_the_file(dataset: Path) -> None:
    index = json.loads((dataset / SHARDS_FILE).read_text())
    (dataset / SHARDS_FILE).write_text(json.dumps({**index, "version": 99}))
    with pytest.raises(DataError, match=r"shards\.json.*version 99"):
        read_index(dataset)
    (dataset / SHARDS_FILE).unlink()
    with pytest.raises(DataError, match=r"shards\.json: not found"):
        read_index(dataset)


def test_write_shards_refuses_an_image_that_changed_since_ingest(dataset: Path) -> None:
    row = usable_rows(dataset, "val")[0]
    (dataset / row["path"]).write_bytes(b"other bytes")
    with pytest.raises(DataError, match=row["path"]):
        write_shards(dataset, shard_bytes=MIB, progress=False)


def test_write_images_false_keeps_manifest_and_shards_only(
    tmp_path: Path, source: Path, dataset: Path
) -> None:
    out = tmp_path / "no-images"
    summary = ingest.run(
        IngestConfig(source=str(source), shard_bytes=16 * 1024, write_images=False), out_dir=out
    )
    assert not (out / IMAGES_DIR).exists()
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "dataset.json",
        "manifest.csv",
        SHARDS_DIR,
        SHARDS_FILE,
    ]
    assert summary["hash"] == read_dataset_info(dataset)["hash"]  # the hash is the manifest's
    assert (out / "manifest.csv").read_bytes() == (dataset / "manifest.csv").read_bytes()
    assert read_index(out) == read_index(dataset)
    verify_shards(out)
    paths = [
        json.loads(data)["path"]
        for shard in split_members(out, "train")
        for info, data in shard
        if info.name.endswith(".json")
    ]
    assert paths == [r["path"] for r in shard_rows(out, "train")]
    assert all(p.startswith(f"{IMAGES_DIR}/train/") for p in paths)


@pytest.mark.parametrize(("images_max", "kept"), [(34, True), (33, False)])
def test_write_images_auto_drops_the_tree_above_images_max(
    tmp_path: Path, source: Path, images_max: int, kept: bool
) -> None:
    out = tmp_path / "auto"
    summary = ingest.run(IngestConfig(source=str(source), images_max=images_max), out_dir=out)
    assert summary["num_images"] == 34
    assert (out / IMAGES_DIR).is_dir() is kept
    assert (out / SHARDS_FILE).is_file()


def test_images_are_kept_without_shards_and_cannot_be_dropped_then(
    tmp_path: Path, source: Path
) -> None:
    out = tmp_path / "plain"
    ingest.run(IngestConfig(source=str(source), shards=False, images_max=1), out_dir=out)
    assert (out / IMAGES_DIR).is_dir() and not (out / SHARDS_DIR).exists()
    with pytest.raises(ConfigError, match=r"write_images=false needs ingest\.shards"):
        IngestConfig(shards=False, write_images="false")
    with pytest.raises(ConfigError, match=r"ingest\.write_images='sometimes'"):
        IngestConfig(write_images="sometimes")


# --- through S3 ---------------------------------------------------------------------------


def random_dataset(root: Path, per_split: dict[str, int], image_bytes: int) -> Path:
    """A dataset dir of incompressible "JPEGs" (shards copy bytes; nothing decodes them)."""
    rows = []
    for split, n in per_split.items():
        for i in range(n):
            label = f"c{i % 2}"
            rel = f"{IMAGES_DIR}/{split}/{label}/img{i:03d}.jpg"
            data = os.urandom(image_bytes)
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
            rows.append(ManifestRow(rel, label, split, 8, 8, "RGB", len(data), sha256(data)))
    rows.sort(key=lambda r: r.path)
    write_dataset(root, rows, source="random", image_format="keep", seed=0, split={})
    return root


@pytest.mark.s3
def test_shards_go_up_and_down_in_parallel_parts_and_verify(
    tmp_path: Path, s3_store: S3Store, s3_settings: S3Settings
) -> None:
    dataset = random_dataset(tmp_path / "ds", {"train": 40, "val": 4, "test": 0}, 300_000)
    write_shards(dataset, shard_bytes=64 * MIB, progress=False)
    shutil.rmtree(dataset / IMAGES_DIR)
    train = dataset / shard_name("train", 0)
    assert train.stat().st_size > 2 * 5 * MIB  # three parts of 5 MiB
    settings = dataclasses.replace(s3_settings, part_size=5 * MIB, workers=4)
    store = S3Store(s3_store.bucket, s3_store.prefix, settings)
    parts_sent: list[int] = []
    upload_part = store.client._upload_part

    def counting(*args: object) -> str:
        parts_sent.append(int(args[5]))  # type: ignore[call-overload]
        return upload_part(*args)  # type: ignore[arg-type]

    store.client._upload_part = counting  # type: ignore[method-assign]
    store.upload_file(train, "one/train.tar")
    assert sorted(parts_sent) == [1, 2, 3]
    etag = store.client.stat_object(store.bucket, f"{store.prefix}/one/train.tar").etag
    assert etag.endswith("-3")  # one multipart object of three parts

    keys = store.upload_tree(dataset, "ds")
    assert sorted(keys) == sorted(
        f"ds/{p.relative_to(dataset).as_posix()}" for p in dataset.rglob("*") if p.is_file()
    )
    down = tmp_path / "down"
    store.download_tree("ds", down)
    verify_shards(down)
    single = tmp_path / "single.tar"
    store.download_file("one/train.tar", single)  # ranged GETs, 4 at a time
    assert single.read_bytes() == train.read_bytes()


@pytest.mark.s3
def test_a_dataset_with_shards_moves_through_step_staging(
    tmp_path: Path, source: Path, s3_env: dict[str, str], s3_uri: str, monkeypatch
) -> None:
    monkeypatch.setenv("IMGCLF_S3_PART_SIZE", str(5 * MIB))
    uri = f"{s3_uri}/dataset"
    with local_output(uri) as out:
        ingest.run(IngestConfig(source=str(source), write_images=False), out_dir=out)
    with local_input(uri) as local:
        assert not (local / IMAGES_DIR).exists()
        verify_shards(local)
        assert read_index(local)["splits"]["train"]["samples"] == len(usable_rows(local, "train"))
        with tarfile.open(local / shard_name("val", 0)) as tar:
            first = tar.getmembers()[0]
            assert first.name.startswith(sample_key(0))
            assert io.BytesIO(tar.extractfile(first).read()).read(2) in (b"\x89P", b"\xff\xd8")  # type: ignore[union-attr]


def test_shards_mix_the_classes_the_manifest_groups(dataset: Path) -> None:
    """Manifest order is grouped by class; the seeded shard order interleaves them."""
    labels = [row["label"] for row in shard_rows(dataset, "train")]
    assert labels != sorted(labels)
    assert sorted(labels) == sorted(r["label"] for r in usable_rows(dataset, "train"))
