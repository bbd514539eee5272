"""ShardDataset: a split's tar shards read in a (seed, epoch) order, split over ranks and
DataLoader workers, decoded exactly as ManifestDataset decodes the images/ tree."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from _dataset_factory import build_tiny_dataset, without_images
from imgclf.contracts import SHARDS_FILE, shard_order
from imgclf.data.loader import ManifestDataset, make_loader
from imgclf.data.shard_reader import ShardDataset, read_images
from imgclf.data.shard_source import use_shards
from imgclf.data.shards import read_index, write_shards
from imgclf.errors import DataError
from imgclf.training.presets import ClassificationPresetEval, ClassificationPresetTrain

# Small shards: a few samples each, so that ranges start and end inside shards.
SHARD_BYTES = 16_000


def _pixels(image: Any) -> bytes:
    """The sample's identity: its decoded pixels (every tiny-dataset image differs)."""
    return image.tobytes()


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny dataset with images/ and shards (36 train images: 12 per class)."""
    root = build_tiny_dataset(
        tmp_path_factory.mktemp("shard-reader") / "ds", per_split={"train": 12, "val": 5, "test": 4}
    )
    write_shards(root, shard_bytes=SHARD_BYTES, progress=False)
    return root


@pytest.fixture(scope="module")
def sharded(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same dataset without images/: shards, manifest and dataset.json only."""
    return without_images(tree, tmp_path_factory.mktemp("shards-only") / "ds")


def _identities(tree: Path, split: str) -> dict[bytes, str]:
    """pixels -> manifest path of every image of ``split`` (read from the tree)."""
    dataset = ManifestDataset(tree, split, _pixels)
    found = {
        dataset[i][0]: path.relative_to(tree).as_posix()
        for i, (path, _) in enumerate(dataset.samples)
    }
    assert len(found) == len(dataset)
    return found


def _epoch_paths(
    root: Path, ids: dict[bytes, str], *, rank: int, world: int, workers: int, epoch: int, **kw: Any
) -> list[str]:
    dataset = ShardDataset(
        root, "train", _pixels, shuffle=True, seed=7, rank=rank, world_size=world, **kw
    )
    loader = make_loader(
        dataset, batch_size=kw.get("batch_size", 1), shuffle=False, num_workers=workers
    )
    loader.collate_fn = _as_list
    dataset.set_epoch(epoch)
    batches = list(loader)
    assert len(batches) == len(loader)  # exact epoch length, workers included
    return [ids[pixels] for batch in batches for pixels, _ in batch]


def test_shards_hold_several_samples_each(sharded: Path) -> None:
    shards = read_index(sharded)["splits"]["train"]["shards"]
    assert len(shards) > 4 and max(s["samples"] for s in shards) > 1


def test_every_sample_once_per_epoch_across_ranks_and_workers(tree: Path, sharded: Path) -> None:
    ids = _identities(tree, "train")
    per_rank = {
        rank: _epoch_paths(sharded, ids, rank=rank, world=2, workers=2, epoch=3, batch_size=4)
        for rank in (0, 1)
    }
    assert len(per_rank[0]) == len(per_rank[1]) == len(ids) // 2
    everything = per_rank[0] + per_rank[1]
    assert sorted(everything) == sorted(ids.values())  # each exactly once


