"""``imgclf pipeline ...``: compile, upload, run, schedule and list the Kubeflow pipeline.

Handlers only read flags, print, and call :mod:`imgclf.kfp.client`. Everything that can be
checked without the server (cron syntax, parameter names and types, the package file) is
checked before connecting, so a typo never costs a request, let alone a cluster run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imgclf.cli.output import format_table
from imgclf.errors import ConfigError
from imgclf.kfp import client as kc


def _connection_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument(
        "--host",
        help="KFP API URL (default: $KFP_HOST, in-cluster inside a pod, else "
        f"{kc.DEFAULT_HOST} as served by `kubectl port-forward -n kubeflow "
        "svc/ml-pipeline-ui 8080:80`)",
    )
    g.add_argument("--namespace", help="profile namespace on multi-user KFP ($KFP_NAMESPACE)")
    g.add_argument(
        "--token-file",
        help="file holding a bearer token (default: $KFP_TOKEN; in-cluster: service account)",
    )
    return p


def _source_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--package",
        help="compiled pipeline YAML (default: compile the training pipeline to "
        f"{kc.DEFAULT_PACKAGE} first)",
    )
    p.add_argument("--pipeline-id", help="run an uploaded pipeline instead of a package")
    p.add_argument("--version-id", help="version of --pipeline-id (default: its newest version)")


def _param_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--param",
        dest="params",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="pipeline input, typed from the pipeline's spec (repeatable)",
    )
    p.add_argument(
        "--experiment",
        default=kc.DEFAULT_EXPERIMENT,
        help="experiment to file the run under, created if missing (default: %(default)s)",
    )
    p.add_argument("--pipeline-root", help="artifact root for this run (e.g. s3://bucket/kfp)")


def _session(args: argparse.Namespace) -> kc.KfpSession:
    conn = kc.resolve_connection(args.host, args.namespace, args.token_file)
    return kc.KfpSession.open(conn)


def _package(args: argparse.Namespace) -> Path:
    """``--package`` as given, or a fresh compile so what is sent matches the code."""
    if args.package:
        return Path(args.package)
    path = kc.compile_training_pipeline(kc.DEFAULT_PACKAGE)
    print(f"compiled {path}")
    return path


def _prepare_source(
    args: argparse.Namespace,
) -> tuple[kc.PipelineSource, dict[str, Any] | None]:
    """The run's pipeline source and, for a package, its spec (checked before connecting)."""
    if args.pipeline_id or args.version_id:
        if args.package:
            raise ConfigError("give either --package or --pipeline-id, not both")
        return kc.PipelineSource(pipeline_id=args.pipeline_id, version_id=args.version_id), None
    package = _package(args)
    spec = kc.load_package(package)
    return kc.PipelineSource(package=package), spec


def _remote_params(
    session: kc.KfpSession, source: kc.PipelineSource, pairs: list[str]
) -> tuple[kc.PipelineSource, dict[str, Any]]:
    """Pin an uploaded pipeline to one version and type ``pairs`` by that version's spec."""
    pipeline_id = str(source.pipeline_id)
    version_id = source.version_id or session.latest_version(pipeline_id)[0]
    pinned = kc.PipelineSource(pipeline_id=pipeline_id, version_id=version_id)
    if not pairs:
        return pinned, {}
    return pinned, kc.parse_params(pairs, session.version_spec(pipeline_id, version_id))


def _compile(args: argparse.Namespace) -> int:
    path = kc.compile_training_pipeline(args.out)
    print(f"compiled {path} (sha256 {kc.package_digest(path)})")
    return 0


def _upload(args: argparse.Namespace) -> int:
    package = _package(args)
    kc.load_package(package)
    session = _session(args)
    result = session.upload(
        package, name=args.name, version=args.version, description=args.description
    )
    what = "new pipeline" if result.new_pipeline else "new version of"
    print(f"uploaded {package} as {what} {args.name!r}")
    print(f"  pipeline id: {result.pipeline_id}")
    print(f"  version id:  {result.version_id} ({result.version_name})")
    if result.new_pipeline and args.version:
        print(f"  note: a new pipeline's first version is named {result.version_name!r}")
    print(
        "run it with: imgclf pipeline run "
        f"--pipeline-id {result.pipeline_id} --version-id {result.version_id}"
    )
    return 0


def _progress_printer() -> Callable[[kc.RunInfo, float], None]:
    """A progress line: rewritten in place on a terminal, one line per change otherwise."""
    tty = sys.stderr.isatty()
    last: list[str] = []

    def show(info: kc.RunInfo, elapsed: float) -> None:
        line = f"run {info.run_id} {info.state} ({elapsed:.0f}s)"
        if tty:
            end = "\n" if info.state in kc.TERMINAL_STATES else ""
            print(f"\r{line}\033[K", end=end, file=sys.stderr, flush=True)
        elif last != [info.state]:
            print(line, file=sys.stderr, flush=True)
        last[:] = [info.state]

    return show


