"""A KFP retry of the train task resumes from its first attempt's checkpoints.

kfp.local has no retries, so the retry is played as KFP plays it: the component's Python
function runs in a process that is killed (a preempted node) once it has checkpointed, then
runs again with the same run id and a fresh output artifact, as the retried pod would.
Checkpoints live under ``checkpoint_root/<run id>``, the one thing the two attempts share.
"""

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from kfp import dsl

from _dataset_factory import build_tiny_dataset
from components.train.component import train
from imgclf.training import checkpoint

pytestmark = pytest.mark.timeout(900)

HANG_GUARD_S = 300
RUN_ID = "0b7a3c1e-retry"
ARGS: dict[str, Any] = {
    "model": "simple_cnn",
    "pretrained": "none",
    "freeze_backbone": False,
    "freeze_epochs": 1,
    "train_image_size": 12,
    "augment": "light",
    "epochs": 30,
    "min_steps": 0,
    "batch_size": 8,
    "optimizer": "adamw",
    "lr": "0.01",
    "backbone_lr": "0.01",
    "weight_decay": 0.0,
    "scheduler": "onecycle",
    "patience": 0,
    "train_seed": 5,
    "device": "cpu",
    "num_workers": "0",
    "threads": 1,
    "max_steps_per_epoch": 0,
    "checkpoint_every_steps": 2,
    "checkpoint_min_interval_s": 0.0,
    "keep_checkpoints": 2,
    "run_id": RUN_ID,
    "nproc_per_node": 1,
}
# The first attempt, in its own process: the component function with KFP artifact objects.
ATTEMPT = """
import json, logging, sys
from kfp import dsl
from components.train.component import train
logging.basicConfig(level=logging.INFO)
dataset, out, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
train.python_func(
    dataset=dsl.Dataset(name="dataset", uri=dataset, metadata={}),
    trained_model=dsl.Model(name="trained_model", uri=out + "/trained_model", metadata={}),
    metrics=dsl.Metrics(name="metrics", uri=out + "/metrics", metadata={}),
    training_curves=dsl.HTML(name="training_curves", uri=out + "/curves", metadata={}),
    **args,
)
"""


def _artifacts(root: Path) -> tuple[Any, Any]:
    root.mkdir(parents=True)
    return (
        dsl.Model(name="trained_model", uri=str(root / "trained_model"), metadata={}),
        dsl.Metrics(name="metrics", uri=str(root / "metrics"), metadata={}),
    )


def test_a_retried_train_task_resumes_from_the_killed_attempt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dataset = build_tiny_dataset(tmp_path / "ds")
    args = {**ARGS, "checkpoint_root": str(tmp_path / "checkpoints")}
    run_dir = tmp_path / "checkpoints" / RUN_ID
    (tmp_path / "attempt-1").mkdir()
    with open(tmp_path / "attempt-1.log", "w", encoding="utf-8") as log:
        first = subprocess.Popen(
            [
                sys.executable,
                "-c",
                ATTEMPT,
                str(dataset),
                str(tmp_path / "attempt-1"),
                json.dumps(args),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + HANG_GUARD_S
            while not list(run_dir.glob(f"*{checkpoint.SIDECAR_SUFFIX}")):
                assert first.poll() is None, (tmp_path / "attempt-1.log").read_text()
                assert time.monotonic() < deadline, "the first attempt never checkpointed"
                time.sleep(0.01)
            first.send_signal(signal.SIGKILL)  # the node is gone: no time to save anything
            first.wait(timeout=HANG_GUARD_S)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
    assert not (tmp_path / "attempt-1" / "trained_model" / "model.json").exists()

    trained_model, metrics = _artifacts(tmp_path / "attempt-2")
    with caplog.at_level(logging.INFO, logger="imgclf.steps.train"):
        train.python_func(
            dataset=dsl.Dataset(name="dataset", uri=str(dataset), metadata={}),
            trained_model=trained_model,
            metrics=metrics,
            training_curves=dsl.HTML(
                name="training_curves", uri=str(tmp_path / "attempt-2" / "curves"), metadata={}
            ),
            **args,
        )
    resumed = [r.getMessage() for r in caplog.records if "resuming from epoch" in r.getMessage()]
    assert resumed and str(run_dir) in resumed[0], caplog.text
    assert (Path(trained_model.path) / "model.json").is_file()
    assert metrics.metadata["epochs_run"] == ARGS["epochs"]
    assert not list(run_dir.glob("*.pt"))  # the completed run removed its checkpoints
