"""What the validate step checks: the frames derived from the manifest and the GX suite.

Checks across rows (leakage between splits, the number of classes, every class in every split,
images per class, class imbalance) become plain column expectations on small derived frames
(one row per file, per class and split, per split), so GX can point at the offending rows.
Kept apart from :mod:`imgclf.steps.validate`, which runs this suite and turns the results into
the report: adding a check touches only this module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pandas as pd

from imgclf.config import ValidateConfig
from imgclf.contracts import IMAGES_DIR, MANIFEST_COLUMNS, SPLITS

REQUIRED_COLUMNS = ("path", "label", "split", "sha256", "bytes")
"""Manifest columns every row must fill (``width``/``height``/``mode`` stay empty for
undecodable files, which ``images_decodable`` reports instead)."""

# Frames validated as separate GX batches; the value is the column that names a row in
# offending_files (a manifest path, or an ``images/<split>/<class>/`` folder for counts).
FRAME_KEYS = {
    "manifest": "path",
    "files_across_splits": "path",
    "class_counts": "group",
    "split_counts": "group",
}


@dataclasses.dataclass(frozen=True)
class Check:
    """One named expectation: which frame it runs on and whether its failure stops the run."""

    name: str
    frame: str
    description: str
    blocking: bool
    expectation: Any


def column(df: pd.DataFrame, name: str) -> pd.Series:
    """``df[name]``, or an all-missing column when the manifest lacks it.

    A missing column is reported by the column-set expectation; derived frames still need
    something to compute on so that one defect does not hide every other result.
    """
    if name in df.columns:
        return df[name]
    return pd.Series(pd.NA, index=df.index, dtype="object", name=name)


def build_frames(manifest: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The manifest plus the derived frames that turn cross-row rules into column checks.

    - ``files_across_splits``: per file, how many distinct splits hold a file with the same
      sha256 (more than 1 is leakage);
    - ``class_counts``: images per (split, class) for every known split and every class seen,
      zeros included, with the train imbalance ratio (largest class / this class);
    - ``split_counts``: images per known split, zeros included.
    """
    path, split, label = (
        column(manifest, "path"),
        column(manifest, "split"),
        column(manifest, "label"),
    )
    sha = column(manifest, "sha256")
    sharing = (
        pd.DataFrame({"sha256": sha, "split": split})
        .groupby("sha256")["split"]
        .transform("nunique")
    )
    files = pd.DataFrame(
        {"path": path, "split": split, "sha256": sha, "splits_sharing_sha256": sharing}
    )

    classes = sorted(label.dropna().unique())
    pairs = pd.DataFrame({"split": split, "label": label}).value_counts()
    rows = [
        {
            "group": f"{IMAGES_DIR}/{s}/{c}/",
            "split": s,
            "label": c,
            "count": int(pairs.get((s, c), 0)),
        }
        for s in SPLITS
        for c in classes
    ]
    class_counts = pd.DataFrame(rows, columns=["group", "split", "label", "count"])
    class_counts["count"] = class_counts["count"].astype("int64")
    train = class_counts["split"] == "train"
    largest = class_counts.loc[train, "count"].max() if train.any() else 0
    # An empty class counts as 1 so the ratio stays finite; min_images_per_class names it.
    class_counts["imbalance_ratio"] = (largest / class_counts["count"].clip(lower=1)).where(train)

    per_split = split.value_counts()
    split_counts = pd.DataFrame(
        [
            {"group": f"{IMAGES_DIR}/{s}/", "split": s, "count": int(per_split.get(s, 0))}
            for s in SPLITS
        ]
    )
    return {
        "manifest": manifest,
        "files_across_splits": files,
        "class_counts": class_counts,
        "split_counts": split_counts,
    }


