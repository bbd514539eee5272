"""Validate step: a Great Expectations suite over the dataset manifest, before any training.

Bad data is cheaper to catch here than after an hour on a GPU: undecodable or empty files,
images outside the size bounds, unknown colour modes, too few images per class or split, the
same image in train and test (leakage inflates test accuracy), duplicate images and class
imbalance. Every check is a real GX expectation run in an ephemeral (in-memory) context, so the
Data Docs that GX renders show exactly what decided the step. Checks across rows are
expressed on small derived frames (one row per file, per class and split, per split) so they
too are plain column expectations with offending rows GX can point at.

Outputs (one atomic dir): ``report.json`` (per expectation: name, description, blocking,
success, observed value, first 20 offending files), ``data_docs/index.html``,
``metrics.json`` (numbers for DVC / KFP) and ``config.json``. A failed blocking expectation
raises :class:`~imgclf.errors.ValidationFailed` after those files are in place, so the
report and docs are there to read when the pipeline stops.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from imgclf.config import ValidateConfig, to_dict
from imgclf.errors import ConfigError, DataError, ValidationFailed
from imgclf.fsutil import atomic_dir, write_json

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("path", "label", "split", "width", "height", "mode", "bytes", "sha256", "error")
TEXT_COLUMNS = ("path", "label", "split", "mode", "sha256", "error")
REQUIRED_COLUMNS = ("path", "label", "split", "sha256", "bytes")
SPLITS = ("train", "val", "test")
DOCS_DIR = "data_docs"
OFFENDING_LIMIT = 20
FILES_IN_MESSAGE = 3

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


def run(cfg: ValidateConfig, *, dataset_dir: Path, out_dir: Path) -> dict:
    """Validate ``dataset_dir/manifest.csv``; write report, Data Docs and metrics to ``out_dir``.

    Returns the ``report.json`` content. Raises :class:`ValidationFailed` (after the outputs
    are written) when a blocking expectation fails, :class:`DataError` when there is no
    readable manifest and :class:`ConfigError` for impossible bounds.
    """
    _check_config(cfg)
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir / "manifest.csv")
    frames = build_frames(manifest)
    gx = _import_gx()
    checks = build_checks(cfg, gx)

    with atomic_dir(out_dir) as tmp:
        results = _run_suites(gx, frames, checks, (tmp / DOCS_DIR).resolve())
        entries = [_report_entry(check, results[check.name], frames, cfg) for check in checks]
        report = {
            "success": all(e["success"] for e in entries),
            "blocking_success": all(e["success"] for e in entries if e["blocking"]),
            "expectations": entries,
            "num_images": len(manifest),
            "num_errors": int(_column(manifest, "error").notna().sum()),
            "data_docs": f"{DOCS_DIR}/index.html",
            "great_expectations_version": gx.__version__,
        }
        write_json(tmp / "report.json", report)
        write_json(tmp / "metrics.json", _metrics(report))
        write_json(tmp / "config.json", to_dict(cfg))

    if not report["blocking_success"]:
        raise ValidationFailed(_failure_message(report, Path(out_dir)))
    return report


def _check_config(cfg: ValidateConfig) -> None:
    """Reject bounds that no dataset could meet, naming the params.yaml key."""
    if cfg.min_width > cfg.max_width:
        raise ConfigError("validate.min_width must not exceed validate.max_width")
    if cfg.min_height > cfg.max_height:
        raise ConfigError("validate.min_height must not exceed validate.max_height")
    if not 0.0 <= cfg.max_duplicate_fraction <= 1.0:
        raise ConfigError("validate.max_duplicate_fraction must be between 0 and 1")
    if cfg.max_imbalance_ratio < 1.0:
        raise ConfigError("validate.max_imbalance_ratio must be >= 1 (largest / smallest)")
    if not cfg.allowed_modes:
        raise ConfigError("validate.allowed_modes must list at least one PIL mode")


def read_manifest(path: Path) -> pd.DataFrame:
    """Read ``manifest.csv`` as written by ingest: text columns stay text (labels like "3").

    Only empty fields count as missing, so a class named "NA" or "None" stays a class.
    """
    if not path.is_file():
        raise DataError(f"{path}: manifest not found; run `imgclf ingest` to create the dataset")
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            header = pd.read_csv(fh, nrows=0).columns
        dtypes = {c: str for c in TEXT_COLUMNS if c in header}
        return pd.read_csv(path, dtype=dtypes, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV manifest: {exc}") from None


def _column(df: pd.DataFrame, name: str) -> pd.Series:
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
        _column(manifest, "path"),
        _column(manifest, "split"),
        _column(manifest, "label"),
    )
    sha = _column(manifest, "sha256")
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
        {"group": f"images/{s}/{c}/", "split": s, "label": c, "count": int(pairs.get((s, c), 0))}
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
        [{"group": f"images/{s}/", "split": s, "count": int(per_split.get(s, 0))} for s in SPLITS]
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


def _import_gx() -> Any:
    """Import GX quietly, with usage analytics off (it is slow to import, hence only here).

    GX logs hundreds of INFO lines about its own registries, which would drown the step's
    output under the CLI's INFO logging; its logger is raised to WARNING unless someone
    configured it already. Its import-time DeprecationWarnings are not ours to act on.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:
        gx_logger.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import great_expectations as gx

    return gx


