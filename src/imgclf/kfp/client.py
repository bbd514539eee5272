"""Kubeflow Pipelines over REST: upload, run, wait, schedule and list, as plain results.

A thin layer over ``kfp.Client`` (KFP REST API v2beta1). What users get wrong is refused
before anything reaches the cluster (cron in :mod:`.cron`, parameters in :mod:`.params`,
the package in :mod:`.package`); what the server or network does wrong arrives as one-line
:class:`~imgclf.kfp.errors.KfpError` (see :func:`~imgclf.kfp.connection.api_errors`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgclf.errors import ConfigError
from imgclf.kfp.connection import Connection, api_errors, connect
from imgclf.kfp.cron import validate_cron
from imgclf.kfp.errors import KfpError, RunFailed
from imgclf.kfp.package import package_digest

if TYPE_CHECKING:
    import kfp

DEFAULT_PIPELINE_NAME = "imgclf-training"
DEFAULT_EXPERIMENT = "imgclf"

# KFP reports ERROR for runs whose workflow could not even start; the generated enum lacks it.
FAILED_STATES = frozenset({"FAILED", "CANCELED", "ERROR"})
TERMINAL_STATES = FAILED_STATES | {"SUCCEEDED", "SKIPPED"}

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None and value <= _EPOCH:
            return None
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return str(value)


@dataclasses.dataclass(frozen=True)
class UploadResult:
    """What ``upload`` created: a new pipeline (with its first version) or a new version."""

    pipeline_id: str
    version_id: str
    version_name: str
    new_pipeline: bool


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """One run's identity and state."""

    run_id: str
    name: str
    state: str
    created_at: str | None = None
    finished_at: str | None = None
    error: str | None = None

    @classmethod
    def from_api(cls, run: Any) -> RunInfo:
        """From a ``V2beta1Run``."""
        error = getattr(run.error, "message", None) if run.error else None
        return cls(
            run_id=run.run_id,
            name=run.display_name or "",
            state=str(run.state or "PENDING"),
            created_at=_iso(run.created_at),
            finished_at=_iso(run.finished_at),
            error=error or None,
        )


@dataclasses.dataclass(frozen=True)
class ScheduleInfo:
    """One recurring run."""

    recurring_run_id: str
    name: str
    status: str
    cron: str | None
    max_concurrency: int | None
    no_catchup: bool | None
    created_at: str | None = None

    @classmethod
    def from_api(cls, rr: Any) -> ScheduleInfo:
        """From a ``V2beta1RecurringRun``."""
        cron = rr.trigger.cron_schedule.cron if rr.trigger and rr.trigger.cron_schedule else None
        status = rr.status or ("ENABLED" if rr.mode == "ENABLE" else "DISABLED")
        return cls(
            recurring_run_id=rr.recurring_run_id,
            name=rr.display_name or "",
            status=str(status),
            cron=cron,
            max_concurrency=int(rr.max_concurrency) if rr.max_concurrency is not None else None,
            no_catchup=rr.no_catchup,
            created_at=_iso(rr.created_at),
        )


@dataclasses.dataclass(frozen=True)
class PipelineSource:
    """What a run or schedule executes: a compiled package, or an uploaded version."""

    package: Path | None = None
    pipeline_id: str | None = None
    version_id: str | None = None

    def __post_init__(self) -> None:
        if (self.package is None) == (self.pipeline_id is None):
            raise ConfigError("give either --package or --pipeline-id (with optional --version-id)")
        if self.version_id and not self.pipeline_id:
            raise ConfigError("--version-id needs --pipeline-id")


