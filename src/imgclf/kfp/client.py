"""Kubeflow Pipelines from the command line: compile, upload, run, schedule and list runs.

A thin layer over ``kfp.Client`` (KFP REST API v2beta1) that turns what users get wrong into
one-line :class:`~imgclf.errors.ImgclfError` messages *before* anything reaches the cluster:
a 5-field cron (KFP wants 6, seconds first), a parameter the pipeline does not declare or a
value of the wrong type, an unreachable host, a rejected token. The token is only ever put
in the ``Authorization`` header; it never appears in messages or reprs.

``kfp`` is imported inside functions so ``imgclf --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from imgclf.errors import ConfigError, ImgclfError

if TYPE_CHECKING:
    import kfp

DEFAULT_HOST = "http://localhost:8080"
DEFAULT_PIPELINE_NAME = "imgclf-training"
DEFAULT_EXPERIMENT = "imgclf"
DEFAULT_PACKAGE = Path("pipelines/training_pipeline.yaml")
DEFAULT_LOCAL_ROOT = Path("out/kfp_root")
IN_CLUSTER_API = "ml-pipeline.kubeflow.svc.cluster.local:8888"

# KFP reports ERROR for runs whose workflow could not even start; the generated enum lacks it.
FAILED_STATES = frozenset({"FAILED", "CANCELED", "ERROR"})
TERMINAL_STATES = FAILED_STATES | {"SUCCEEDED", "SKIPPED"}

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class KfpError(ImgclfError):
    """The KFP API server could not be reached, refused a request, or lacks an object."""


class RunFailed(KfpError):
    """A pipeline run ended FAILED, CANCELED or ERROR (or a local run's task failed)."""

    exit_code = 4


# --------------------------------------------------------------------------------------
# Cron: KFP's scheduler (robfig/cron) reads six fields, seconds first.

_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")


@dataclasses.dataclass(frozen=True)
class _CronField:
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()
    question_mark: bool = False

    def value(self, text: str, expr: str) -> int:
        upper = text.upper()
        if upper in self.names:
            return self.names.index(upper) + self.low
        if not text.isdigit():
            allowed = f"{self.low}-{self.high}"
            if self.names:
                allowed += f" or {self.names[0]}-{self.names[-1]}"
            raise ConfigError(
                f'--cron "{expr}": {self.name} value {text!r} is not a number ({allowed})'
            )
        number = int(text)
        if not self.low <= number <= self.high:
            raise ConfigError(
                f'--cron "{expr}": {self.name} value {number} is outside {self.low}-{self.high}'
            )
        return number


_CRON_FIELDS = (
    _CronField("seconds", 0, 59),
    _CronField("minutes", 0, 59),
    _CronField("hours", 0, 23),
    _CronField("day-of-month", 1, 31, question_mark=True),
    _CronField("month", 1, 12, _MONTHS),
    _CronField("day-of-week", 0, 6, _DAYS, question_mark=True),
)
_CRON_DESCRIPTORS = frozenset(
    {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
)


def _check_cron_part(part: str, field: _CronField, expr: str) -> None:
    """One comma-separated item: ``*``, ``?``, ``N``, ``A-B``, each optionally ``/STEP``."""
    base, slash, step = part.partition("/")
    if slash and (not step.isdigit() or int(step) == 0):
        raise ConfigError(
            f'--cron "{expr}": {field.name} step {step!r} in {part!r} must be a positive integer'
        )
    if base == "*":
        return
    if base == "?":
        if not field.question_mark:
            raise ConfigError(
                f'--cron "{expr}": "?" is only allowed in day-of-month and day-of-week, '
                f"not in {field.name}"
            )
        return
    low_text, dash, high_text = base.partition("-")
    if not low_text or (dash and not high_text):
        raise ConfigError(f'--cron "{expr}": {field.name} item {part!r} is not valid cron syntax')
    low = field.value(low_text, expr)
    if dash:
        high = field.value(high_text, expr)
        if low > high:
            raise ConfigError(
                f'--cron "{expr}": {field.name} range {base!r} runs backwards ({low} > {high})'
            )


def validate_cron(expr: str) -> str:
    """Check a KFP cron expression and return it with single spaces.

    KFP's scheduler takes six fields, seconds first (``"0 0 2 * * *"`` is 02:00 every day);
    a classic five-field crontab line would silently mean something else (``"0 2 * * *"``
    read as six fields is missing one and is rejected by the server only after upload), so
    it is refused here with the six-field form spelled out. The ``@daily``-style
    descriptors of robfig/cron are accepted as they are.
    """
    fields = expr.split()
    if len(fields) == 1 and fields[0].lower() in _CRON_DESCRIPTORS:
        return fields[0].lower()
    if len(fields) == 5:
        six = " ".join(["0", *fields])
        raise ConfigError(f'--cron "{expr}" has 5 fields; KFP expects 6 (seconds first): "{six}"')
    if len(fields) != 6:
        raise ConfigError(
            f'--cron "{expr}" has {len(fields)} fields; KFP expects 6 (seconds first): '
            '"SEC MIN HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK", e.g. "0 0 2 * * *" for 02:00 daily'
        )
    for text, field in zip(fields, _CRON_FIELDS, strict=True):
        for part in text.split(","):
            if not part:
                raise ConfigError(f'--cron "{expr}": empty item in {field.name} {text!r}')
            _check_cron_part(part, field, expr)
    return " ".join(fields)


def parse_timestamp(text: str, flag: str) -> str:
    """An ISO 8601 date/time as the RFC 3339 UTC string the API wants (naive means UTC)."""
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"{flag} {text!r}: expected an ISO 8601 time such as 2025-01-31T02:00:00Z"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------
# Pipeline packages and parameters


def load_package(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a compiled pipeline YAML and return its PipelineSpec (first document) as a dict.

    Parsing it into the ``PipelineSpec`` proto here catches a wrong or truncated file with
    its name in the message, instead of a server-side 400 after upload.
    """
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    package = Path(path)
    if package.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"--package {package}: expected a compiled pipeline .yaml file")
    if not package.is_file():
        raise ConfigError(
            f"--package {package}: no such file (create it with `imgclf pipeline compile`)"
        )
    try:
        docs = list(yaml.safe_load_all(package.read_text(encoding="utf-8")))
    except yaml.YAMLError as exc:
        raise ConfigError(f"--package {package}: not valid YAML: {exc}") from None
    spec = docs[0] if docs else None
    if not isinstance(spec, dict) or "root" not in spec or "pipelineInfo" not in spec:
        raise ConfigError(
            f"--package {package}: not a compiled KFP pipeline (no root/pipelineInfo)"
        )
    try:
        json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())
    except json_format.ParseError as exc:
        raise ConfigError(f"--package {package}: not a valid PipelineSpec: {exc}") from None
    return spec


def pipeline_parameters(spec: Mapping[str, Any]) -> dict[str, str]:
    """``{name: parameterType}`` of a pipeline's inputs (a spec, or KFP's spec+platform wrap)."""
    if "root" not in spec and isinstance(spec.get("pipeline_spec"), Mapping):
        spec = spec["pipeline_spec"]
    params = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    return {name: str(d.get("parameterType", "")) for name, d in params.items()}


def _coerce_param(name: str, raw: str, kind: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"--param {name}={raw}: {name} is {kind}, expected {expected}")

    if kind == "STRING":
        return raw
    if kind == "NUMBER_INTEGER":
        try:
            return int(raw)
        except ValueError:
            raise bad("an integer") from None
    if kind == "NUMBER_DOUBLE":
        try:
            return float(raw)
        except ValueError:
            raise bad("a number") from None
    if kind == "BOOLEAN":
        lowered = raw.strip().lower()
        if lowered in ("true", "yes", "1"):
            return True
        if lowered in ("false", "no", "0"):
            return False
        raise bad("true or false")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise bad("YAML/JSON") from None
    if kind == "LIST" and not isinstance(value, list):
        raise bad("a list such as [a, b]")
    if kind == "STRUCT" and not isinstance(value, dict):
        raise bad("a mapping such as {a: 1}")
    return value


def parse_params(pairs: Sequence[str], spec: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Turn ``--param key=value`` flags into the run's parameter dict.

    With the pipeline's spec each value is converted to the declared input type (so
    ``epochs=2`` arrives as an integer and ``source=2024`` stays a string) and unknown names
    are refused, listing the pipeline's inputs. Without a spec values are read as YAML.
    """
    declared = pipeline_parameters(spec) if spec is not None else None
    params: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"--param {pair!r}: expected key=value")
        if declared is None:
            params[name] = yaml.safe_load(raw)
            continue
        if name not in declared:
            known = ", ".join(sorted(declared)) or "none"
            raise ConfigError(f"--param {name}: the pipeline has no such input (inputs: {known})")
        params[name] = _coerce_param(name, raw, declared[name])
    return params


def _import_training_pipeline() -> Any:
    """``pipelines.training_pipeline`` from the repository (cwd or this source tree)."""
    import importlib

    try:
        return importlib.import_module("pipelines.training_pipeline")
    except ModuleNotFoundError as exc:
        if exc.name not in ("pipelines", "pipelines.training_pipeline"):
            raise
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / "pipelines" / "training_pipeline.py").is_file():
            sys.path.insert(0, str(root))
            sys.modules.pop("pipelines", None)
            return importlib.import_module("pipelines.training_pipeline")
    raise ConfigError(
        "pipelines/training_pipeline.py not found; run imgclf pipeline from the repository root"
    )