def build_checks(cfg: ValidateConfig, gx: Any) -> list[Check]:
    """The suite, in report order. Names are stable: report.json and messages use them.

    The name, the blocking flag (as GX severity) and the description travel inside each
    expectation too, so the Data Docs read the same as report.json.
    """
    severity = gx.expectations.metadata_types.FailureSeverity
    modes = sorted(cfg.allowed_modes)
    imbalance_note = "" if cfg.imbalance_blocking else " (warning only)"
    specs: list[tuple[str, str, str, bool, str, dict[str, Any]]] = [
        (
            "columns_match_contract",
            "manifest",
            f"manifest.csv has exactly the columns {', '.join(MANIFEST_COLUMNS)}, in order",
            True,
            "ExpectTableColumnsToMatchOrderedList",
            {"column_list": list(MANIFEST_COLUMNS)},
        ),
        *(
            (
                f"{col}_not_null",
                "manifest",
                f"every manifest row has a {col}",
                True,
                "ExpectColumnValuesToNotBeNull",
                {"column": col},
            )
            for col in REQUIRED_COLUMNS
        ),
        (
            "images_decodable",
            "manifest",
            "every image decodes (the manifest's error column is empty)",
            True,
            "ExpectColumnValuesToBeNull",
            {"column": "error"},
        ),
        (
            "width_in_bounds",
            "manifest",
            f"image width is within [{cfg.min_width}, {cfg.max_width}] px",
            True,
            "ExpectColumnValuesToBeBetween",
            {"column": "width", "min_value": cfg.min_width, "max_value": cfg.max_width},
        ),
        (
            "height_in_bounds",
            "manifest",
            f"image height is within [{cfg.min_height}, {cfg.max_height}] px",
            True,
            "ExpectColumnValuesToBeBetween",
            {"column": "height", "min_value": cfg.min_height, "max_value": cfg.max_height},
        ),
        (
            "mode_allowed",
            "manifest",
            f"image mode is one of {', '.join(modes)}",
            True,
            "ExpectColumnValuesToBeInSet",
            {"column": "mode", "value_set": modes},
        ),
        (
            "split_known",
            "manifest",
            f"split is one of {', '.join(SPLITS)}",
            True,
            "ExpectColumnValuesToBeInSet",
            {"column": "split", "value_set": list(SPLITS)},
        ),
        (
            "bytes_positive",
            "manifest",
            "no file is empty (bytes > 0)",
            True,
            "ExpectColumnValuesToBeBetween",
            {"column": "bytes", "min_value": 0, "strict_min": True},
        ),
        (
            "duplicate_fraction_within_split",
            "manifest",
            f"at most {cfg.max_duplicate_fraction:.2%} of the rows are exact copies "
            "(same sha256) of another file in the same split",
            True,
            "ExpectCompoundColumnsToBeUnique",
            {"column_list": ["split", "sha256"], "mostly": 1.0 - cfg.max_duplicate_fraction},
        ),
        (
            "no_leakage_between_splits",
            "files_across_splits",
            "no image content (sha256) appears in more than one split",
            True,
            "ExpectColumnValuesToBeBetween",
            {"column": "splits_sharing_sha256", "max_value": 1},
        ),
        (
            "at_least_two_classes",
            "manifest",
            "the dataset has at least 2 classes (with one, every model scores 100%)",
            True,
            "ExpectColumnUniqueValueCountToBeBetween",
            {"column": "label", "min_value": 2},
        ),
        (
            "every_class_in_every_split",
            "class_counts",
            "every class has images in every split (else it is never learned, tuned or tested)",
            True,
            "ExpectColumnValuesToBeBetween",
            {"column": "count", "min_value": 1},
        ),
        (
            "min_images_per_class",
            "class_counts",
            f"every class has at least {cfg.min_images_per_class} images in every split",
            True,
            "ExpectColumnValuesToBeBetween",
            {"column": "count", "min_value": cfg.min_images_per_class},
        ),
        (
            "min_images_per_split",
            "split_counts",
            f"every split has at least {cfg.min_images_per_split} images",
            True,
            "ExpectColumnValuesToBeBetween",
            {"column": "count", "min_value": cfg.min_images_per_split},
        ),
        (
            "class_imbalance_ratio",
            "class_counts",
            f"largest / smallest class in train is at most {cfg.max_imbalance_ratio:g}"
            + imbalance_note,
            cfg.imbalance_blocking,
            "ExpectColumnMaxToBeBetween",
            {"column": "imbalance_ratio", "max_value": cfg.max_imbalance_ratio},
        ),
    ]
    return [
        Check(
            name,
            frame,
            description,
            blocking,
            getattr(gx.expectations, cls_name)(
                **kwargs,
                description=description,
                meta={"name": name, "blocking": blocking},
                severity=severity.CRITICAL if blocking else severity.WARNING,
            ),
        )
        for name, frame, description, blocking, cls_name, kwargs in specs
    ]
