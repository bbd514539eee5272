"""``imgclf pipeline ...``: compile, upload, run, schedule and list the Kubeflow pipeline.

Handlers only read flags, print, and call :mod:`imgclf.kfp`. Everything that can be
checked without the server (cron syntax, parameter names and types, the package file) is
checked before connecting, so a typo never costs a request, let alone a cluster run.

The training DAG comes from the ``training`` entry point of the ``imgclf.pipelines`` group
(``pipelines.training_pipeline:build_pipeline``): the library under ``imgclf.kfp`` takes the
pipeline as an argument and never imports ``pipelines/``, which is built on it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgclf.cli import add_params_flag, pipeline_local
from imgclf.cli.helptext import add_command
from imgclf.cli.output import format_table
from imgclf.errors import ConfigError
from imgclf.kfp.client import (
    DEFAULT_EXPERIMENT,
    DEFAULT_PIPELINE_NAME,
    TERMINAL_STATES,
    KfpSession,
    PipelineSource,
    RunInfo,
)
from imgclf.kfp.connection import DEFAULT_HOST, resolve_connection
from imgclf.kfp.cron import validate_cron
from imgclf.kfp.local import DEFAULT_LOCAL_REGISTRY, DEFAULT_LOCAL_ROOT, LOCAL_SOURCE
from imgclf.kfp.package import DEFAULT_PACKAGE, compile_pipeline, load_package, package_digest
from imgclf.kfp.params import parse_params, parse_timestamp

if TYPE_CHECKING:
    from kfp.dsl.graph_component import GraphComponent

PIPELINES_GROUP = "imgclf.pipelines"
TRAINING_ENTRY_POINT = "training"


def _training_pipeline(args: argparse.Namespace) -> GraphComponent:
    """The training DAG, built from ``--params`` by the builder registered as an entry point."""
    found = entry_points(group=PIPELINES_GROUP, name=TRAINING_ENTRY_POINT)
    if not found:
        raise ConfigError(
            f"no {TRAINING_ENTRY_POINT!r} pipeline among the {PIPELINES_GROUP} entry points; "
            "reinstall with `pip install -e .`"
        )
    build = next(iter(found)).load()
    return build(params_path=args.params)


def _connection_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument(
        "--host",
        help="KFP API URL (default: $KFP_HOST, in-cluster inside a pod, else "
        f"{DEFAULT_HOST} as served by `kubectl port-forward -n kubeflow "
        "svc/ml-pipeline-ui 8080:80`)",
    )
    g.add_argument("--namespace", help="profile namespace on multi-user KFP ($KFP_NAMESPACE)")
    g.add_argument(
        "--token-file",
        help="file holding a bearer token (default: $KFP_TOKEN; in-cluster: service account)",
    )
    return p


def _params_file_flag(p: argparse.ArgumentParser) -> None:
    add_params_flag(p, "sections give the pipeline's run defaults and cluster settings")


def _source_flags(p: argparse.ArgumentParser) -> None:
    _params_file_flag(p)
    p.add_argument(
        "--package",
        help="compiled pipeline YAML (default: compile the training pipeline to "
        f"{DEFAULT_PACKAGE} first)",
    )
    p.add_argument("--pipeline-id", help="run an uploaded pipeline instead of a package")
    p.add_argument("--version-id", help="version of --pipeline-id (default: its newest version)")


def _param_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--param",
        dest="param_pairs",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="pipeline input, typed from the pipeline's spec (repeatable)",
    )
    p.add_argument(
        "--experiment",
        default=DEFAULT_EXPERIMENT,
        help="experiment to file the run under, created if missing (default: %(default)s)",
    )
    p.add_argument("--pipeline-root", help="artifact root for this run (e.g. s3://bucket/kfp)")


def _session(args: argparse.Namespace) -> KfpSession:
    conn = resolve_connection(args.host, args.namespace, args.token_file)
    return KfpSession.open(conn)


def _package(args: argparse.Namespace) -> Path:
    """``--package`` as given, or a fresh compile so what is sent matches the code."""
    if args.package:
        return Path(args.package)
    path = compile_pipeline(_training_pipeline(args), DEFAULT_PACKAGE)
    print(f"compiled {path}")
    return path


def _prepare_source(
    args: argparse.Namespace,
) -> tuple[PipelineSource, dict[str, Any] | None]:
    """The run's pipeline source and, for a package, its spec (checked before connecting)."""
    if args.pipeline_id or args.version_id:
        if args.package:
            raise ConfigError("give either --package or --pipeline-id, not both")
        return PipelineSource(pipeline_id=args.pipeline_id, version_id=args.version_id), None
    package = _package(args)
    spec = load_package(package)
    return PipelineSource(package=package), spec


