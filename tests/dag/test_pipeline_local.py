"""The training DAG run for real by kfp.local's SubprocessRunner: ``imgclf pipeline run --local``.

Tiny learnable images (bars, diagonals, squares over noise) and a small CNN keep a whole
run to seconds. The module's runs share one source folder and one registry, in order: the
first run trains and deploys version 1, the second sees the same data and stops after
check-retrain, a forced one trains again. The DVC/CLI steps run on the same data with the
same parameters must reach the same test metrics as the pipeline's evaluate task.

No ``from __future__ import annotations`` here: KFP reads the test components' annotations
as types, not strings.
"""

import contextlib
import dataclasses
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import yaml
from kfp import dsl

from _dataset_factory import pattern_image
from _repo_copy import REPO
from imgclf import cli
from imgclf.contracts import read_eval_report
from imgclf.kfp import RunFailed
from imgclf.kfp.local import (
    DEFAULT_LOCAL_REGISTRY,
    DEFAULT_LOCAL_ROOT,
    LOCAL_PATH_PARAMS,
    TRAINING_TASKS,
    TaskEvent,
    absolute_local_path,
    executor_tasks,
    run_local,
)
from imgclf.registry import ModelRegistry
from pipelines.training_pipeline import build_pipeline

PARAMS = REPO / "params.yaml"
CLASSES = ("bar", "column", "diagonal")
IMAGES_PER_CLASS = 25

# One set of settings, spelled for both orchestrators: (params.yaml section, key, value,
# pipeline input). Everything not listed is params.yaml's value on both sides.
SETTINGS = (
    ("ingest", "split", {"train": 0.6, "val": 0.2, "test": 0.2}, None),
    ("ingest", "seed", 7, "split_seed"),
    ("validate", "min_images_per_class", 3, "min_images_per_class"),
    ("validate", "min_images_per_split", 6, "min_images_per_split"),
    ("train", "model", "simple_cnn", "model"),
    ("train", "image_size", 16, "train_image_size"),
    ("train", "augment", "none", "augment"),
    ("train", "epochs", 6, "epochs"),
    ("train", "min_steps", 0, "min_steps"),
    ("train", "batch_size", 8, "batch_size"),
    ("train", "lr", 0.01, "lr"),
    ("train", "patience", 0, "patience"),
    ("train", "max_steps_per_epoch", 0, "max_steps_per_epoch"),
    ("train", "seed", 11, "train_seed"),
    ("train", "device", "cpu", "device"),
    ("train", "threads", 1, "threads"),
    # Tiny data: the gate still has to be passed by learning (chance is 1/3).
    ("evaluate", "min_accuracy", 0.6, "min_accuracy"),
)


def _pipeline_pairs(source: Path) -> list[str]:
    pairs = [f"source={source}", "split_train=0.6", "split_val=0.2", "split_test=0.2"]
    pairs += [f"{name}={value}" for _, _, value, name in SETTINGS if name is not None]
    return pairs


def _cli_sets(section: str) -> list[str]:
    sets = []
    for sec, key, value, _ in SETTINGS:
        if sec == section:
            sets += ["--set", f"{key}={json.dumps(value)}"]
    return sets


def _write_source(root: Path) -> Path:
    """An ImageFolder tree ``<class>/<n>.png``: the raw images a user points ingest at."""
    rng = np.random.default_rng(3)
    for index, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True)
        for n in range(IMAGES_PER_CLASS):
            pattern_image(index, 16, rng).save(folder / f"{n:03d}.png")
    return root


class CliResult(NamedTuple):
    code: int
    out: str
    err: str


def _cli(*argv: str) -> CliResult:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return CliResult(code, out.getvalue(), err.getvalue())