def _task_printer(out: Any) -> Callable[[kc.TaskEvent], None]:
    """One line per task start, end or skip, written to ``out`` (the real stdout)."""
    width = max(len(t) for t in kc.TRAINING_TASKS)

    def show(event: kc.TaskEvent) -> None:
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
        ("inference_service", "kserve yaml"),
    ):
        if summary[key]:
            print(f"  {label + ':':<15} {summary[key]}")
    print(f"  log:            {result['log']}")


def _run_local(args: argparse.Namespace) -> int:
    if args.package or args.pipeline_id or args.version_id:
        raise ConfigError(
            "--local runs the pipeline function in this process; --package, --pipeline-id "
            "and --version-id only apply to runs on a KFP server"
        )
    root = Path(args.pipeline_root or kc.DEFAULT_LOCAL_ROOT)
    print(
        f"running {kc.DEFAULT_PIPELINE_NAME} locally with kfp.local's SubprocessRunner; "
        f"pipeline root {root.resolve()}",
        flush=True,
    )
    result = kc.run_local_training(
        args.params,
        pipeline_root=root,
        on_task=_task_printer(sys.stdout),
        echo=sys.stdout if getattr(args, "verbose", False) else None,
    )
    _print_training_summary(result)
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.local:
        return _run_local(args)
    source, spec = _prepare_source(args)
    params = kc.parse_params(args.params, spec) if spec is not None else None
    session = _session(args)
    if params is None:
        source, params = _remote_params(session, source, args.params)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    run_name = args.run_name or f"{kc.DEFAULT_PIPELINE_NAME} {stamp}"
    run = session.submit_run(
        source,
        experiment=args.experiment,
        run_name=run_name,
        params=params,
        pipeline_root=args.pipeline_root,
    )
    print(f"started run {run.name!r}: {run.run_id}")
    if not args.wait:
        return 0
    final = session.wait_for_run(
        run.run_id,
        timeout=args.timeout,
        poll_interval=args.poll_interval,
        on_progress=_progress_printer(),
    )
    print(f"run {final.run_id} {final.state}")
    return 0


def _schedule_create(args: argparse.Namespace) -> int:
    if not args.cron:
        raise ConfigError(
            'imgclf pipeline schedule needs --cron (6 fields, seconds first, e.g. "0 0 2 * * *") '
            "or an action: create, enable, disable, delete, list"
        )
    cron = kc.validate_cron(args.cron)
    start = kc.parse_timestamp(args.start, "--start") if args.start else None
    end = kc.parse_timestamp(args.end, "--end") if args.end else None
    if start and end and end <= start:
        raise ConfigError(f"--end {args.end} is not after --start {args.start}")
    source, spec = _prepare_source(args)
    params = kc.parse_params(args.params, spec) if spec is not None else None
    session = _session(args)
    if params is None:
        source, params = _remote_params(session, source, args.params)
    created = session.create_schedule(
        source,
        cron=cron,
        name=args.name,
        experiment=args.experiment,
        params=params,
        start=start,
        end=end,
        pipeline_root=args.pipeline_root,
    )
    print(
        f"created recurring run {created.name!r}: {created.recurring_run_id} "
        f'(cron "{created.cron}", {created.status}, one run at a time, no catch-up)'
    )
    return 0


def _schedule_toggle(args: argparse.Namespace) -> int:
    enabled = args.schedule_command == "enable"
    _session(args).set_schedule_enabled(args.id, enabled)
    print(f"{'enabled' if enabled else 'disabled'} recurring run {args.id}")
    return 0


def _schedule_delete(args: argparse.Namespace) -> int:
    _session(args).delete_schedule(args.id)
    print(f"deleted recurring run {args.id}")
    return 0


def _schedule_list(args: argparse.Namespace) -> int:
    found = _session(args).list_schedules(experiment=args.experiment, limit=args.limit)
    if not found:
        print("no recurring runs")
        return 0
    print(
        format_table(
            ("ID", "NAME", "STATUS", "CRON", "CREATED"),
            [(s.recurring_run_id, s.name, s.status, s.cron, s.created_at) for s in found],
        )
    )
    return 0