def _remote_params(
    session: KfpSession, source: PipelineSource, pairs: list[str]
) -> tuple[PipelineSource, dict[str, Any]]:
    """Pin an uploaded pipeline to one version and type ``pairs`` by that version's spec."""
    pipeline_id = str(source.pipeline_id)
    version_id = source.version_id or session.latest_version(pipeline_id)[0]
    pinned = PipelineSource(pipeline_id=pipeline_id, version_id=version_id)
    if not pairs:
        return pinned, {}
    return pinned, parse_params(pairs, session.version_spec(pipeline_id, version_id))


def _compile(args: argparse.Namespace) -> int:
    path = compile_pipeline(_training_pipeline(args), args.out)
    print(f"compiled {path} (sha256 {package_digest(path)})")
    return 0


def _upload(args: argparse.Namespace) -> int:
    package = _package(args)
    load_package(package)
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


def _progress_printer() -> Callable[[RunInfo, float], None]:
    """A progress line: rewritten in place on a terminal, one line per change otherwise."""
    tty = sys.stderr.isatty()
    last: list[str] = []

    def show(info: RunInfo, elapsed: float) -> None:
        line = f"run {info.run_id} {info.state} ({elapsed:.0f}s)"
        if tty:
            end = "\n" if info.state in TERMINAL_STATES else ""
            print(f"\r{line}\033[K", end=end, file=sys.stderr, flush=True)
        elif last != [info.state]:
            print(line, file=sys.stderr, flush=True)
        last[:] = [info.state]

    return show