class KfpSession:
    """A connected ``kfp.Client`` plus the namespace every call is scoped to.

    Each method wraps its API calls in :func:`api_errors`, so the CLI sees only
    :class:`KfpError` for anything the server or the network did.
    """

    def __init__(self, client: kfp.Client, conn: Connection) -> None:
        self.client = client
        self.conn = conn

    @classmethod
    def open(cls, conn: Connection) -> KfpSession:
        """Connect (see :func:`connect`)."""
        return cls(connect(conn), conn)

    def _errors(self, action: str) -> contextlib.AbstractContextManager[None]:
        return api_errors(self.conn, action)

    # pipelines -------------------------------------------------------------------------

    def find_pipeline(self, name: str) -> str | None:
        """The id of the pipeline called ``name``, or None."""
        filter_ = json.dumps(
            {"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]}
        )
        with self._errors(f"look up pipeline {name!r}"):
            found = self.client.list_pipelines(
                filter=filter_, page_size=2, namespace=self.conn.namespace
            ).pipelines
        if not found:
            return None
        if len(found) > 1:
            raise KfpError(f"more than one pipeline is named {name!r}; use --pipeline-id")
        return found[0].pipeline_id

    def latest_version(self, pipeline_id: str) -> tuple[str, str]:
        """``(version_id, version_name)`` of the newest version of a pipeline."""
        with self._errors(f"list versions of pipeline {pipeline_id}"):
            versions = self.client.list_pipeline_versions(
                pipeline_id, page_size=1, sort_by="created_at desc"
            ).pipeline_versions
        if not versions:
            raise KfpError(f"pipeline {pipeline_id} has no versions on {self.conn.where}")
        return versions[0].pipeline_version_id, versions[0].display_name or ""

    def version_spec(self, pipeline_id: str, version_id: str) -> dict[str, Any]:
        """The PipelineSpec stored with an uploaded version (to type-check parameters)."""
        with self._errors(f"get pipeline {pipeline_id} version {version_id}"):
            version = self.client.get_pipeline_version(pipeline_id, version_id)
        return dict(version.pipeline_spec or {})

    def upload(
        self,
        package: Path,
        *,
        name: str = DEFAULT_PIPELINE_NAME,
        version: str | None = None,
        description: str | None = None,
    ) -> UploadResult:
        """Upload ``package`` as pipeline ``name``, or as a new version if ``name`` exists.

        A new version is named ``version`` or ``<name>-<UTC time>-<sha>`` so every upload
        is kept and the UI shows which YAML each run used. A new pipeline's first version
        takes the pipeline's name (the server's rule).
        """
        pipeline_id = self.find_pipeline(name)
        if pipeline_id is None:
            with self._errors(f"upload pipeline {name!r}"):
                created = self.client.upload_pipeline(
                    str(package),
                    pipeline_name=name,
                    description=description,
                    namespace=self.conn.namespace,
                )
            version_id, version_name = self.latest_version(created.pipeline_id)
            return UploadResult(created.pipeline_id, version_id, version_name, True)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
        version_name = version or f"{name}-{stamp}-{package_digest(package)[:8]}"
        with self._errors(f"upload version {version_name!r} of pipeline {name!r}"):
            created_version = self.client.upload_pipeline_version(
                str(package),
                pipeline_version_name=version_name,
                pipeline_id=pipeline_id,
                description=description,
            )
        return UploadResult(pipeline_id, created_version.pipeline_version_id, version_name, False)

    # experiments -----------------------------------------------------------------------

    def ensure_experiment(self, name: str) -> str:
        """The id of experiment ``name``, created if missing (runs are grouped under it)."""
        with self._errors(f"get or create experiment {name!r}"):
            return self.client.create_experiment(name, namespace=self.conn.namespace).experiment_id

    def experiment_id(self, name: str) -> str:
        """The id of an existing experiment; :class:`KfpError` if there is none."""
        with self._errors(f"look up experiment {name!r}"):
            try:
                found = self.client.get_experiment(
                    experiment_name=name, namespace=self.conn.namespace
                )
            except ValueError as exc:
                raise KfpError(f"--experiment {name}: {exc}") from None
        return found.experiment_id

    # runs ------------------------------------------------------------------------------

    def _resolve(self, source: PipelineSource) -> dict[str, Any]:
        if source.package is not None:
            return {"pipeline_package_path": str(source.package)}
        version_id = source.version_id or self.latest_version(str(source.pipeline_id))[0]
        return {"pipeline_id": source.pipeline_id, "version_id": version_id}

    def submit_run(
        self,
        source: PipelineSource,
        *,
        experiment: str,
        run_name: str,
        params: Mapping[str, Any],
        pipeline_root: str | None = None,
    ) -> RunInfo:
        """Start one run of ``source`` in ``experiment``."""
        target = self._resolve(source)
        experiment_id = self.ensure_experiment(experiment)
        with self._errors(f"create run {run_name!r}"):
            run = self.client.run_pipeline(
                experiment_id=experiment_id,
                job_name=run_name,
                params=dict(params),
                pipeline_root=pipeline_root,
                **target,
            )
        return RunInfo.from_api(run)

    def get_run(self, run_id: str) -> RunInfo:
        """The current state of a run."""
        with self._errors(f"get run {run_id}"):
            return RunInfo.from_api(self.client.get_run(run_id))

    def wait_for_run(
        self,
        run_id: str,
        *,
        timeout: float,
        poll_interval: float = 5.0,
        on_progress: Callable[[RunInfo, float], None] | None = None,
    ) -> RunInfo:
        """Poll until the run ends; :class:`RunFailed` unless it SUCCEEDED (or was SKIPPED).

        A timeout raises :class:`KfpError` and leaves the run going on the cluster.
        """
        start = time.monotonic()
        while True:
            info = self.get_run(run_id)
            elapsed = time.monotonic() - start
            if on_progress is not None:
                on_progress(info, elapsed)
            if info.state in TERMINAL_STATES:
                break
            if elapsed >= timeout:
                raise KfpError(
                    f"run {run_id} is still {info.state} after {timeout:g}s; it keeps running "
                    f"on {self.conn.where} (follow it with `imgclf pipeline runs`)"
                )
            time.sleep(max(0.0, min(poll_interval, timeout - elapsed)))
        if info.state in FAILED_STATES:
            detail = f": {info.error}" if info.error else ""
            raise RunFailed(f"run {info.name!r} ({run_id}) ended {info.state}{detail}")
        return info

    def list_runs(self, *, experiment: str | None = None, limit: int = 20) -> list[RunInfo]:
        """The ``limit`` most recent runs, newest first."""
        experiment_id = self.experiment_id(experiment) if experiment else None
        with self._errors("list runs"):
            runs = self.client.list_runs(
                page_size=limit,
                sort_by="created_at desc",
                experiment_id=experiment_id,
                namespace=self.conn.namespace,
            ).runs
        return [RunInfo.from_api(r) for r in runs or []]

    # recurring runs --------------------------------------------------------------------

    def create_schedule(
        self,
        source: PipelineSource,
        *,
        cron: str,
        name: str,
        experiment: str,
        params: Mapping[str, Any],
        start: str | None = None,
        end: str | None = None,
        pipeline_root: str | None = None,
    ) -> ScheduleInfo:
        """A recurring run on ``cron`` with one run at a time and no catch-up.

        ``max_concurrency=1`` because two trainings racing to promote a model would leave
        the registry in whichever order they finished; ``no_catchup`` because a schedule
        resumed after a week should retrain once on today's data, not seven times.
        """
        cron = validate_cron(cron)
        target = self._resolve(source)
        experiment_id = self.ensure_experiment(experiment)
        with self._errors(f"create recurring run {name!r}"):
            created = self.client.create_recurring_run(
                experiment_id=experiment_id,
                job_name=name,
                cron_expression=cron,
                start_time=start,
                end_time=end,
                max_concurrency=1,
                no_catchup=True,
                params=dict(params),
                pipeline_root=pipeline_root,
                enabled=True,
                **target,
            )
        return ScheduleInfo.from_api(created)

    def set_schedule_enabled(self, recurring_run_id: str, enabled: bool) -> None:
        """Enable or disable a recurring run (disabled ones keep their history)."""
        verb = "enable" if enabled else "disable"
        with self._errors(f"{verb} recurring run {recurring_run_id}"):
            if enabled:
                self.client.enable_recurring_run(recurring_run_id)
            else:
                self.client.disable_recurring_run(recurring_run_id)

    def delete_schedule(self, recurring_run_id: str) -> None:
        """Delete a recurring run (its past runs stay)."""
        with self._errors(f"delete recurring run {recurring_run_id}"):
            self.client.delete_recurring_run(recurring_run_id)

    def list_schedules(
        self, *, experiment: str | None = None, limit: int = 50
    ) -> list[ScheduleInfo]:
        """Recurring runs, newest first."""
        experiment_id = self.experiment_id(experiment) if experiment else None
        with self._errors("list recurring runs"):
            found = self.client.list_recurring_runs(
                page_size=limit,
                sort_by="created_at desc",
                experiment_id=experiment_id,
                namespace=self.conn.namespace,
            ).recurring_runs
        return [ScheduleInfo.from_api(r) for r in found or []]