def training_pipeline() -> Any:
    """The ``@dsl.pipeline`` function of the training DAG."""
    return _import_training_pipeline().training_pipeline


def compile_training_pipeline(out: str | os.PathLike[str] = DEFAULT_PACKAGE) -> Path:
    """Compile the training DAG to ``out`` (the package that upload, run and schedule send)."""
    return Path(_import_training_pipeline().compile_pipeline(Path(out)))


def package_digest(path: str | os.PathLike[str]) -> str:
    """Short sha256 of a package: names versions so the same YAML is recognisable in the UI."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


# --------------------------------------------------------------------------------------
# Connection


@dataclasses.dataclass(frozen=True)
class Connection:
    """Where the KFP API is and how to authenticate; ``host=None`` means in-cluster."""

    host: str | None
    namespace: str | None = None
    token: str | None = dataclasses.field(default=None, repr=False)

    @property
    def where(self) -> str:
        """The API address for messages (never includes the token)."""
        return self.host or f"{IN_CLUSTER_API} (in-cluster)"


def resolve_connection(
    host: str | None = None,
    namespace: str | None = None,
    token_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Connection:
    """Flags first, then ``KFP_HOST`` / ``KFP_NAMESPACE`` / ``KFP_TOKEN``.

    Without a host, a process inside a pod (``KUBERNETES_SERVICE_HOST`` set) lets
    ``kfp.Client`` find the in-cluster API and its service-account token; elsewhere the
    default is ``http://localhost:8080``, the address of
    ``kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80``.
    """
    env = os.environ if env is None else env
    host = host or env.get("KFP_HOST") or None
    if host is None and not env.get("KUBERNETES_SERVICE_HOST"):
        host = DEFAULT_HOST
    namespace = namespace or env.get("KFP_NAMESPACE") or None
    token = env.get("KFP_TOKEN") or None
    if token_file is not None:
        path = Path(token_file)
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"--token-file {path}: cannot read it ({exc.strerror})") from None
        if not token:
            raise ConfigError(f"--token-file {path}: the file is empty")
    return Connection(host=host.rstrip("/") if host else None, namespace=namespace, token=token)


def _error_message(body: Any) -> str:
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    try:
        data = json.loads(body)
    except (TypeError, ValueError):
        return " ".join(str(body or "").split())[:300]
    if isinstance(data, dict):
        return str(data.get("message") or data.get("error") or "").strip()
    return ""


def _connection_reason(exc: Exception) -> str:
    reason = str(getattr(exc, "reason", None) or exc)
    found = re.search(r"\[Errno -?\d+\][^'\")]*", reason)
    return found.group(0).strip() if found else type(getattr(exc, "reason", exc)).__name__


@contextlib.contextmanager
def api_errors(conn: Connection, action: str) -> Iterator[None]:
    """Turn transport and HTTP failures of ``action`` into one-line :class:`KfpError`."""
    import kfp_server_api
    import urllib3

    try:
        yield
    except kfp_server_api.ApiException as exc:
        if exc.status == 0:
            raise KfpError(f"{action}: KFP API at {conn.where}: {exc.reason}") from None
        detail = _error_message(exc.body)
        hint = ""
        if exc.status in (401, 403):
            hint = " (check the token in KFP_TOKEN or --token-file, and --namespace)"
        raise KfpError(
            f"{action}: KFP API at {conn.where} answered {exc.status} {exc.reason}"
            + (f": {detail}" if detail else "")
            + hint
        ) from None
    except urllib3.exceptions.HTTPError as exc:
        raise KfpError(
            f"{action}: cannot reach the KFP API at {conn.where} ({_connection_reason(exc)}); "
            "start `kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80` or set "
            "--host / KFP_HOST"
        ) from None


def _check_reachable(conn: Connection) -> None:
    """One health request with a timeout before building ``kfp.Client``.

    ``kfp.Client`` retries a failing health check five times, five seconds apart, logging a
    traceback each time; asking once first gives the user a one-line answer at once.
    """
    import kfp_server_api

    cfg = kfp_server_api.Configuration(host=conn.host)
    cfg.retries = 0  # a refused connection is reported at once, without retry warnings
    if conn.token:
        cfg.api_key["authorization"] = conn.token
        cfg.api_key_prefix["authorization"] = "Bearer"
    api = kfp_server_api.HealthzServiceApi(kfp_server_api.ApiClient(cfg))
    with api_errors(conn, "health check"):
        api.healthz_service_get_healthz(_request_timeout=15)


def connect(conn: Connection) -> kfp.Client:
    """A ``kfp.Client`` for ``conn``, after checking the API answers."""
    import kfp

    if conn.host:
        _check_reachable(conn)
    with warnings.catch_warnings(), api_errors(conn, "connect"):
        # "This client only works with KFP v2.0.0-beta.2 and later": true of every
        # server the v2beta1 API exists on, so it is noise here.
        warnings.simplefilter("ignore", FutureWarning)
        return kfp.Client(host=conn.host, existing_token=conn.token)


# --------------------------------------------------------------------------------------
# Results as plain data (the CLI formats them; tests read them)


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


# --------------------------------------------------------------------------------------
# Operations


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


# --------------------------------------------------------------------------------------
# Local execution of the same DAG


LOCAL_SOURCE = "sample:digits"
DEFAULT_LOCAL_REGISTRY = Path("out/kfp_registry")
# Run parameters that may name a file or folder on this machine: kfp.local runs each task in
# a subprocess, so a relative path must not depend on where the task happens to start.
LOCAL_PATH_PARAMS: dict[str, frozenset[str]] = {
    "source": frozenset(),
    "registry_uri": frozenset(),
    "pretrained": frozenset({"none", "imagenet"}),
}
TRAINING_TASKS = ("ingest", "validate", "check-retrain", "train", "evaluate", "deploy")

_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# kfp.local's own log lines (logging_utils' "HH:MM:SS.mmm - LEVEL - message" format); task
# output is printed indented, so a component cannot fake one.
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

    def close_pending(self) -> None:
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


@contextlib.contextmanager
def _conditions_on_named_outputs() -> Iterator[None]:
    """Let kfp.local's ``dsl.If`` read a named output of an upstream task.

    kfp.local (2.17) resolves ``pipelinechannel--<task>-<output>`` in a condition only for a
    task's single ``Output`` or a pipeline input; the training DAG's gates test named outputs
    (check-retrain's ``should_retrain``, evaluate's ``passed``), which it would take for
    missing and so skip the branch on every run. The compiled condition is right (the KFP
    backend resolves it); during a local run such a name is looked up among the upstream
    task outputs first, then kfp.local's own resolution applies unchanged.
    """
    from kfp.local.orchestrator import enhanced_dag_orchestrator

    evaluator = getattr(enhanced_dag_orchestrator, "ConditionEvaluator", None)
    original = getattr(evaluator, "__dict__", {}).get("_resolve_pipeline_channel")
    if not isinstance(original, staticmethod):
        yield
        return

    def resolve(channel_ref: str, io_store: Any) -> Any:
        name = channel_ref.removeprefix("pipelinechannel--")
        for cut in (i for i, ch in enumerate(name) if ch == "-"):
            try:
                return io_store.get_task_output(name[:cut], name[cut + 1 :])
            except ValueError:
                continue
        return original.__func__(channel_ref, io_store)

    evaluator._resolve_pipeline_channel = staticmethod(resolve)
    try:
        yield
    finally:
        evaluator._resolve_pipeline_channel = original


@contextlib.contextmanager
def _capture_run_output(stream: _LocalRunLog) -> Iterator[None]:
    """Route stdout and the root logger (kfp.local's "Skipping ..." lines) into ``stream``."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(stream), warnings.catch_warnings():
            # kfp.local warns that the tasks' image is not a Python image and that GPU and
            # CPU requests have no effect here; both are true of every local run, so they go
            # to the log instead of the terminal.
            warnings.showwarning = lambda message, category, *_args, **_kw: stream.write(
                f"WARNING {category.__name__}: {message}\n"
            )
            yield
    finally:
        stream.close_pending()
        root.handlers[:] = handlers
        root.setLevel(level)


def _new_run_dir(root: Path, name: str, before: set[str]) -> Path | None:
    """The run's output folder: the newest ``<name>-<time>`` folder that was not there before."""
    found = [p for p in root.glob(f"{name}-*") if p.is_dir() and p.name not in before]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def run_local(
    pipeline_func: Any,
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

    spec = json_format.MessageToDict(pipeline_func.pipeline_spec)
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
    task: Any = None
    try:
        with log_path.open("w", encoding="utf-8") as log_file:
            stream = _LocalRunLog(log_file, on_task, echo, skipped)
            try:
                with _capture_run_output(stream), _conditions_on_named_outputs():
                    task = pipeline_func(**params)
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
    outputs = getattr(task, "outputs", None) or {}
    return {
        "pipeline": name,
        "pipeline_root": str(root),
        "run_dir": str(run_dir) if run_dir is not None else None,
        "log": str(final_log),
        "seconds": time.monotonic() - start,
        "parameters": params,
        "inputs": {**_input_defaults(spec), **params},
        "outputs": {k: _describe_output(v) for k, v in outputs.items()},
    }


def _input_defaults(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The pipeline's declared input defaults (JSON numbers come back as floats)."""
    declared = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    return {name: d["defaultValue"] for name, d in declared.items() if "defaultValue" in d}


def _describe_output(value: Any) -> Any:
    uri = getattr(value, "uri", None)
    return uri if uri is not None else value


def _task_parameters(run_dir: Path, task: str) -> dict[str, Any] | None:
    """The output parameters a task of a local run wrote; None if the task did not run."""
    path = run_dir / task / "executor_output.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return dict(data.get("parameterValues", {}))


def training_run_summary(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """What a local training run decided, read from its outputs under ``run_dir``.

    ``retrain`` and ``reason`` from check-retrain; ``accuracy``, ``loss``, ``passed`` and
    ``gate_reasons`` from evaluate; ``version`` and ``promoted`` from deploy; and the paths
    of the model, evaluation and InferenceService outputs.
    A value is None when its task did not run.
    """
    run = Path(run_dir)
    check = _task_parameters(run, "check-retrain") or {}
    evaluate = _task_parameters(run, "evaluate") or {}
    deploy = _task_parameters(run, "deploy") or {}
    metrics_path = run / "evaluate" / "evaluation" / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}

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
        "gate_reasons": list(metrics.get("reasons", [])),
        "version": deploy.get("version"),
        "promoted": deploy.get("promoted"),
        "model": existing("train", "model"),
        "evaluation": existing("evaluate", "evaluation"),
        "inference_service": existing("deploy", "inference_service"),
    }


def run_local_training(
    param_pairs: Sequence[str],
    *,
    pipeline_root: str | os.PathLike[str] = DEFAULT_LOCAL_ROOT,
    registry: str | os.PathLike[str] = DEFAULT_LOCAL_REGISTRY,
    on_task: Callable[[TaskEvent], None] | None = None,
    echo: Any | None = None,
) -> dict[str, Any]:
    """Run the training DAG with kfp.local on local defaults; add :func:`training_run_summary`.

    The compiled defaults address a cluster (``registry_uri`` on S3); here, unless
    ``param_pairs`` say otherwise, the source is ``sample:digits`` and the registry is the
    folder ``registry`` (default ``out/kfp_registry``), so no object store is needed. Local
    paths among the parameters are made absolute.
    """
    result = run_local(
        training_pipeline(),
        param_pairs,
        pipeline_root=pipeline_root,
        defaults={"source": LOCAL_SOURCE, "registry_uri": str(Path(registry).resolve())},
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