def _run(args: argparse.Namespace) -> int:
    if args.local:
        return pipeline_local.run(args, _training_pipeline)
    source, spec = _prepare_source(args)
    params = parse_params(args.param_pairs, spec) if spec is not None else None
    session = _session(args)
    if params is None:
        source, params = _remote_params(session, source, args.param_pairs)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    run_name = args.run_name or f"{DEFAULT_PIPELINE_NAME} {stamp}"
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
    cron = validate_cron(args.cron)
    start = parse_timestamp(args.start, "--start") if args.start else None
    end = parse_timestamp(args.end, "--end") if args.end else None
    if start and end and end <= start:
        raise ConfigError(f"--end {args.end} is not after --start {args.start}")
    source, spec = _prepare_source(args)
    params = parse_params(args.param_pairs, spec) if spec is not None else None
    session = _session(args)
    if params is None:
        source, params = _remote_params(session, source, args.param_pairs)
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
    p.add_argument("--name", default=f"{DEFAULT_PIPELINE_NAME}-nightly")
    p.add_argument("--start", help="first time it may fire (ISO 8601; naive means UTC)")
    p.add_argument("--end", help="last time it may fire (ISO 8601; naive means UTC)")
    _source_flags(p)
    _param_flags(p)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``imgclf pipeline`` and its subcommands to the ``imgclf`` parser."""
    conn = _connection_flags()
    top = add_command(
        sub,
        "pipeline",
        "Compile, upload, run and schedule the Kubeflow training pipeline.",
        [
            (
                "the real DAG on this machine, each task a local process",
                "imgclf pipeline run --local",
            ),
            ("compile, upload and run on the KFP server, and wait", "imgclf pipeline run --wait"),
        ],
        description="Compile the KFP training pipeline and drive it on a KFP API server "
        "(REST v2beta1), or run the same DAG locally with --local.",
    )
    cmds = top.add_subparsers(dest="pipeline_command", metavar="<subcommand>", required=True)

    p = add_command(
        cmds,
        "compile",
        "Compile the training pipeline to YAML.",
        [
            (
                "writes pipelines/training_pipeline.yaml, prints its sha256",
                "imgclf pipeline compile",
            ),
            ("somewhere else", "imgclf pipeline compile --out build/training_pipeline.yaml"),
        ],
    )
    p.add_argument("--out", default=str(DEFAULT_PACKAGE), help="(default: %(default)s)")
    _params_file_flag(p)
    p.set_defaults(func=_compile)

    p = add_command(
        cmds,
        "upload",
        "Upload the package as a new pipeline, or a new version of one.",
        [
            (
                "compile, then upload to KFP port-forwarded to localhost:8080",
                "imgclf pipeline upload --host http://localhost:8080",
            ),
            (
                "a package compiled before, under another name",
                "imgclf pipeline upload --package build/training_pipeline.yaml --name my-training",
            ),
        ],
        parents=[conn],
    )
    p.add_argument("--name", default=DEFAULT_PIPELINE_NAME, help="(default: %(default)s)")
    p.add_argument("--version", help="name of the new version (default: <name>-<time>-<sha>)")
    p.add_argument("--description")
    p.add_argument(
        "--package",
        help=f"compiled pipeline YAML (default: compile to {DEFAULT_PACKAGE} first)",
    )
    _params_file_flag(p)
    p.set_defaults(func=_upload)

    p = add_command(
        cmds,
        "run",
        "Start one run on a KFP server, or run the DAG here with --local.",
        [
            (
                "retrain here even though the data did not change",
                "imgclf pipeline run --local --param force=true",
            ),
            (
                "an uploaded pipeline, 4 epochs, waiting for the end (PIPELINE_ID is yours)",
                "imgclf pipeline run --pipeline-id PIPELINE_ID --param epochs=4 --wait",
            ),
        ],
        parents=[conn],
    )
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
        f"--pipeline-root, default {DEFAULT_LOCAL_ROOT}); source defaults to "
        f"{LOCAL_SOURCE} and registry_uri to {DEFAULT_LOCAL_REGISTRY}; `imgclf -v` "
        "streams the task logs",
    )
    p.set_defaults(func=_run)

    sched = add_command(
        cmds,
        "schedule",
        "Create and manage recurring runs (cron, seconds first).",
        [
            (
                "a run at 02:00 every day (PIPELINE_ID is yours)",
                'imgclf pipeline schedule --pipeline-id PIPELINE_ID --cron "0 0 2 * * *"',
            ),
            ("the recurring runs there are", "imgclf pipeline schedule list"),
        ],
        description="Create and manage recurring runs (cron, seconds first). "
        "`schedule --cron ...` is short for `schedule create --cron ...`.",
        parents=[conn],
    )
    _schedule_create_flags(sched, required=False)
    sched.set_defaults(func=_schedule_create)
    scmds = sched.add_subparsers(dest="schedule_command", metavar="<action>", required=False)
    p = add_command(
        scmds,
        "create",
        "Create a recurring run: one run at a time, no catch-up.",
        [
            (
                "a run at 02:00 every day (PIPELINE_ID is yours)",
                'imgclf pipeline schedule create --pipeline-id PIPELINE_ID --cron "0 0 2 * * *"',
            ),
        ],
        parents=[conn],
    )
    _schedule_create_flags(p, required=True)
    p.set_defaults(func=_schedule_create)
    for action, func, text in (
        ("enable", _schedule_toggle, "Enable a recurring run."),
        ("disable", _schedule_toggle, "Disable a recurring run (keeps it and its runs)."),
        ("delete", _schedule_delete, "Delete a recurring run."),
    ):
        example = (
            "RUN_ID: an id `imgclf pipeline schedule list` shows",
            f"imgclf pipeline schedule {action} RUN_ID",
        )
        p = add_command(scmds, action, text, [example], parents=[conn])
        p.add_argument("id", help="recurring run id (see `imgclf pipeline schedule list`)")
        p.set_defaults(func=func)
    p = add_command(
        scmds,
        "list",
        "List recurring runs.",
        [
            ("every recurring run", "imgclf pipeline schedule list"),
            ("those of one experiment", "imgclf pipeline schedule list --experiment imgclf"),
        ],
        parents=[conn],
    )
    p.add_argument("--experiment", help="only this experiment's recurring runs")
    p.add_argument("--limit", type=_positive, default=50, help="(default: %(default)s)")
    p.set_defaults(func=_schedule_list)

    p = add_command(
        cmds,
        "runs",
        "List recent runs with their state.",
        [
            ("the 20 newest runs", "imgclf pipeline runs"),
            (
                "the 5 newest of one experiment",
                "imgclf pipeline runs --experiment imgclf --limit 5",
            ),
        ],
        parents=[conn],
    )
    p.add_argument("--experiment", help="only this experiment's runs")
    p.add_argument("--limit", type=_positive, default=20, help="(default: %(default)s)")
    p.set_defaults(func=_runs)
