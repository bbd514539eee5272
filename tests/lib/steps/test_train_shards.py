"""Train, evaluate and the deploy smoke test on a dataset read from its tar shards: local
without images/, resumed after SIGKILL, and streamed from S3 (SeaweedFS).

The train runs go through the command in a subprocess (``tests/_train_runs.py``), as KFP and
DVC run it; the shard layout comes from the real writer (:mod:`imgclf.data.shards`).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

import _train_runs as runs
from _dataset_factory import build_tiny_dataset, without_images
from imgclf.config import DeployConfig, EvaluateConfig, RegistryConfig, ServeConfig, TrainConfig
from imgclf.contracts import SUCCESS_FILE, read_eval_predictions
from imgclf.data.loader import ManifestDataset
from imgclf.data.shard_reader import read_images
from imgclf.data.shards import read_index, write_shards
from imgclf.fsutil import read_json
from imgclf.serving.smoke import run_smoke_test
from imgclf.steps import evaluate, train
from imgclf.storage.s3 import S3Store

pytestmark = pytest.mark.timeout(600)

# A few samples per shard, so that epochs start and end inside shards.
SHARD_BYTES = 30_000


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny learnable dataset with images/ and shards."""
    root = build_tiny_dataset(tmp_path_factory.mktemp("shards-tree") / "ds")
    write_shards(root, shard_bytes=SHARD_BYTES, progress=False)
    assert len(read_index(root)["splits"]["train"]["shards"]) > 2
    return root


@pytest.fixture(scope="module")
def sharded(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same dataset without images/: train.data auto reads the shards."""
    return without_images(tree, tmp_path_factory.mktemp("shards-only") / "ds")


@pytest.fixture(scope="module")
def reference(sharded: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model dir of an uninterrupted run on the local shards."""
    root = tmp_path_factory.mktemp("shards-reference")
    code, stderr = runs.train(root, sharded, root / "checkpoints")
    assert code == 0, stderr
    assert "(from shards)" in stderr and "resuming" not in stderr
    return root / "model"


def test_train_evaluate_and_smoke_test_from_local_shards(
    tree: Path, sharded: Path, tmp_path: Path
) -> None:
    cfg = TrainConfig(**{**runs.SETTINGS, "epochs": 6, "checkpoint_dir": ""})
    meta = train.run(cfg, dataset_dir=sharded, out_dir=tmp_path / "model")
    assert meta["metrics"]["best_val_accuracy"] >= 0.9
    # the statistics of the same images in the same order: equal to the tree's
    assert meta["mean"] == train._normalization(cfg, tree, False)[0]

    result = evaluate.run(
        EvaluateConfig(min_accuracy=0.9),
        RegistryConfig(uri=str(tmp_path / "registry")),
        dataset_dir=sharded,
        model_dir=tmp_path / "model",
        out_dir=tmp_path / "eval",
    )
    assert result["passed"], result["reasons"]
    rows = read_eval_predictions(tmp_path / "eval")
    expected = [p.relative_to(tree).as_posix() for p, _ in ManifestDataset(tree, "test").samples]
    # manifest paths, as from the tree (in the shards' own order, which mixes the classes)
    assert sorted(row["path"] for row in rows) == sorted(expected)

    report = run_smoke_test(
        tmp_path / "model",
        sharded,
        tmp_path / "eval",
        name="digits",
        deploy=DeployConfig(smoke_samples=6, smoke_p95_ms=60_000.0, smoke_timeout_s=300.0),
        serve=ServeConfig(),
        read_images=lambda paths: read_images(sharded, "test", paths),
    )
    assert report["passed"], report["reasons"]
    assert report["samples"] == 6


def test_sigkill_then_rerun_from_shards_matches_an_uninterrupted_run(
    sharded: Path, reference: Path, tmp_path: Path
) -> None:
    checkpoints = tmp_path / "checkpoints"
    code, stderr = runs.start_and_stop(
        tmp_path, sharded, checkpoints, after=1, signum=signal.SIGKILL
    )
    assert code == -signal.SIGKILL, stderr
    code, stderr = runs.train(tmp_path, sharded, checkpoints)
    assert code == 0, stderr
    assert "resuming from epoch" in stderr
    # set_epoch, then the done batches drawn and dropped: the same order as the first attempt
    assert runs.result(tmp_path / "model") == runs.result(reference)


@pytest.mark.s3
def test_training_streamed_from_s3_shards_matches_local_shards_and_the_tree(
    tree: Path,
    sharded: Path,
    reference: Path,
    s3_env: dict[str, str],
    s3_uri: str,
    s3_store: S3Store,
    tmp_path: Path,
) -> None:
    # The whole dataset dir, images/ included: with shards.json there, train streams the
    # shards and downloads only the manifest, dataset.json and shards.json.
    s3_store.publish_tree(tree, "ds", marker=SUCCESS_FILE)
    remote = tmp_path / "s3"
    remote.mkdir()
    code, stderr = runs.train(remote, f"{s3_uri}/ds", "")
    assert code == 0, stderr
    assert "(from shards)" in stderr
    # The order is a function of (seed, epoch) alone: streamed or local, the same run.
    assert runs.result(remote / "model") == runs.result(reference)

    # From the images/ tree the samples come in another order (a sampler's permutation,
    # not shards through a shuffle buffer), so the weights differ; on this easy dataset
    # both runs must still learn it equally well.
    local = tmp_path / "tree"
    local.mkdir()
    code, stderr = runs.train(local, tree, "", data="images")
    assert code == 0, stderr
    assert "(from shards)" not in stderr
    streamed = read_json(remote / "model" / "model.json")["metrics"]["best_val_accuracy"]
    from_tree = read_json(local / "model" / "model.json")["metrics"]["best_val_accuracy"]
    assert streamed >= 0.9 and abs(streamed - from_tree) <= 0.1
