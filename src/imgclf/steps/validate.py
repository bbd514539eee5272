"""Validate step: a Great Expectations suite over the dataset manifest, before any training.

Bad data is cheaper to catch here than after an hour on a GPU: undecodable or empty files,
images outside the size bounds, unknown colour modes, a single class (every model scores 100%
on it), a class missing from a split, too few images per class or split, the same image in
train and test (leakage inflates test accuracy), duplicate images and class
imbalance. Every check is a real GX expectation run in an ephemeral (in-memory) context, so the
Data Docs that GX renders show exactly what decided the step. What is checked (the derived
frames and the expectations) lives in :mod:`imgclf.steps.validate_suite`; this module runs
the suite and writes what it found.

Outputs (one atomic dir): ``report.json`` (per expectation: name, description, blocking,
success, observed value, first 20 offending files), ``data_docs/index.html``,
``metrics.json`` (numbers for DVC / KFP) and ``config.json``. A failed blocking expectation
raises :class:`~imgclf.errors.ValidationFailed` after those files are in place, so the
report and docs are there to read when the pipeline stops.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from imgclf.config import ValidateConfig, to_dict
from imgclf.contracts import (
    MANIFEST_COLUMNS,
    MANIFEST_FILE,
    MANIFEST_NUMERIC_COLUMNS,
    METRICS_FILE,
    manifest_file,
)
from imgclf.errors import DataError, ValidationFailed
from imgclf.fsutil import atomic_dir, write_json
from imgclf.steps.validate_suite import FRAME_KEYS, Check, build_checks, build_frames, column

log = logging.getLogger(__name__)

DOCS_DIR = "data_docs"
OFFENDING_LIMIT = 20
FILES_IN_MESSAGE = 3


def run(cfg: ValidateConfig, *, dataset_dir: Path, out_dir: Path) -> dict:
    """Validate ``dataset_dir/manifest.csv``; write report, Data Docs and metrics to ``out_dir``.

    Returns the ``report.json`` content. Raises :class:`ValidationFailed` (after the outputs
    are written) when a blocking expectation fails and :class:`DataError` when there is no
    readable manifest. Impossible bounds never get here: :class:`ValidateConfig` refuses them.
    """
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest_frame(dataset_dir)
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
            "num_errors": int(column(manifest, "error").notna().sum()),
            "data_docs": f"{DOCS_DIR}/index.html",
            "great_expectations_version": gx.__version__,
        }
        write_json(tmp / "report.json", report)
        write_json(tmp / METRICS_FILE, _metrics(report))
        write_json(tmp / "config.json", to_dict(cfg))

    if not report["blocking_success"]:
        raise ValidationFailed(_failure_message(report, Path(out_dir)))
    return report


def read_manifest_frame(dataset_dir: Path) -> pd.DataFrame:
    """Read ``manifest.csv`` as a frame: text columns stay text (labels like "3").

    Only empty fields count as missing, so a class named "NA" or "None" stays a class.
    """
    path = manifest_file(dataset_dir)
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            header = pd.read_csv(fh, nrows=0).columns
        text = (c for c in MANIFEST_COLUMNS if c not in MANIFEST_NUMERIC_COLUMNS)
        dtypes = {c: str for c in text if c in header}
        return pd.read_csv(path, dtype=dtypes, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV manifest: {exc}") from None


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
        return [MANIFEST_FILE]
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
