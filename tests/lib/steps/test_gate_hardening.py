"""A dataset of one class must not reach production: validate, train and the evaluate gate.

With one class every prediction is right, so a one-class dataset used to pass validate, train
to accuracy 1.0, pass evaluate and be deployed. Each step now refuses it on its own terms:
validate with a blocking expectation, train before any work, evaluate with ``passed: false``
and a reason (so deploy does not promote). A test split missing a class of the model is
refused the same way. Everything runs through ``imgclf.cli.main`` on real files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from _dataset_factory import build_dataset, build_tiny_dataset
from imgclf.cli import main
from imgclf.config import ValidateConfig
from imgclf.contracts import MODEL_FILE, WEIGHTS_FILE, write_model_checksums
from imgclf.errors import DataError, ValidationFailed
from imgclf.fsutil import read_json, write_json
from imgclf.registry import ModelRegistry
from imgclf.steps import validate

ONE_CLASS_SPLITS = {"train": 70, "val": 15, "test": 15}  # 100 images


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``imgclf <args>`` in-process: (exit code, stdout, stderr)."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """The single stderr line a user error prints (never a traceback)."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if not line.startswith(("INFO ", "WARNING "))]
    assert len(lines) == 1, err
    return lines[0]


def untrained_model(root: Path, classes: tuple[str, ...]) -> Path:
    """A loadable ``simple_cnn`` model dir with random weights for ``classes``.

    Train refuses a single class now, so the one-class model it used to write is built here
    (``tests/_model_factory`` writes registry fixtures that evaluate cannot load).
    """
    from safetensors.torch import save_file

    from imgclf.training.models import create_model

    root.mkdir(parents=True)
    net = create_model("simple_cnn", len(classes))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, root / WEIGHTS_FILE)
    write_json(
        root / MODEL_FILE,
        {
            "architecture": "simple_cnn",
            "classes": list(classes),
            "num_classes": len(classes),
            "input_size": [3, 12, 12],
            "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25],
        },
    )
    write_model_checksums(root)
    return root


@pytest.fixture(scope="module")
def one_class(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("one-class")
    return build_tiny_dataset(root / "dataset", classes=("solo",), per_split=ONE_CLASS_SPLITS)


@pytest.fixture
def params(tmp_path: Path) -> Path:
    """Every section the step commands read, tiny and local (the registry under tmp_path)."""
    path = tmp_path / "params.yaml"
    values = {
        "validate": {},
        "train": {"model": "simple_cnn", "epochs": 1, "min_steps": 0, "image_size": 12},
        "evaluate": {"min_accuracy": 0.0},
        "registry": {"uri": str(tmp_path / "registry"), "model_name": "solo"},
        "deploy": {"apply": False, "smoke_samples": 0},
    }
    path.write_text(yaml.safe_dump(values))
    return path


def test_validate_refuses_a_dataset_of_one_class(
    one_class: Path, params: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "validation"
    code, _, err = run(
        capsys, "validate", "--params", str(params), "--dataset", str(one_class), "--out", str(out)
    )
    assert code == ValidationFailed.exit_code
    assert "at_least_two_classes: observed 1" in one_line(err)
    entry = {e["name"]: e for e in read_json(out / "report.json")["expectations"]}
    assert entry["at_least_two_classes"]["blocking"] is True
    assert entry["at_least_two_classes"]["success"] is False


def test_validate_refuses_a_class_missing_from_a_split_whatever_the_minimum(
    tmp_path: Path,
) -> None:
    counts = {"train": 6, "val": 5, "test": {"0": 5}}  # class "1" has no test images
    dataset = build_dataset(tmp_path / "dataset", per_split=counts)
    cfg = ValidateConfig(min_images_per_class=0, min_images_per_split=1)
    with pytest.raises(ValidationFailed, match="every_class_in_every_split: images/test/1/"):
        validate.run(cfg, dataset_dir=dataset, out_dir=tmp_path / "out")
    entry = {e["name"]: e for e in read_json(tmp_path / "out" / "report.json")["expectations"]}
    assert entry["every_class_in_every_split"]["offending_files"] == ["images/test/1/"]
    assert entry["min_images_per_class"]["success"] is True, "0 images per class are allowed"


def test_train_refuses_one_class_before_any_work(
    one_class: Path, params: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model"
    code, _, err = run(
        capsys, "train", "--params", str(params), "--dataset", str(one_class), "--out", str(out)
    )
    assert code == DataError.exit_code
    assert "1 class(es) ['solo']: a classifier needs at least 2" in one_line(err)
    assert not out.exists() and list(tmp_path.glob(".model.*")) == []


def test_evaluate_fails_a_perfect_one_class_model_and_deploy_does_not_promote(
    one_class: Path, params: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = untrained_model(tmp_path / "model", ("solo",))
    evaluation = tmp_path / "eval"
    code, out, err = run(
        capsys,
        *("evaluate", "--params", str(params), "--dataset", str(one_class)),
        *("--model", str(model), "--out", str(evaluation)),
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["accuracy"] == 1.0 and summary["passed"] is False
    assert any("test split holds 1 class(es) (solo)" in r for r in summary["reasons"])
    assert read_json(evaluation / "metrics.json")["passed"] is False

    code, out, _ = run(
        capsys,
        *("deploy", "--params", str(params), "--dataset", str(one_class)),
        *("--model", str(model), "--eval", str(evaluation), "--out", str(tmp_path / "deploy")),
    )
    assert code == 0
    assert json.loads(out)["promoted"] is False
    registry = ModelRegistry.open(str(tmp_path / "registry"))
    assert registry.alias("solo", "production") is None


def test_evaluate_fails_when_a_class_of_the_model_has_no_test_images(
    params: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    classes = ("cat", "dog", "fish")
    counts = {"train": 6, "val": 5, "test": {"cat": 5, "dog": 5}}
    dataset = build_dataset(tmp_path / "dataset", classes=classes, per_split=counts)
    model = untrained_model(tmp_path / "model", classes)
    code, out, _ = run(
        capsys,
        *("evaluate", "--params", str(params), "--dataset", str(dataset)),
        *("--model", str(model), "--out", str(tmp_path / "eval")),
    )
    assert code == 0
    summary = json.loads(out)
    assert summary["passed"] is False
    assert any("class(es) fish of the model have no images" in r for r in summary["reasons"])


def test_evaluate_still_passes_a_test_split_with_every_class(
    params: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = build_dataset(tmp_path / "dataset", classes=("cat", "fish"))
    model = untrained_model(tmp_path / "model", ("cat", "fish"))
    code, out, _ = run(
        capsys,
        *("evaluate", "--params", str(params), "--dataset", str(dataset)),
        *("--model", str(model), "--out", str(tmp_path / "eval")),
    )
    assert code == 0
    assert json.loads(out)["passed"] is True, "min_accuracy 0 and no champion: the gate passes"
