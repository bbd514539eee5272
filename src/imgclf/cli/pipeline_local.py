"""``imgclf pipeline run --local``: the training DAG under kfp.local, one line per task.

Kept apart from :mod:`imgclf.cli.pipeline` (the KFP server commands) because a local run
reports differently: task events as they happen, then what the run decided.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgclf.errors import ConfigError
from imgclf.kfp.client import DEFAULT_PIPELINE_NAME
from imgclf.kfp.local import DEFAULT_LOCAL_ROOT, TRAINING_TASKS, TaskEvent, run_local_training

if TYPE_CHECKING:
    from kfp.dsl.graph_component import GraphComponent


def _task_printer(out: Any) -> Callable[[TaskEvent], None]:
    """One line per task start, end or skip, written to ``out`` (the real stdout)."""
    width = max(len(t) for t in TRAINING_TASKS)

    def show(event: TaskEvent) -> None:
        label = f"[{event.task}]".ljust(width + 2)
        if event.state == "RUNNING":
            text = "running"
        elif event.state == "SKIPPED":
            text = f"skipped ({event.reason})" if event.reason else "skipped"
        elif event.seconds is not None:
            text = f"{event.state} in {event.seconds:.1f}s"
        else:
            text = event.state
        out.write(f"{label} {text}\n")
        out.flush()

    return show


def _print_training_summary(result: dict[str, Any]) -> None:
    summary = result["summary"]
    params = result["inputs"]
    print(
        f"local run of {result['pipeline']} SUCCEEDED in {result['seconds']:.0f}s; "
        f"outputs under {summary['run_dir']}"
    )
    if summary["retrain"] is False:
        print(f"{summary['reason']}")
        print("train, evaluate and deploy were skipped; pass --param force=true to retrain anyway")
    elif summary["reason"]:
        print(f"  retrain:        {summary['reason']}")
    if summary["accuracy"] is not None:
        loss = f" (loss {summary['loss']:.4f})" if summary["loss"] is not None else ""
        print(f"  test accuracy:  {summary['accuracy']:.4f}{loss}")
    if summary["passed"] is not None:
        verdict = "passed" if summary["passed"] else "FAILED (not deployed)"
        print(f"  quality gate:   {verdict}")
        for reason in summary["gate_reasons"]:
            print(f"    {reason}")
    if summary["version"] is not None:
        alias = f"{params.get('model_name')} {params.get('registry_alias')}"
        state = "promoted" if summary["promoted"] else "not promoted"
        version = summary["version"] or "none"
        print(f"  registry:       {alias} -> version {version} ({state})")
    print(f"  registry uri:   {params.get('registry_uri')}")
    for key, label in (
        ("model", "model"),
        ("evaluation", "evaluation"),
        ("training_curves", "curves html"),
        ("misclassified", "misclassified"),
        ("inference_service", "kserve yaml"),
    ):
        if summary[key]:
            print(f"  {label + ':':<15} {summary[key]}")
    print(f"  log:            {result['log']}")


def run(args: argparse.Namespace, build: Callable[[argparse.Namespace], GraphComponent]) -> int:
    """``imgclf pipeline run --local``: the DAG ``build(args)`` makes, under kfp.local."""
    if args.package or args.pipeline_id or args.version_id:
        raise ConfigError(
            "--local runs the pipeline function in this process; --package, --pipeline-id "
            "and --version-id only apply to runs on a KFP server"
        )
    root = Path(args.pipeline_root or DEFAULT_LOCAL_ROOT)
    print(
        f"running {DEFAULT_PIPELINE_NAME} locally with kfp.local's SubprocessRunner; "
        f"pipeline root {root.resolve()}",
        flush=True,
    )
    result = run_local_training(
        build(args),
        args.param_pairs,
        pipeline_root=root,
        on_task=_task_printer(sys.stdout),
        echo=sys.stdout if getattr(args, "verbose", False) else None,
    )
    _print_training_summary(result)
    return 0
