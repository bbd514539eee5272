"""Validate step: the real Great Expectations suite on tiny datasets with planted defects.

GX runs for real (ephemeral context, real Data Docs). Each dataset is validated once in a
module-scoped fixture and several tests read that one result, which keeps the file fast.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from _dataset_factory import build_dataset, encode, write_manifest
from imgclf.config import ValidateConfig, to_dict
from imgclf.errors import ConfigError, DataError, ValidationFailed
from imgclf.fsutil import read_json
from imgclf.steps import validate
from imgclf.steps.validate_suite import build_frames

EXPECTED_NAMES = [
    "columns_match_contract",
    "path_not_null",
    "label_not_null",
    "split_not_null",
    "sha256_not_null",
    "bytes_not_null",
    "images_decodable",
    "width_in_bounds",
    "height_in_bounds",
    "mode_allowed",
    "split_known",
    "bytes_positive",
    "duplicate_fraction_within_split",
    "no_leakage_between_splits",
    "at_least_two_classes",
    "every_class_in_every_split",
    "min_images_per_class",
    "min_images_per_split",
    "class_imbalance_ratio",
]

TRUNCATED = "images/train/0/truncated.jpg"
EMPTY = "images/val/1/empty.png"
LEAK_SOURCE = "images/train/1/0000.png"
LEAK_COPY = "images/test/1/leaked.png"


def _run(cfg: ValidateConfig, dataset: Path, out: Path, cwd: Path) -> dict | ValidationFailed:
    """Run validate from an empty cwd; return the report, or the ValidationFailed raised."""
    cwd.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        try:
            return validate.run(cfg, dataset_dir=dataset, out_dir=out)
        except ValidationFailed as exc:
            return exc


def _by_name(report: dict) -> dict[str, dict]:
    return {e["name"]: e for e in report["expectations"]}


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("clean")
    dataset = build_dataset(root / "dataset")
    cfg = ValidateConfig()
    result = _run(cfg, dataset, root / "out", root / "cwd")
    return {"result": result, "out": root / "out", "cwd": root / "cwd", "cfg": cfg}


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A clean dataset plus a truncated JPEG, a zero-byte file and a train image in test."""
    root = tmp_path_factory.mktemp("broken")
    dataset = build_dataset(root / "dataset")
    pixels = np.random.default_rng(7).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    jpeg = encode(Image.fromarray(pixels, "RGB"), "JPEG")
    (dataset / TRUNCATED).write_bytes(jpeg[: len(jpeg) // 2])
    (dataset / EMPTY).write_bytes(b"")
    shutil.copyfile(dataset / LEAK_SOURCE, dataset / LEAK_COPY)
    rows = {r.path: r for r in write_manifest(dataset)}
    assert rows[TRUNCATED].error and rows[EMPTY].error, "defects must be in the manifest"
    # Relative paths, as the CLI passes them; the cwd must end up holding only those two.
    result = _run(ValidateConfig(), Path("dataset"), Path("out"), root)
    return {"result": result, "out": root / "out", "cwd": root}


def test_clean_dataset_passes_every_expectation(clean: dict) -> None:
    report = clean["result"]
    assert isinstance(report, dict), report
    assert report["success"] is True and report["blocking_success"] is True
    assert [e["name"] for e in report["expectations"]] == EXPECTED_NAMES
    for entry in report["expectations"]:
        assert entry["success"] is True, entry
        assert entry["offending_files"] == []
        assert entry["description"]
    assert _by_name(report)["class_imbalance_ratio"]["blocking"] is False
    assert _by_name(report)["class_imbalance_ratio"]["observed_value"] == pytest.approx(1.0)
    assert read_json(clean["out"] / "report.json") == report


def test_clean_run_writes_metrics_and_config(clean: dict) -> None:
    metrics = read_json(clean["out"] / "metrics.json")
    assert metrics["num_images"] == 32  # 2 classes x (6 + 5 + 5)
    assert metrics["num_errors"] == 0
    assert metrics["expectations_total"] == len(EXPECTED_NAMES)
    assert metrics["expectations_failed"] == 0
    assert metrics["success"] == 1
    assert all(isinstance(v, int) for v in metrics.values())
    assert read_json(clean["out"] / "config.json") == json.loads(json.dumps(to_dict(clean["cfg"])))


def test_data_docs_are_built_inside_out_dir_and_nothing_in_cwd(clean: dict) -> None:
    out = clean["out"]
    index = out / "data_docs" / "index.html"
    assert index.is_file()
    html = index.read_text(encoding="utf-8")
    for suite in ("manifest", "files_across_splits", "class_counts", "split_counts"):
        assert suite in html
    pages = list((out / "data_docs" / "validations").rglob("*.html"))
    assert len(pages) == 4
    assert any("every image decodes" in p.read_text(encoding="utf-8") for p in pages)
    assert list(clean["cwd"].iterdir()) == []
    assert not any(p.name.startswith(".") for p in out.parent.iterdir()), "temp dir left"


def test_broken_dataset_fails_naming_the_three_files(broken: dict) -> None:
    exc = broken["result"]
    assert isinstance(exc, ValidationFailed), exc
    message = str(exc)
    assert message.startswith("validate failed: ")
    for name in ("images_decodable", "bytes_positive", "no_leakage_between_splits"):
        assert name in message
    for path in (TRUNCATED, EMPTY, LEAK_COPY):
        assert path in message
    assert "width_in_bounds" not in message
    assert sorted(p.name for p in broken["cwd"].iterdir()) == ["dataset", "out"]


def test_broken_dataset_report_lists_offending_files(broken: dict) -> None:
    out = broken["out"]
    report = read_json(out / "report.json")
    assert report["success"] is False and report["blocking_success"] is False
    entries = _by_name(report)
    assert entries["images_decodable"]["offending_files"] == sorted([TRUNCATED, EMPTY])
    assert entries["bytes_positive"]["offending_files"] == [EMPTY]
    assert entries["no_leakage_between_splits"]["offending_files"] == [LEAK_COPY, LEAK_SOURCE]
    assert entries["images_decodable"]["observed_value"]["unexpected_count"] == 2
    passing = set(EXPECTED_NAMES) - {
        "images_decodable",
        "bytes_positive",
        "no_leakage_between_splits",
    }
    assert {n for n, e in entries.items() if e["success"]} == passing
    metrics = read_json(out / "metrics.json")
    assert metrics["success"] == 0 and metrics["num_errors"] == 2
    assert metrics["expectations_failed"] == 3
    assert (out / "data_docs" / "index.html").is_file()


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train holds 6 images of class 0 and 24 of class 1: a ratio of 4."""
    root = tmp_path_factory.mktemp("imbalanced")
    counts = {"train": {"0": 6, "1": 24}, "val": 5, "test": 5}
    return build_dataset(root / "dataset", per_split=counts)


def test_imbalance_is_a_warning_by_default(imbalanced: Path, tmp_path: Path) -> None:
    cfg = ValidateConfig(max_imbalance_ratio=3.0)
    report = _run(cfg, imbalanced, tmp_path / "out", tmp_path / "cwd")
    assert isinstance(report, dict), report
    entry = _by_name(report)["class_imbalance_ratio"]
    assert entry["success"] is False and entry["blocking"] is False
    assert entry["observed_value"] == pytest.approx(4.0)
    assert entry["offending_files"] == ["images/train/0/"]
    assert report["success"] is False and report["blocking_success"] is True
    assert read_json(tmp_path / "out" / "metrics.json")["success"] == 0


def test_imbalance_blocks_when_configured(imbalanced: Path, tmp_path: Path) -> None:
    cfg = ValidateConfig(max_imbalance_ratio=3.0, imbalance_blocking=True)
    exc = _run(cfg, imbalanced, tmp_path / "out", tmp_path / "cwd")
    assert isinstance(exc, ValidationFailed)
    assert "class_imbalance_ratio: images/train/0/" in str(exc)
    report = read_json(tmp_path / "out" / "report.json")
    assert _by_name(report)["class_imbalance_ratio"]["blocking"] is True


def test_imbalance_within_limit_passes(imbalanced: Path, tmp_path: Path) -> None:
    report = _run(ValidateConfig(max_imbalance_ratio=4.0), imbalanced, tmp_path / "o", tmp_path)
    assert isinstance(report, dict) and report["success"] is True


def test_width_and_height_bounds(tmp_path: Path) -> None:
    dataset = build_dataset(tmp_path / "dataset", size=(16, 24))
    cfg = ValidateConfig(min_width=20, max_height=20, allowed_modes=("RGB",))
    exc = _run(cfg, dataset, tmp_path / "out", tmp_path / "cwd")
    assert isinstance(exc, ValidationFailed)
    assert "width_in_bounds: images/test/0/0000.png" in str(exc)
    assert "height_in_bounds" in str(exc)
    assert "(+29 more)" in str(exc)
    entries = _by_name(read_json(tmp_path / "out" / "report.json"))
    assert entries["width_in_bounds"]["offending_count"] == 32
    assert len(entries["width_in_bounds"]["offending_files"]) == 20
    assert entries["width_in_bounds"]["offending_files"] == sorted(
        entries["width_in_bounds"]["offending_files"]
    )
    assert entries["mode_allowed"]["offending_count"] == 32
    assert entries["mode_allowed"]["description"] == "image mode is one of RGB"
    assert entries["bytes_positive"]["success"] is True

    report = _run(ValidateConfig(min_width=16, max_height=24), dataset, tmp_path / "out", tmp_path)
    assert isinstance(report, dict) and report["blocking_success"] is True


def test_counts_per_class_and_split_include_missing_classes_and_unknown_splits(
    tmp_path: Path,
) -> None:
    counts = {"train": 6, "val": {"0": 5, "1": 2}, "test": {"0": 5}, "holdout": 1}
    dataset = build_dataset(tmp_path / "dataset", per_split=counts)
    exc = _run(ValidateConfig(), dataset, tmp_path / "out", tmp_path / "cwd")
    assert isinstance(exc, ValidationFailed)
    entries = _by_name(read_json(tmp_path / "out" / "report.json"))
    assert entries["min_images_per_class"]["offending_files"] == [
        "images/test/1/",
        "images/val/1/",
    ]
    assert entries["min_images_per_split"]["offending_files"] == ["images/test/", "images/val/"]
    assert entries["min_images_per_split"]["observed_value"]["unexpected_count"] == 2
    assert entries["split_known"]["offending_files"] == [
        "images/holdout/0/0000.png",
        "images/holdout/1/0000.png",
    ]


def test_duplicates_within_a_split_respect_the_allowed_fraction(tmp_path: Path) -> None:
    dataset = build_dataset(tmp_path / "dataset")
    shutil.copyfile(dataset / "images/train/0/0000.png", dataset / "images/train/0/copy.png")
    write_manifest(dataset)

    exc = _run(ValidateConfig(), dataset, tmp_path / "strict", tmp_path / "cwd")
    assert isinstance(exc, ValidationFailed)
    assert "duplicate_fraction_within_split: images/train/0/0000.png, " in str(exc)
    entry = _by_name(read_json(tmp_path / "strict" / "report.json"))[
        "duplicate_fraction_within_split"
    ]
    assert entry["offending_files"] == ["images/train/0/0000.png", "images/train/0/copy.png"]

    # 2 of 33 rows (6%) are copies: allowed at 10%.
    report = _run(ValidateConfig(max_duplicate_fraction=0.1), dataset, tmp_path / "lax", tmp_path)
    assert isinstance(report, dict), report
    assert _by_name(report)["duplicate_fraction_within_split"]["success"] is True


def test_manifest_with_wrong_columns_is_reported_not_crashed(tmp_path: Path) -> None:
    dataset = build_dataset(tmp_path / "dataset")
    manifest = dataset / "manifest.csv"
    lines = manifest.read_text(encoding="utf-8").splitlines()
    manifest.write_text("\n".join(",".join(x.split(",")[:-1]) for x in lines) + "\n")

    exc = _run(ValidateConfig(), dataset, tmp_path / "out", tmp_path / "cwd")
    assert isinstance(exc, ValidationFailed)
    assert "columns_match_contract: manifest.csv" in str(exc)
    entries = _by_name(read_json(tmp_path / "out" / "report.json"))
    assert "error" in entries["images_decodable"]["observed_value"]
    assert entries["images_decodable"]["success"] is False
    assert entries["no_leakage_between_splits"]["success"] is True


def test_missing_manifest_is_a_data_error_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"manifest\.csv"):
        validate.run(ValidateConfig(), dataset_dir=tmp_path / "nope", out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"min_width": 64, "max_width": 32}, "min_width"),
        ({"max_duplicate_fraction": 1.5}, "max_duplicate_fraction"),
        ({"max_imbalance_ratio": 0.5}, "max_imbalance_ratio"),
        ({"allowed_modes": ()}, "allowed_modes"),
    ],
)
def test_impossible_bounds_are_config_errors(overrides: dict, key: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=key):
        validate.run(ValidateConfig(**overrides), dataset_dir=tmp_path, out_dir=tmp_path / "o")


def test_derived_frames_count_splits_per_hash_and_empty_groups() -> None:
    manifest = pd.DataFrame(
        {
            "path": ["images/train/a/1.png", "images/test/a/1.png", "images/train/b/2.png"],
            "label": ["a", "a", "b"],
            "split": ["train", "test", "train"],
            "sha256": ["h1", "h1", "h2"],
        }
    )
    frames = build_frames(manifest)
    assert frames["files_across_splits"]["splits_sharing_sha256"].tolist() == [2, 2, 1]
    counts = frames["class_counts"].set_index("group")["count"].to_dict()
    assert counts == {
        "images/train/a/": 1,
        "images/train/b/": 1,
        "images/val/a/": 0,
        "images/val/b/": 0,
        "images/test/a/": 1,
        "images/test/b/": 0,
    }
    splits = frames["split_counts"].set_index("split")["count"].to_dict()
    assert splits == {"train": 2, "val": 0, "test": 1}