def _context(gx: Any, docs_dir: Path) -> Any:
    """An in-memory GX context whose only Data Docs site is ``docs_dir``.

    Nothing is written to a ``gx/`` project folder, the cwd or a temp dir: the stores live in
    memory and the one docs site is inside the step's output dir. Progress bars are off so
    logs from DVC and KFP stay readable.
    """
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
        data_docs_sites={
            "imgclf": {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _run_suites(
    gx: Any, frames: dict[str, pd.DataFrame], checks: list[Check], docs_dir: Path
) -> dict[str, dict]:
    """Run one GX suite per frame, build Data Docs, return each check's result by name."""
    context = _context(gx, docs_dir)
    source = context.data_sources.add_pandas("imgclf_dataset")
    results: dict[str, dict] = {}
    for frame_name, key in FRAME_KEYS.items():
        batch = source.add_dataframe_asset(frame_name).add_batch_definition_whole_dataframe(
            "whole_frame"
        )
        suite = context.suites.add(gx.ExpectationSuite(name=frame_name))
        for check in checks:
            if check.frame == frame_name:
                suite.add_expectation(check.expectation)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=frame_name, data=batch, suite=suite)
        )
        outcome = definition.run(
            batch_parameters={"dataframe": frames[frame_name]},
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [key]},
        )
        for result in outcome.results:
            results[result.expectation_config.meta["name"]] = {
                "success": bool(result.success),
                "result": result.result or {},
                "exception": _exception_message(result.exception_info),
            }
    context.build_data_docs(site_names=["imgclf"])
    if not (docs_dir / "index.html").is_file():
        raise DataError(f"{docs_dir}: Great Expectations did not write index.html")
    return results


def _exception_message(info: Any) -> str | None:
    """The first error GX caught while computing an expectation (e.g. a missing column)."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message"))
    return None


def _plain(value: Any) -> Any:
    """JSON-safe copy of a GX result value (numpy scalars -> Python, NaN -> None)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _offending(
    check: Check, result: dict, frames: dict[str, pd.DataFrame], cfg: ValidateConfig
) -> list[str]:
    """All sorted manifest paths (or class/split folders) that made ``check`` fail."""
    if result["success"]:
        return []
    if check.name == "columns_match_contract":
        return ["manifest.csv"]
    if check.name == "class_imbalance_ratio":
        counts = frames["class_counts"]
        over = counts[counts["imbalance_ratio"] > cfg.max_imbalance_ratio]
        return sorted(over["group"])
    key = FRAME_KEYS[check.frame]
    rows = result["result"].get("unexpected_index_list") or []
    return sorted({str(row[key]) for row in rows if row.get(key) is not None})


def _observed(result: dict) -> Any:
    """What GX measured: the aggregate value, or counts of unexpected rows for row checks."""
    if result["exception"]:
        return {"error": result["exception"]}
    res = result["result"]
    if "observed_value" in res:
        return _plain(res["observed_value"])
    return _plain(
        {
            "element_count": res.get("element_count"),
            "unexpected_count": res.get("unexpected_count"),
            "unexpected_percent": round(float(res.get("unexpected_percent") or 0.0), 4),
        }
    )


def _report_entry(
    check: Check, result: dict, frames: dict[str, pd.DataFrame], cfg: ValidateConfig
) -> dict:
    """One ``report.json`` expectation record (offending files capped, with the total)."""
    offending = _offending(check, result, frames, cfg)
    return {
        "name": check.name,
        "description": check.description,
        "blocking": check.blocking,
        "success": result["success"],
        "observed_value": _observed(result),
        "offending_files": offending[:OFFENDING_LIMIT],
        "offending_count": len(offending),
        "expectation_type": check.expectation.expectation_type,
    }


def _metrics(report: dict) -> dict:
    """Flat numbers for ``dvc metrics`` and KFP (booleans as 0/1)."""
    entries = report["expectations"]
    failed = sum(1 for e in entries if not e["success"])
    return {
        "num_images": report["num_images"],
        "num_errors": report["num_errors"],
        "expectations_total": len(entries),
        "expectations_failed": failed,
        "num_failed": failed,
        "blocking_failed": sum(1 for e in entries if e["blocking"] and not e["success"]),
        "success": int(report["success"]),
        "blocking_success": int(report["blocking_success"]),
    }


def _failure_message(report: dict, out_dir: Path) -> str:
    """``validate failed: name: file, file (+N more); ...`` for the failed blocking checks."""
    parts = []
    for e in report["expectations"]:
        if e["blocking"] and not e["success"]:
            files = e["offending_files"]
            if files:
                more = e["offending_count"] - FILES_IN_MESSAGE
                detail = ", ".join(files[:FILES_IN_MESSAGE]) + (
                    f" (+{more} more)" if more > 0 else ""
                )
            else:
                detail = f"observed {e['observed_value']}"
            parts.append(f"{e['name']}: {detail}")
    return f"validate failed: {'; '.join(parts)} (report: {out_dir / 'report.json'})"
