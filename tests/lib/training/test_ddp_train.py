"""``imgclf train --nproc 2``: DistributedDataParallel on CPU (gloo), as torchrun runs it.

Two ranks train on their halves of every epoch; rank 0 alone writes the model dir and the
checkpoints; SIGTERM stops both ranks at the same batch with one checkpoint, and a rerun
resumes to the same weights as an uninterrupted two-process run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import _train_runs as runs
from _dataset_factory import build_tiny_dataset
from imgclf.errors import Preempted
from imgclf.training import distributed

pytestmark = pytest.mark.timeout(900)

NPROC = ("--nproc", "2")


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_dataset(tmp_path_factory.mktemp("ddp-data") / "ds")


@pytest.fixture(scope="module")
def single(dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model dir of a one-process run with the same settings."""
    root = tmp_path_factory.mktemp("single")
    code, stderr = runs.train(root, dataset_dir, root / "checkpoints", epochs=3)
    assert code == 0, stderr
    return root / "model"


@pytest.fixture(scope="module")
def uninterrupted(dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-process run from start to end; its stderr is kept beside the model dir."""
    root = tmp_path_factory.mktemp("ddp")
    code, stderr = runs.train(root, dataset_dir, root / "checkpoints", NPROC)
    (root / "stderr.txt").write_text(stderr, encoding="utf-8")
    assert code == 0, stderr
    return root / "model"


def test_two_processes_train_and_only_rank_0_writes(
    uninterrupted: Path, single: Path, dataset_dir: Path
) -> None:
    stderr = (uninterrupted.parent / "stderr.txt").read_text(encoding="utf-8")
    assert "starting 2 training processes" in stderr
    assert "rank 0/2 joined the gloo process group" in stderr
    # One writer: the model dir is written once, and only rank 0 logs progress.
    assert stderr.count("model dir written to") == 1
    assert "[rank 1] INFO" not in stderr
    # The same output layout as one process.
    assert sorted(p.name for p in uninterrupted.iterdir()) == sorted(
        p.name for p in single.iterdir()
    )
    meta = json.loads((uninterrupted / "model.json").read_text(encoding="utf-8"))
    assert meta["world_size"] == 2
    # The metrics are the whole job's: accuracies are counts of the 18 val images.
    history = (uninterrupted / "history.csv").read_text(encoding="utf-8").splitlines()
    assert len(history) == 1 + runs.SETTINGS["epochs"]
    for row in history[1:]:
        val_acc = float(row.split(",")[4])
        assert abs(val_acc * 18 - round(val_acc * 18)) < 1e-4, row
    # Checkpoints were removed by the one process that wrote them.
    assert not any((uninterrupted.parent / "checkpoints").glob("*.pt"))


def test_sigterm_stops_both_ranks_with_one_checkpoint_and_a_rerun_resumes(
    uninterrupted: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    checkpoints = tmp_path / "checkpoints"
    code, stderr = runs.start_and_stop(
        tmp_path, dataset_dir, checkpoints, after=2, signum=signal.SIGTERM, extra=NPROC
    )
    assert code == Preempted.exit_code, stderr
    assert "the 2 training processes stopped after writing a checkpoint" in stderr
    found = runs.sidecars(checkpoints)
    assert found and all(meta["run_key"] == found[0]["run_key"] for meta in found)
    assert not (tmp_path / "model" / "model.json").exists()

    code, stderr = runs.train(tmp_path, dataset_dir, checkpoints, NPROC)
    assert code == 0, stderr
    assert "resuming from epoch" in stderr
    assert runs.result(tmp_path / "model") == runs.result(uninterrupted)


def test_a_checkpoint_of_two_processes_is_not_resumed_by_one(
    dataset_dir: Path, tmp_path: Path
) -> None:
    """The process count decides every rank's shard, so it is part of the run's identity."""
    checkpoints = tmp_path / "checkpoints"
    code, stderr = runs.start_and_stop(
        tmp_path, dataset_dir, checkpoints, after=1, signum=signal.SIGTERM, extra=NPROC
    )
    assert code == Preempted.exit_code, stderr
    code, stderr = runs.train(tmp_path, dataset_dir, checkpoints, epochs=1)
    assert code == 0, stderr
    assert "resuming" not in stderr and "belong to another run" in stderr


def test_nproc_out_of_range_is_refused_before_training(dataset_dir: Path, tmp_path: Path) -> None:
    code, stderr = runs.train(tmp_path, dataset_dir, tmp_path / "ck", ("--nproc", "0"))
    assert code != 0 and "--nproc 0" in stderr
    assert not (tmp_path / "model").exists()


def test_shard_sampler_splits_without_padding() -> None:
    data = list(range(7))
    shards = [list(distributed.ShardSampler(data, rank, 3)) for rank in range(3)]
    assert sorted(i for shard in shards for i in shard) == data
    assert [len(s) for s in shards] == [3, 2, 2]


def test_context_from_torchrun_variables() -> None:
    ctx = distributed.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (ctx.rank, ctx.local_rank, ctx.world_size, ctx.enabled) == (3, 1, 4, True)
    assert not distributed.from_env({}).enabled
    # A PyTorchJob without torchrun sets RANK but no LOCAL_RANK: one process per node.
    assert distributed.from_env({"WORLD_SIZE": "2", "RANK": "1"}).local_rank == 0


@pytest.mark.s3
def test_under_torchrun_only_rank_0_publishes_the_model_to_s3(
    dataset_dir: Path, tmp_path: Path, s3_env: dict[str, str], s3_uri: str, s3_store: Any
) -> None:
    """What each node of a TrainJob or PyTorchJob runs: ``imgclf train`` under torchrun with
    an ``s3://`` output. The other ranks must not publish (an empty model over rank 0's)."""
    params = runs.params_file(tmp_path, epochs=2)
    train = runs.command(params, dataset_dir, f"{s3_uri}/model", "")
    assert train[1:3] == ["-m", "imgclf"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command = [*torchrun, "--nproc-per-node", "2", *train[1:]]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=runs.HANG_GUARD_S, check=False
    )
    assert done.returncode == 0, done.stderr
    keys = set(s3_store.list("model"))
    assert {"model/model.safetensors", "model/model.json", "model/_SUCCESS"} <= keys
    meta = json.loads(s3_store.read_bytes("model/model.json"))
    assert meta["world_size"] == 2