def _runs(args: argparse.Namespace) -> int:
    found = _session(args).list_runs(experiment=args.experiment, limit=args.limit)
    if not found:
        print("no runs")
        return 0
    print(
        format_table(
            ("ID", "NAME", "STATE", "CREATED", "FINISHED"),
            [(r.run_id, r.name, r.state, r.created_at, r.finished_at) for r in found],
        )
    )
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _schedule_create_flags(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument(
        "--cron",
        required=required,
        help='6 fields, seconds first: "0 0 2 * * *" is 02:00 every day',
    )
    p.add_argument("--name", default=f"{kc.DEFAULT_PIPELINE_NAME}-nightly")
    p.add_argument("--start", help="first time it may fire (ISO 8601; naive means UTC)")
    p.add_argument("--end", help="last time it may fire (ISO 8601; naive means UTC)")
    _source_flags(p)
    _param_flags(p)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``imgclf pipeline`` and its subcommands to the ``imgclf`` parser."""
    conn = _connection_flags()
    top = sub.add_parser(
        "pipeline",
        help="compile, upload, run and schedule the Kubeflow training pipeline",
        description="Compile the KFP training pipeline and drive it on a KFP API server "
        "(REST v2beta1), or run the same DAG locally with --local.",
    )
    cmds = top.add_subparsers(dest="pipeline_command", metavar="<subcommand>", required=True)

    p = cmds.add_parser("compile", help="compile the training pipeline to YAML")
    p.add_argument("--out", default=str(kc.DEFAULT_PACKAGE), help="(default: %(default)s)")
    p.set_defaults(func=_compile)

    p = cmds.add_parser(
        "upload",
        parents=[conn],
        help="upload the package as a new pipeline, or a new version of an existing one",
    )
    p.add_argument("--name", default=kc.DEFAULT_PIPELINE_NAME, help="(default: %(default)s)")
    p.add_argument("--version", help="name of the new version (default: <name>-<time>-<sha>)")
    p.add_argument("--description")
    p.add_argument(
        "--package",
        help=f"compiled pipeline YAML (default: compile to {kc.DEFAULT_PACKAGE} first)",
    )
    p.set_defaults(func=_upload)

    p = cmds.add_parser("run", parents=[conn], help="start one run (or run locally with --local)")
    _source_flags(p)
    _param_flags(p)
    p.add_argument("--run-name", help="(default: imgclf-training <UTC time>)")
    p.add_argument("--wait", action="store_true", help="poll until the run ends; fail if it did")
    p.add_argument(
        "--timeout", type=float, default=6 * 3600, help="seconds --wait waits (default: 6h)"
    )
    p.add_argument(
        "--poll-interval", type=float, default=5.0, help="seconds between polls (default: 5)"
    )
    p.add_argument(
        "--local",
        action="store_true",
        help="run the DAG here with kfp.local's SubprocessRunner (outputs under "
        f"--pipeline-root, default {kc.DEFAULT_LOCAL_ROOT}); source defaults to "
        f"{kc.LOCAL_SOURCE} and registry_uri to {kc.DEFAULT_LOCAL_REGISTRY}; `imgclf -v` "
        "streams the task logs",
    )
    p.set_defaults(func=_run)

    sched = cmds.add_parser(
        "schedule",
        parents=[conn],
        help="recurring runs (cron, seconds first)",
        description="`schedule --cron ...` is short for `schedule create --cron ...`.",
    )
    _schedule_create_flags(sched, required=False)
    sched.set_defaults(func=_schedule_create)
    scmds = sched.add_subparsers(dest="schedule_command", metavar="<action>", required=False)
    p = scmds.add_parser(
        "create",
        parents=[conn],
        help="create a recurring run: one run at a time, no catch-up",
    )
    _schedule_create_flags(p, required=True)
    p.set_defaults(func=_schedule_create)
    for action, func, text in (
        ("enable", _schedule_toggle, "enable a recurring run"),
        ("disable", _schedule_toggle, "disable a recurring run (keeps it and its runs)"),
        ("delete", _schedule_delete, "delete a recurring run"),
    ):
        p = scmds.add_parser(action, parents=[conn], help=text)
        p.add_argument("id", help="recurring run id (see `imgclf pipeline schedule list`)")
        p.set_defaults(func=func)
    p = scmds.add_parser("list", parents=[conn], help="list recurring runs")
    p.add_argument("--experiment", help="only this experiment's recurring runs")
    p.add_argument("--limit", type=_positive, default=50, help="(default: %(default)s)")
    p.set_defaults(func=_schedule_list)

    p = cmds.add_parser("runs", parents=[conn], help="list recent runs with their state")
    p.add_argument("--experiment", help="only this experiment's runs")
    p.add_argument("--limit", type=_positive, default=20, help="(default: %(default)s)")
    p.set_defaults(func=_runs)