def test_ranks_get_equal_counts_when_the_split_does_not_divide(tree: Path, sharded: Path) -> None:
    ids = _identities(tree, "train")
    world = 5  # 36 = 5 * 7 + 1: one sample of the epoch's sequence is left out
    seen = [
        _epoch_paths(sharded, ids, rank=r, world=world, workers=2, epoch=1, batch_size=3)
        for r in range(world)
    ]
    assert {len(paths) for paths in seen} == {len(ids) // world}
    flat = [p for paths in seen for p in paths]
    assert len(set(flat)) == len(flat) == world * (len(ids) // world)


def test_drop_last_batches_match_the_loader_length(sharded: Path) -> None:
    dataset = ShardDataset(sharded, "train", _pixels, shuffle=True, batch_size=5)
    loader = make_loader(dataset, batch_size=5, shuffle=False, num_workers=2, drop_last=True)
    loader.collate_fn = _as_list
    batches = list(loader)
    assert len(batches) == len(loader) == 36 // 5
    assert all(len(b) == 5 for b in batches)


def test_order_is_a_function_of_seed_and_epoch(tree: Path, sharded: Path) -> None:
    ids = _identities(tree, "train")
    first = _epoch_paths(sharded, ids, rank=0, world=1, workers=0, epoch=2)
    again = _epoch_paths(sharded, ids, rank=0, world=1, workers=0, epoch=2)
    other = _epoch_paths(sharded, ids, rank=0, world=1, workers=0, epoch=3)
    assert first == again
    assert other != first and sorted(other) == sorted(first)
    # with workers, persistent ones included, the order is fixed too
    with_workers = [
        _epoch_paths(sharded, ids, rank=0, world=1, workers=2, epoch=2, batch_size=4)
        for _ in range(2)
    ]
    assert with_workers[0] == with_workers[1]


def test_labels_and_paths_follow_the_manifest(tree: Path, sharded: Path) -> None:
    ids = _identities(tree, "val")
    reference = ManifestDataset(tree, "val")
    expected = {path.relative_to(tree).as_posix(): label for path, label in reference.samples}
    dataset = ShardDataset(sharded, "val", _pixels)
    assert dataset.classes == reference.classes and dataset.class_to_idx == reference.class_to_idx
    # The shards hold the split in the seeded shard order, which mixes the classes.
    assert sorted(dataset.paths) == sorted(expected) and dataset.paths != list(expected)
    assert dict(zip(dataset.paths, dataset.targets, strict=True)) == expected
    assert [(ids[pixels], label) for pixels, label in dataset] == [
        (path, expected[path]) for path in dataset.paths
    ]


def test_transforms_equal_manifest_datasets(tree: Path, sharded: Path) -> None:
    evaluation = ClassificationPresetEval(size=16, mean=(0.2, 0.3, 0.4), std=(0.5, 0.6, 0.7))
    manifest = ManifestDataset(tree, "test", evaluation)
    shards = ShardDataset(sharded, "test", evaluation)
    items = list(shards)
    assert len(items) == len(manifest)
    order = shard_order(len(manifest), read_index(sharded)["order_seed"])
    for i, (tensor, label) in enumerate(items):
        expected, expected_label = manifest[order[i]]
        assert label == expected_label and torch.equal(tensor, expected)
    # the training transform too, given the same random state
    training = ClassificationPresetTrain(size=16, augment="light")
    torch.manual_seed(5)
    from_tree = ManifestDataset(tree, "test", training)[order[0]][0]
    torch.manual_seed(5)
    from_shards = next(iter(ShardDataset(sharded, "test", training)))[0]
    assert torch.equal(from_tree, from_shards)


def test_read_images_returns_the_stored_bytes(tree: Path, sharded: Path) -> None:
    paths = ManifestDataset(tree, "test").samples
    wanted = [p.relative_to(tree).as_posix() for p, _ in paths[1::3]]
    found = read_images(sharded, "test", [*wanted, "images/test/nope.png"])
    assert found == {path: (tree / path).read_bytes() for path in wanted}


def test_auto_reads_images_when_present_else_shards(tree: Path, sharded: Path) -> None:
    assert not use_shards(tree) and use_shards(tree, "shards")
    assert use_shards(sharded) and use_shards(sharded, "shards")
    with pytest.raises(DataError, match="no images/"):
        use_shards(sharded, "images")
    with pytest.raises(DataError, match=SHARDS_FILE):
        use_shards(tree / "missing", "shards")
    with pytest.raises(DataError, match="unknown"):
        use_shards(tree, "tfrecord")


def test_a_corrupt_shard_is_an_error(sharded: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    shutil.copytree(sharded, root)
    shard = root / read_index(root)["splits"]["val"]["shards"][0]["name"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # in the end-of-archive padding: every sample still reads
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256"):
        list(ShardDataset(root, "val"))


def test_stale_shards_are_refused(sharded: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    shutil.copytree(sharded, root)
    manifest = root / "manifest.csv"
    lines = manifest.read_text(encoding="utf-8").splitlines(keepends=True)
    first_test = next(i for i, line in enumerate(lines) if ",test," in line)
    del lines[first_test]  # one test image fewer in the manifest than in the shards
    manifest.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(DataError, match="rerun ingest"):
        ShardDataset(root, "test")
