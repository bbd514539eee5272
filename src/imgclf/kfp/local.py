"""A pipeline on this machine: ``kfp.local``'s SubprocessRunner, with task events.

The same DAG as on the cluster, each task a subprocess of this Python. What kfp.local's API
returns is used where it exists: the pipeline's own outputs come back as the result of the
pipeline call, and each task's output parameters are read from the ExecutorOutput file
(``executor_output.json``) the task wrote. kfp.local has no API for progress, so its log
lines are parsed for what it gives nowhere else: which task started, how it finished, which
were skipped (and why), and the failed task's last words.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from imgclf.contracts import EVAL_REPORT_FILE, METRICS_FILE
from imgclf.kfp.errors import RunFailed
from imgclf.kfp.local_patches import capture_run_output, conditions_on_named_outputs
from imgclf.kfp.params import parse_params

if TYPE_CHECKING:
    from kfp.dsl.graph_component import GraphComponent

DEFAULT_LOCAL_ROOT = Path("out/kfp_root")
LOCAL_SOURCE = "sample:digits"
DEFAULT_LOCAL_REGISTRY = Path("out/kfp_registry")
DEFAULT_LOCAL_CHECKPOINTS = Path("out/kfp_checkpoints")
# Run parameters that may name a file or folder on this machine: kfp.local runs each task in
# a subprocess, so a relative path must not depend on where the task happens to start.
LOCAL_PATH_PARAMS: dict[str, frozenset[str]] = {
    "source": frozenset(),
    "registry_uri": frozenset(),
    "checkpoint_root": frozenset({""}),
    "pretrained": frozenset({"none", "imagenet"}),
}
TRAINING_TASKS = ("ingest", "validate", "check-retrain", "train", "evaluate", "deploy")

_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# kfp.local reports progress only as log lines, so these are read (as kfp 2.17 words them;
# tests/dag/test_pipeline_local.py runs them). Its own lines use logging_utils'
# "HH:MM:SS.mmm - LEVEL - message" format, and task output is printed indented, so a
# component cannot fake one. The "Skipping" lines go through the root logger, which
# capture_run_output formats as "LEVEL message".
_KFP_LINE = r"^\d\d:\d\d:\d\d\.\d+ - [A-Z]+ - "
_TASK_START = re.compile(_KFP_LINE + r"Executing task '(?P<task>[^']+)'")
_TASK_END = re.compile(_KFP_LINE + r"Task '(?P<task>[^']+)' finished with status (?P<status>\w+)")
_CONDITION_SKIPPED = re.compile(r"^INFO Skipping conditional task (?P<task>\S+)")
_UPSTREAM_SKIPPED = re.compile(r"^INFO Skipping task (?P<task>[^:\s]+): upstream")
_KFP_STATUS = {"SUCCESS": "SUCCEEDED", "FAILURE": "FAILED"}


@dataclasses.dataclass(frozen=True)
class TaskEvent:
    """A task of a local run started (RUNNING), ended, or was skipped by a condition."""

    task: str
    state: str
    seconds: float | None = None
    reason: str | None = None


def absolute_local_path(value: str, keywords: frozenset[str] = frozenset()) -> str:
    """``value`` as an absolute path if it is a relative local path, else unchanged.

    URIs (``sample:digits``, ``s3://...``, ``file://...``), the empty string and ``keywords``
    (``none``/``imagenet`` for ``pretrained``) are not paths and are kept as given.
    """
    if not value or value in keywords or _URI_SCHEME.match(value):
        return value
    return str(Path(value).expanduser().resolve())


class _LocalRunLog:
    """Stands in for stdout during a kfp.local run: files every line, reports task events.

    kfp.local prints its progress and each task's streamed output to ``sys.stdout``; this
    writes all of it (colour codes removed) to the run's log file, optionally echoes it, and
    turns kfp.local's "Executing task" / "finished with status" lines into
    :class:`TaskEvent` calls. It keeps the lines of the task in progress so that a failure
    can be reported with the task's own last words instead of kfp.local's bare status.
    """

    def __init__(
        self,
        log_file: Any,
        on_task: Callable[[TaskEvent], None] | None,
        echo: Any | None,
        skipped: Callable[[str, str], list[TaskEvent]],
    ) -> None:
        self._file = log_file
        self._on_task = on_task
        self._echo = echo
        self._skipped = skipped
        self._pending = ""
        self._started: dict[str, float] = {}
        self.current: str | None = None
        self.current_lines: list[str] = []
        self.failed: str | None = None
        self.failed_lines: list[str] = []

    def write(self, text: str) -> int:
        self._pending += text
        while "\n" in self._pending:
            line, _, self._pending = self._pending.partition("\n")
            self._line(line)
        return len(text)

    def flush(self) -> None:
        self._file.flush()
        if self._echo is not None:
            self._echo.flush()

    def isatty(self) -> bool:
        return False

    def __enter__(self) -> _LocalRunLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """File the last line even if it lacks its newline (a task killed mid-line)."""
        if self._pending:
            self._line(self._pending)
            self._pending = ""

    def _emit(self, event: TaskEvent) -> None:
        if self._on_task is not None:
            self._on_task(event)

    def _line(self, raw: str) -> None:
        if self._echo is not None:
            self._echo.write(raw + "\n")
        line = _ANSI.sub("", raw)
        self._file.write(line + "\n")
        if start := _TASK_START.match(line):
            self.current, self.current_lines = start["task"], []
            self._started[self.current] = time.monotonic()
            self._emit(TaskEvent(self.current, "RUNNING"))
        elif end := _TASK_END.match(line):
            task = end["task"]
            seconds = time.monotonic() - self._started.get(task, time.monotonic())
            state = _KFP_STATUS.get(end["status"], end["status"])
            self._emit(TaskEvent(task, state, seconds))
            if state != "SUCCEEDED" and self.failed is None:
                self.failed, self.failed_lines = task, self.current_lines
            self.current = None
        elif skipped := _CONDITION_SKIPPED.match(line):
            for event in self._skipped(skipped["task"], "condition {} is false"):
                self._emit(event)
        elif skipped := _UPSTREAM_SKIPPED.match(line):
            for event in self._skipped(skipped["task"], "an upstream task failed"):
                self._emit(event)
        elif self.current is not None:
            self.current_lines.append(line)
            del self.current_lines[:-200]

    def failure_detail(self) -> str:
        """The last line the failed task printed (its exception, for a Python component)."""
        lines = self.failed_lines if self.failed is not None else self.current_lines
        for line in reversed(lines):
            text = line.strip()
            if text and not text.startswith("[KFP Executor"):
                return text
        return ""


def _topological(tasks: Mapping[str, Any]) -> list[str]:
    """Task names of one DAG with every task after the tasks it depends on (ties by name)."""
    done: list[str] = []
    waiting = sorted(tasks)
    while waiting:
        ready = [
            t
            for t in waiting
            if all(d in done or d not in tasks for d in tasks[t].get("dependentTasks", []))
        ]
        if not ready:  # a cycle cannot compile; keep the rest in name order regardless
            ready = waiting[:1]
        done.append(ready[0])
        waiting.remove(ready[0])
    return done


def executor_tasks(
    spec: Mapping[str, Any], component: Mapping[str, Any] | None = None
) -> list[str]:
    """The container tasks of a pipeline spec (or of one DAG ``component``), upstream first.

    Tasks inside ``dsl.If`` groups are listed at the group's place, so the order is the one
    a run executes them in.
    """
    component = spec["root"] if component is None else component
    tasks = component.get("dag", {}).get("tasks", {})
    out: list[str] = []
    for name in _topological(tasks):
        child = spec["components"][tasks[name]["componentRef"]["name"]]
        out.extend(executor_tasks(spec, child) if "dag" in child else [name])
    return out


def _group_index(spec: Mapping[str, Any]) -> dict[str, tuple[str, Mapping[str, Any]]]:
    """Every DAG task (``condition-1``, ...) by name: its display name and its component."""
    index: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for component in [spec["root"], *spec.get("components", {}).values()]:
        for name, task in component.get("dag", {}).get("tasks", {}).items():
            child = spec["components"].get(task["componentRef"]["name"], {})
            if "dag" in child:
                index[name] = (task.get("taskInfo", {}).get("name", name), child)
    return index


def _new_run_dir(root: Path, name: str, before: set[str]) -> Path | None:
    """The run's output folder: the newest ``<name>-<time>`` folder that was not there before."""
    found = [p for p in root.glob(f"{name}-*") if p.is_dir() and p.name not in before]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def run_local(
    pipeline: GraphComponent,
    param_pairs: Sequence[str],
    *,
    pipeline_root: str | os.PathLike[str] = DEFAULT_LOCAL_ROOT,
    defaults: Mapping[str, Any] | None = None,
    local_paths: Mapping[str, frozenset[str]] | None = None,
    on_task: Callable[[TaskEvent], None] | None = None,
    echo: Any | None = None,
) -> dict[str, Any]:
    """Run a ``@dsl.pipeline`` with ``kfp.local``'s SubprocessRunner in this environment.

    The same DAG as on the cluster, each task in a subprocess of this Python (no venv per
    task, no Docker), outputs under ``<pipeline_root>/<pipeline>-<time>/<task>/``. Parameters
    are typed from the pipeline's own spec; ``defaults`` (typed values) fill the ones not
    given, and those named in ``local_paths`` are made absolute (see
    :func:`absolute_local_path`). The result has ``parameters`` (what was passed) and
    ``inputs`` (every input, the pipeline's defaults included). ``on_task`` hears each task
    start, end or skip; everything the tasks print goes to ``run.log`` in the run folder
    (and to ``echo`` if given). A failed task raises :class:`RunFailed` naming the task, its
    last output line and the log.
    """
    from google.protobuf import json_format
    from kfp import local

    spec = json_format.MessageToDict(pipeline.pipeline_spec)
    params = {**(defaults or {}), **parse_params(param_pairs, spec)}
    for name, keywords in (local_paths or {}).items():
        if isinstance(params.get(name), str):
            params[name] = absolute_local_path(params[name], keywords)
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    name = spec.get("pipelineInfo", {}).get("name", "pipeline")
    groups = _group_index(spec)

    def skipped(task: str, why: str) -> list[TaskEvent]:
        if task not in groups:
            return [TaskEvent(task, "SKIPPED", reason=why)]
        label, component = groups[task]
        reason = why.format(label)
        return [TaskEvent(t, "SKIPPED", reason=reason) for t in executor_tasks(spec, component)]

    before = {p.name for p in root.iterdir()}
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S-%f")
    log_path = root / f".{name}-{stamp}.log"
    start = time.monotonic()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    failure: str | None = None
    try:
        with log_path.open("w", encoding="utf-8") as log_file:
            try:
                with (
                    _LocalRunLog(log_file, on_task, echo, skipped) as stream,
                    capture_run_output(stream),
                    conditions_on_named_outputs(),
                ):
                    task = pipeline(**params)
            except RuntimeError as exc:
                failed = stream.failed or stream.current
                where = f" in task {failed}" if failed else ""
                detail = stream.failure_detail() or " ".join(str(exc).split())
                failure = f"local run of {name} failed{where}: {detail}"
                if on_task is not None and stream.failed is None and stream.current:
                    on_task(TaskEvent(stream.current, "FAILED"))
    finally:
        # The log goes into the run's folder, found only now (kfp.local names it).
        run_dir = _new_run_dir(root, name, before)
        final_log = run_dir / "run.log" if run_dir is not None else root / f"{name}-{stamp}.log"
        os.replace(log_path, final_log)
    if failure is not None:
        raise RunFailed(f"{failure} (log: {final_log})")
    return {
        "pipeline": name,
        "pipeline_root": str(root),
        "run_dir": str(run_dir) if run_dir is not None else None,
        "log": str(final_log),
        "seconds": time.monotonic() - start,
        "parameters": params,
        "inputs": {**_input_defaults(spec), **params},
        # kfp.local's own result: the pipeline's declared outputs, artifacts by their URI.
        "outputs": {k: _describe_output(v) for k, v in task.outputs.items()},
    }


def _input_defaults(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The pipeline's declared input defaults (JSON numbers come back as floats)."""
    declared = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    return {name: d["defaultValue"] for name, d in declared.items() if "defaultValue" in d}


def _describe_output(value: Any) -> Any:
    uri = getattr(value, "uri", None)
    return uri if uri is not None else value


def _task_parameters(run_dir: Path, task: str) -> dict[str, Any] | None:
    """The output parameters a task of a local run wrote; None if the task did not run.

    kfp.local returns a pipeline's declared outputs only, not its tasks', so they are read
    from the ExecutorOutput file each task leaves in its folder.
    """
    path = run_dir / task / "executor_output.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return dict(data.get("parameterValues", {}))


def training_run_summary(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """What a local training run decided, read from its outputs under ``run_dir``.

    ``retrain`` and ``reason`` from check-retrain; ``accuracy``, ``loss``, ``passed`` and
    ``gate_reasons`` from evaluate; ``version`` and ``promoted`` from deploy; and the paths
    of the model, evaluation and InferenceService outputs and of the HTML pages the KFP UI
    shows (``training_curves``, ``misclassified``).
    A value is None when its task did not run.
    """
    run = Path(run_dir)
    check = _task_parameters(run, "check-retrain") or {}
    evaluate = _task_parameters(run, "evaluate") or {}
    deploy = _task_parameters(run, "deploy") or {}
    metrics_path = run / "evaluate" / "evaluation" / METRICS_FILE
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    report_path = metrics_path.with_name(EVAL_REPORT_FILE)
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else {}

    def existing(*parts: str) -> str | None:
        path = run.joinpath(*parts)
        return str(path) if path.exists() else None

    return {
        "run_dir": str(run),
        "retrain": check.get("should_retrain"),
        "reason": check.get("reason"),
        "accuracy": metrics.get("accuracy", evaluate.get("accuracy")),
        "loss": metrics.get("loss"),
        "passed": evaluate.get("passed"),
        "gate_reasons": list(report.get("reasons", [])),
        "version": deploy.get("version"),
        "promoted": deploy.get("promoted"),
        "model": existing("train", "trained_model"),
        "evaluation": existing("evaluate", "evaluation"),
        "training_curves": existing("train", "training_curves"),
        "misclassified": existing("evaluate", "misclassified"),
        "inference_service": existing("deploy", "inference_service"),
    }


def run_local_training(
    pipeline: GraphComponent,
    param_pairs: Sequence[str],
    *,
    pipeline_root: str | os.PathLike[str] = DEFAULT_LOCAL_ROOT,
    registry: str | os.PathLike[str] = DEFAULT_LOCAL_REGISTRY,
    on_task: Callable[[TaskEvent], None] | None = None,
    echo: Any | None = None,
) -> dict[str, Any]:
    """Run the training DAG ``pipeline`` with kfp.local on local defaults, and summarise it.

    ``pipeline`` is the one ``pipelines/`` builds (the library cannot import it: the DAG
    depends on the library). The result is :func:`run_local`'s plus ``summary``
    (:func:`training_run_summary`).

    The compiled defaults address a cluster (``registry_uri`` on S3); here, unless
    ``param_pairs`` say otherwise, the source is ``sample:digits`` and the registry is the
    folder ``registry`` (default ``out/kfp_registry``) and train checkpoints go under
    ``out/kfp_checkpoints/<run id>``, so no object store is needed. Local paths among the
    parameters are made absolute.
    """
    result = run_local(
        pipeline,
        param_pairs,
        pipeline_root=pipeline_root,
        defaults={
            "source": LOCAL_SOURCE,
            "registry_uri": str(Path(registry).resolve()),
            "checkpoint_root": str(DEFAULT_LOCAL_CHECKPOINTS.resolve()),
        },
        local_paths=LOCAL_PATH_PARAMS,
        on_task=on_task,
        echo=echo,
    )
    if result["run_dir"] is None:
        raise RunFailed(
            f"local run of {result['pipeline']} wrote no outputs under {result['pipeline_root']}"
        )
    result["summary"] = training_run_summary(result["run_dir"])
    return result