@dataclasses.dataclass
class Runs:
    """The module's workspace: where the source and outputs live, and each run's result."""

    home: Path
    source: Path
    results: dict[str, CliResult] = dataclasses.field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.home / DEFAULT_LOCAL_ROOT

    @property
    def registry(self) -> Path:
        return self.home / DEFAULT_LOCAL_REGISTRY

    def run(self, label: str, *extra: str) -> CliResult:
        """``imgclf pipeline run --local`` with the tiny settings, from the workspace."""
        params = [f"--param={p}" for p in [*_pipeline_pairs(self.source), *extra]]
        self.results[label] = _cli("pipeline", "run", "--local", "--params", str(PARAMS), *params)
        return self.results[label]

    def run_dir(self, label: str) -> Path:
        """The run folder the CLI printed for run ``label``."""
        for line in self.results[label].out.splitlines():
            if line.startswith("local run of ") and "; outputs under " in line:
                return Path(line.rsplit("; outputs under ", 1)[1])
        raise AssertionError(f"no run folder in:\n{self.results[label].out}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    """A fresh working directory (relative defaults resolve into it) with the raw images."""
    home = tmp_path_factory.mktemp("work")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(home)
        yield Runs(home=home, source=_write_source(home / "raw"))


@pytest.fixture(scope="module")
def first(runs: Runs) -> CliResult:
    return runs.run("first")


@pytest.fixture(scope="module")
def second(runs: Runs, first: CliResult) -> CliResult:
    assert first.code == 0, first.err
    return runs.run("second")


# --------------------------------------------------------------------------------------
# Fast: the pieces the CLI builds on


def test_relative_local_paths_become_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    keywords = LOCAL_PATH_PARAMS["pretrained"]
    assert absolute_local_path("data") == str(tmp_path / "data")
    assert absolute_local_path("../w.pt", keywords) == str(tmp_path.parent / "w.pt")
    for kept in ("sample:digits", "s3://bucket/registry", "file:///srv/images", "", "/abs"):
        assert absolute_local_path(kept) == kept
    assert absolute_local_path("imagenet", keywords) == "imagenet"
    assert absolute_local_path("none", keywords) == "none"


def test_training_tasks_in_execution_order() -> None:
    from google.protobuf import json_format

    spec = json_format.MessageToDict(build_pipeline(PARAMS).pipeline_spec)
    assert executor_tasks(spec) == list(TRAINING_TASKS)


@dsl.component(base_image="python:3.11")
def _decide(go: bool) -> NamedTuple("Decision", [("proceed", bool), ("why", str)]):
    return go, "asked to" if go else "asked not to"


@dsl.component(base_image="python:3.11")
def _act(marker: dsl.Output[dsl.Artifact]) -> None:
    with open(marker.path, "w") as fh:
        fh.write("acted")


@dsl.pipeline(name="named-gate")
def _gated(go: bool = True) -> None:
    decision = _decide(go=go)
    with dsl.If(decision.outputs["proceed"] == True, name="go"):  # noqa: E712
        _act()


@pytest.mark.parametrize("go", [True, False])
def test_condition_on_a_named_output_runs_locally(tmp_path: Path, go: bool) -> None:
    """kfp.local alone skips such a branch always; run_local must follow the output."""
    events: list[TaskEvent] = []
    echo = io.StringIO()
    result = run_local(
        _gated,
        [f"go={str(go).lower()}"],
        pipeline_root=tmp_path,
        on_task=events.append,
        echo=echo,
    )
    run_dir = Path(result["run_dir"])
    assert (run_dir / "act" / "marker").is_file() is go
    finished = {(e.task, e.state) for e in events if e.state != "RUNNING"}
    expected = ("act", "SUCCEEDED") if go else ("act", "SKIPPED")
    assert finished == {("decide", "SUCCEEDED"), expected}
    log = Path(result["log"]).read_text(encoding="utf-8")
    assert "Executing task 'decide'" in log
    assert "Executing task \x1b[96m'decide'" in echo.getvalue()  # streamed as kfp prints it


def test_failed_task_is_named_with_its_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = _cli("pipeline", "run", "--local", "--param", "source=no-such-folder")
    assert result.code == RunFailed.exit_code
    assert "failed in task ingest: imgclf.errors.DataError: ingest.source" in result.err
    assert str(tmp_path / "no-such-folder") in result.err  # made absolute before the run
    assert "[ingest]        FAILED" in result.out
    for task in TRAINING_TASKS[1:]:
        assert f"[{task}]".ljust(15) + " skipped (an upstream task failed)" in result.out
    (log,) = (tmp_path / DEFAULT_LOCAL_ROOT).glob("imgclf-training-*/run.log")
    assert "does not exist" in log.read_text(encoding="utf-8")
    assert not (tmp_path / DEFAULT_LOCAL_REGISTRY).exists()


# --------------------------------------------------------------------------------------
# Slow: whole runs of the training DAG


@pytest.mark.slow
def test_first_run_trains_evaluates_and_deploys(runs: Runs, first: CliResult) -> None:
    assert first.code == 0, first.err + first.out
    out = first.out
    for task in TRAINING_TASKS:
        assert f"[{task}]" in out and "running" in out
    finished = [
        line.split()[0]
        for line in out.splitlines()
        if line.startswith("[") and " SUCCEEDED in " in line
    ]
    assert finished == [f"[{task}]" for task in TRAINING_TASKS], out
    assert "training the first model" in out
    assert "test accuracy:" in out and "quality gate:   passed" in out
    assert "digits production -> version 1 (promoted)" in out

    # The embedded local registry (not the compiled s3:// default), under the cwd.
    registry = ModelRegistry.open(runs.registry)
    assert [v.version for v in registry.list_versions("digits")] == [1]
    assert registry.alias("digits", "production") == 1

    run_dir = runs.run_dir("first")
    assert run_dir.parent == runs.root
    expected_files = (
        "ingest/dataset/dataset.json",
        "ingest/dataset/manifest.csv",
        "validate/report/report.json",
        "validate/data_docs",
        "check-retrain/executor_output.json",
        "train/trained_model/model.safetensors",
        "train/trained_model/model.pt2",
        "train/trained_model/model.json",
        "evaluate/evaluation/metrics.json",
        "evaluate/model_card",
        "deploy/inference_service",
        "run.log",
    )
    missing = [f for f in expected_files if not (run_dir / f).is_file()]
    assert missing == []
    manifest = yaml.safe_load((run_dir / "deploy" / "inference_service").read_text())
    assert manifest["kind"] == "InferenceService"
    model_json = json.loads((run_dir / "train/trained_model/model.json").read_text())
    dataset_json = json.loads((run_dir / "ingest/dataset/dataset.json").read_text())
    assert model_json["architecture"] == "simple_cnn"
    assert model_json["dataset_hash"] == dataset_json["hash"]
    assert dataset_json["source"] == str(runs.source)
    assert registry.get("digits", 1).dataset_hash == dataset_json["hash"]


@pytest.mark.slow
def test_second_run_on_unchanged_data_has_nothing_to_retrain(runs: Runs, second: CliResult) -> None:
    assert second.code == 0, second.err + second.out
    out = second.out
    assert "nothing to retrain: dataset" in out and "unchanged since production version 1" in out
    for task in ("train", "evaluate", "deploy"):
        assert f"[{task}]" in out
        assert any(
            line.startswith(f"[{task}]") and "skipped (condition dataset-changed is false)" in line
            for line in out.splitlines()
        ), out
    run_dir = runs.run_dir("second")
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == [
        "check-retrain",
        "ingest",
        "validate",
    ]
    decision = json.loads((run_dir / "check-retrain/executor_output.json").read_text())
    assert decision["parameterValues"]["should_retrain"] is False
    assert [v.version for v in ModelRegistry.open(runs.registry).list_versions("digits")] == [1]


@pytest.mark.slow
def test_force_retrains_unchanged_data(runs: Runs, second: CliResult) -> None:
    forced = runs.run("forced", "force=true")
    assert forced.code == 0, forced.err + forced.out
    assert "retraining forced on dataset" in forced.out
    run_dir = runs.run_dir("forced")
    assert (run_dir / "train/trained_model/model.safetensors").is_file()
    assert (run_dir / "evaluate/evaluation/metrics.json").is_file()
    # Same data, same seed: the same weights, which the alias already holds; no new version.
    assert "digits production -> version 1 (promoted)" in forced.out
    assert [v.version for v in ModelRegistry.open(runs.registry).list_versions("digits")] == [1]


@pytest.mark.slow
def test_same_metrics_as_the_dvc_cli_steps(runs: Runs, first: CliResult) -> None:
    assert first.code == 0, first.err
    work = runs.home / "cli"
    params = ["--params", str(PARAMS)]
    steps = (
        ("ingest", "--source", str(runs.source), "--out", str(work / "dataset")),
        ("validate", "--dataset", str(work / "dataset"), "--out", str(work / "validation")),
        ("train", "--dataset", str(work / "dataset"), "--out", str(work / "model")),
        (
            "evaluate",
            "--dataset",
            str(work / "dataset"),
            "--model",
            str(work / "model"),
            "--out",
            str(work / "eval"),
            "--registry",
            str(work / "registry"),
        ),
    )
    for step, *flags in steps:
        result = _cli(step, *flags, *params, *_cli_sets(step))
        assert result.code == 0, f"imgclf {step}: {result.err}"

    run_dir = runs.run_dir("first")
    cli_dataset = json.loads((work / "dataset/dataset.json").read_text())
    kfp_dataset = json.loads((run_dir / "ingest/dataset/dataset.json").read_text())
    assert cli_dataset["hash"] == kfp_dataset["hash"]
    cli_metrics = json.loads((work / "eval/metrics.json").read_text())
    kfp_metrics = json.loads((run_dir / "evaluate/evaluation/metrics.json").read_text())
    cli_report = read_eval_report(work / "eval")
    kfp_report = read_eval_report(run_dir / "evaluate/evaluation")
    assert cli_report["num_images"] == kfp_report["num_images"] > 0
    assert cli_report["per_class"] == kfp_report["per_class"]
    assert cli_metrics["accuracy"] == kfp_metrics["accuracy"]
    assert cli_metrics["loss"] == pytest.approx(kfp_metrics["loss"], abs=1e-6)
    kfp_eval = json.loads((run_dir / "evaluate/executor_output.json").read_text())
    assert kfp_eval["parameterValues"]["accuracy"] == cli_metrics["accuracy"]
