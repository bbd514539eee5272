"""A recording stand-in for the Kubeflow Pipelines API server (REST v2beta1), for tests.

It stands in ONLY for KFP's ``ml-pipeline`` API server, which needs Kubernetes, Argo and
MySQL and cannot run on a CI runner. Everything on the client side is real: ``kfp.Client``
2.17 and its generated ``kfp_server_api`` speak real HTTP to this threaded
``http.server`` on 127.0.0.1 (a free port), so the paths, query strings, headers,
multipart uploads and JSON bodies the tests inspect are the ones a cluster would receive.

The endpoints are those ``kfp_server_api/api/*.py`` calls for imgclf's commands (healthz,
pipelines + upload/upload_version + versions, experiments, runs, recurring runs with
:enable/:disable), answering JSON in the server's shape: snake_case fields (but
``recurringRuns`` in the recurring-run listing, as the server's proto names it), RFC 3339
times, int64 fields such as ``max_concurrency`` as strings, empty lists omitted, errors as
``{"code", "message"}`` with the gRPC-gateway HTTP status. List filters (the JSON
``Filter`` predicates EQUALS / NOT_EQUALS / IS_SUBSTRING), ``sort_by``, ``page_size`` /
``page_token`` and namespaces behave as on the server; anything else answers 400 so a
test notices a call the double does not model instead of passing by accident.

Every request is recorded (method, path, query, headers with the Authorization *value*
removed, parsed JSON body or multipart fields and file bytes). With ``token=...`` every
request must carry ``Authorization: Bearer <token>`` (401 otherwise), as behind the
Kubeflow auth proxy. Runs walk through ``run_script`` (one state per GET), e.g.
``["RUNNING", "FAILED"]``, for ``--wait`` tests.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.parser
import email.policy
import http.server
import itertools
import json
import re
import threading
import urllib.parse
import uuid
from collections.abc import Callable
from typing import Any

import yaml

_PREFIX = "/apis/v2beta1"
_EPOCH = "1970-01-01T00:00:00Z"
_TERMINAL = {"SUCCEEDED", "SKIPPED", "FAILED", "CANCELED", "ERROR"}
_OPERATIONS = {1: "EQUALS", 2: "NOT_EQUALS", 9: "IS_SUBSTRING"}
# gRPC code -> HTTP status, as grpc-gateway maps them.
_HTTP_STATUS = {3: 400, 5: 404, 6: 409, 16: 401}


@dataclasses.dataclass
class UploadedFile:
    """One file part of a multipart request."""

    filename: str
    content_type: str
    data: bytes


@dataclasses.dataclass
class RecordedRequest:
    """One request as the server saw it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    authorized: bool | None
    json: Any = None
    form: dict[str, str] = dataclasses.field(default_factory=dict)
    files: dict[str, UploadedFile] = dataclasses.field(default_factory=dict)

    def param(self, name: str) -> str | None:
        """The first value of query parameter ``name``."""
        values = self.query.get(name)
        return values[0] if values else None


class ApiError(Exception):
    """An error answer: gRPC ``code`` and message, sent with the matching HTTP status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _filter_matches(obj: dict[str, Any], raw_filter: str | None) -> bool:
    if not raw_filter:
        return True
    try:
        predicates = json.loads(raw_filter).get("predicates", [])
    except (ValueError, AttributeError):
        raise ApiError(3, f"invalid filter {raw_filter!r}") from None
    for pred in predicates:
        op = pred.get("operation")
        op = _OPERATIONS.get(op, op) if isinstance(op, int) else op
        key = pred.get("key")
        want = pred.get("stringValue", pred.get("string_value"))
        if op not in ("EQUALS", "NOT_EQUALS", "IS_SUBSTRING") or want is None:
            raise ApiError(3, f"filter predicate not modelled by the double: {pred}")
        if key == "name":
            key = "display_name"
        have = str(obj.get(key, ""))
        ok = {
            "EQUALS": have == want,
            "NOT_EQUALS": have != want,
            "IS_SUBSTRING": want in have,
        }[op]
        if not ok:
            return False
    return True


def _listing(
    items: list[dict[str, Any]], field: str, query: dict[str, list[str]]
) -> dict[str, Any]:
    def q(name: str) -> str | None:
        return query.get(name, [None])[0]

    chosen = [i for i in items if _filter_matches(i, q("filter"))]
    sort_by = (q("sort_by") or "").strip()
    if sort_by:
        key, _, order = sort_by.partition(" ")
        if key == "name":
            key = "display_name"
        if order not in ("", "desc", "asc"):
            raise ApiError(3, f"invalid sort_by {sort_by!r}")
        chosen.sort(key=lambda i: str(i.get(key, "")), reverse=order == "desc")
    start = int(q("page_token") or 0)
    size = int(q("page_size") or 0) or len(chosen)
    page = chosen[start : start + size]
    out: dict[str, Any] = {"total_size": len(chosen)}
    if page:
        out[field] = page
    if start + size < len(chosen):
        out["next_page_token"] = str(start + size)
    return out


class KfpApiDouble:
    """The fake KFP API server. Use as a context manager; ``url`` is its base URL."""

    def __init__(self, *, token: str | None = None, multi_user: bool = False) -> None:
        self.token = token
        self.multi_user = multi_user
        self.requests: list[RecordedRequest] = []
        self.pipelines: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, dict[str, Any]] = {}
        self.experiments: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.recurring_runs: dict[str, dict[str, Any]] = {}
        self.run_script: list[str] = ["RUNNING", "SUCCEEDED"]
        self.failure_message = "task 'train' failed: exit status 1"
        self._scripts: dict[str, list[str]] = {}
        self._clock = itertools.count()
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._routes: list[tuple[str, re.Pattern[str], Callable[..., Any]]] = [
            ("GET", re.compile(r"/healthz"), self._healthz),
            ("POST", re.compile(r"/pipelines/upload"), self._upload_pipeline),
            ("POST", re.compile(r"/pipelines/upload_version"), self._upload_version),
            ("GET", re.compile(r"/pipelines"), self._list_pipelines),
            ("GET", re.compile(r"/pipelines/(?P<pid>[^/]+)"), self._get_pipeline),
            ("GET", re.compile(r"/pipelines/(?P<pid>[^/]+)/versions"), self._list_versions),
            (
                "GET",
                re.compile(r"/pipelines/(?P<pid>[^/]+)/versions/(?P<vid>[^/]+)"),
                self._get_version,
            ),
            ("POST", re.compile(r"/experiments"), self._create_experiment),
            ("GET", re.compile(r"/experiments"), self._list_experiments),
            ("GET", re.compile(r"/experiments/(?P<eid>[^/:]+)"), self._get_experiment),
            ("POST", re.compile(r"/runs"), self._create_run),
            ("GET", re.compile(r"/runs"), self._list_runs),
            ("GET", re.compile(r"/runs/(?P<rid>[^/:]+)"), self._get_run),
            ("POST", re.compile(r"/recurringruns"), self._create_recurring_run),
            ("GET", re.compile(r"/recurringruns"), self._list_recurring_runs),
            ("GET", re.compile(r"/recurringruns/(?P<rrid>[^/:]+)"), self._get_recurring_run),
            ("DELETE", re.compile(r"/recurringruns/(?P<rrid>[^/:]+)"), self._delete_rr),
            ("POST", re.compile(r"/recurringruns/(?P<rrid>[^/:]+):enable"), self._enable_rr),
            ("POST", re.compile(r"/recurringruns/(?P<rrid>[^/:]+):disable"), self._disable_rr),
        ]

    # lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> KfpApiDouble:
        handler = _make_handler(self)
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        assert self._server is not None, "use KfpApiDouble as a context manager"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def find(self, method: str, path: str) -> list[RecordedRequest]:
        """Recorded requests with this method and path (path without the API prefix ok)."""
        full = path if path.startswith(_PREFIX) else _PREFIX + path
        return [r for r in self.requests if r.method == method and r.path == full]

    # dispatch --------------------------------------------------------------------------

    def handle(self, req: RecordedRequest) -> tuple[int, Any]:
        """Route one recorded request; returns (HTTP status, JSON body)."""
        with self._lock:
            self.requests.append(req)
            if self.token is not None and not req.authorized:
                return 401, {"code": 16, "message": "Unauthenticated: missing or bad token"}
            if not req.path.startswith(_PREFIX):
                return 404, {"code": 5, "message": f"Not Found: {req.path}"}
            rel = req.path[len(_PREFIX) :]
            for method, pattern, func in self._routes:
                match = pattern.fullmatch(rel)
                if match and method == req.method:
                    try:
                        return 200, func(req, **match.groupdict())
                    except ApiError as exc:
                        status = _HTTP_STATUS.get(exc.code, 500)
                        return status, {"code": exc.code, "message": exc.message}
            return 404, {"code": 5, "message": f"no route for {req.method} {req.path}"}

    def _stamp(self) -> str:
        # A strictly increasing suffix keeps created_at ordering stable within a second.
        base = dt.datetime.now(dt.UTC).replace(microsecond=0)
        tick = next(self._clock)
        return (base + dt.timedelta(microseconds=tick)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def _namespace_ok(self, obj: dict[str, Any], req: RecordedRequest) -> bool:
        want = req.param("namespace")
        return not (self.multi_user and want and obj.get("namespace") not in ("", want))

    # healthz ---------------------------------------------------------------------------

    def _healthz(self, req: RecordedRequest) -> dict[str, Any]:
        return {"multi_user": self.multi_user, "pipeline_store": "database"}

    # pipelines -------------------------------------------------------------------------

    def _parse_package(self, req: RecordedRequest) -> tuple[bytes, dict[str, Any]]:
        upload = req.files.get("uploadfile")
        if upload is None:
            raise ApiError(3, "Failed to read the uploaded file: uploadfile is missing")
        try:
            docs = list(yaml.safe_load_all(upload.data))
        except yaml.YAMLError as exc:
            raise ApiError(3, f"Failed to parse the pipeline spec: {exc}") from None
        spec = docs[0] if docs else None
        if not isinstance(spec, dict) or "root" not in spec or "pipelineInfo" not in spec:
            raise ApiError(3, "Invalid pipeline spec: missing root or pipelineInfo")
        if len(docs) > 1 and docs[1]:
            return upload.data, {"pipeline_spec": spec, "platform_spec": docs[1]}
        return upload.data, spec

    def _new_version(
        self, pipeline_id: str, name: str, description: str, package: bytes, spec: dict
    ) -> dict[str, Any]:
        if any(
            v["pipeline_id"] == pipeline_id and v["display_name"] == name
            for v in self.versions.values()
        ):
            raise ApiError(6, f"Pipeline version with name {name!r} already exists")
        version_id = str(uuid.uuid4())
        version = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": version_id,
            "display_name": name,
            "name": name,
            "description": description,
            "created_at": self._stamp(),
            "pipeline_spec": spec,
        }
        self.versions[version_id] = {**version, "_package": package}
        return version

    def _public(self, obj: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in obj.items() if not k.startswith("_")}

    def _upload_pipeline(self, req: RecordedRequest) -> dict[str, Any]:
        name = req.param("display_name") or req.param("name") or req.files["uploadfile"].filename
        if any(p["display_name"] == name for p in self.pipelines.values()):
            raise ApiError(6, f"Pipeline with name {name!r} already exists")
        package, spec = self._parse_package(req)
        pipeline_id = str(uuid.uuid4())
        pipeline = {
            "pipeline_id": pipeline_id,
            "display_name": name,
            "name": name,
            "description": req.param("description") or "",
            "created_at": self._stamp(),
            "namespace": req.param("namespace") or "",
        }
        self.pipelines[pipeline_id] = pipeline
        self._new_version(pipeline_id, name, pipeline["description"], package, spec)
        return pipeline

    def _upload_version(self, req: RecordedRequest) -> dict[str, Any]:
        pipeline_id = req.param("pipelineid") or ""
        if pipeline_id not in self.pipelines:
            raise ApiError(5, f"Pipeline {pipeline_id!r} not found")
        name = req.param("display_name") or req.param("name") or req.files["uploadfile"].filename
        package, spec = self._parse_package(req)
        return self._new_version(pipeline_id, name, req.param("description") or "", package, spec)

    def _list_pipelines(self, req: RecordedRequest) -> dict[str, Any]:
        items = [p for p in self.pipelines.values() if self._namespace_ok(p, req)]
        return _listing(items, "pipelines", req.query)

    def _get_pipeline(self, req: RecordedRequest, pid: str) -> dict[str, Any]:
        if pid not in self.pipelines:
            raise ApiError(5, f"Pipeline {pid!r} not found")
        return self.pipelines[pid]

    def _list_versions(self, req: RecordedRequest, pid: str) -> dict[str, Any]:
        if pid not in self.pipelines:
            raise ApiError(5, f"Pipeline {pid!r} not found")
        items = [self._public(v) for v in self.versions.values() if v["pipeline_id"] == pid]
        return _listing(items, "pipeline_versions", req.query)

    def _get_version(self, req: RecordedRequest, pid: str, vid: str) -> dict[str, Any]:
        version = self.versions.get(vid)
        if version is None or version["pipeline_id"] != pid:
            raise ApiError(5, f"Pipeline version {vid!r} of pipeline {pid!r} not found")
        return self._public(version)

    # experiments -----------------------------------------------------------------------

    def _create_experiment(self, req: RecordedRequest) -> dict[str, Any]:
        body = req.json or {}
        name = body.get("display_name")
        if not name:
            raise ApiError(3, "Experiment display_name is required")
        namespace = body.get("namespace") or ""
        if any(
            e["display_name"] == name and e["namespace"] == namespace
            for e in self.experiments.values()
        ):
            raise ApiError(6, f"Experiment {name!r} already exists")
        experiment = {
            "experiment_id": str(uuid.uuid4()),
            "display_name": name,
            "description": body.get("description") or "",
            "created_at": self._stamp(),
            "namespace": namespace,
            "storage_state": "AVAILABLE",
            "last_run_created_at": _EPOCH,
        }
        self.experiments[experiment["experiment_id"]] = experiment
        return experiment

    def _list_experiments(self, req: RecordedRequest) -> dict[str, Any]:
        items = [e for e in self.experiments.values() if self._namespace_ok(e, req)]
        return _listing(items, "experiments", req.query)

    def _get_experiment(self, req: RecordedRequest, eid: str) -> dict[str, Any]:
        if eid not in self.experiments:
            raise ApiError(5, f"Experiment {eid!r} not found")
        return self.experiments[eid]

    # runs ------------------------------------------------------------------------------

    def _check_target(self, body: dict[str, Any]) -> None:
        ref = body.get("pipeline_version_reference")
        if bool(ref) == bool(body.get("pipeline_spec")):
            raise ApiError(3, "exactly one of pipeline_spec and pipeline_version_reference")
        if ref:
            version = self.versions.get(ref.get("pipeline_version_id", ""))
            if version is None or version["pipeline_id"] != ref.get("pipeline_id"):
                raise ApiError(5, f"Pipeline version not found: {ref}")
        experiment_id = body.get("experiment_id")
        if experiment_id and experiment_id not in self.experiments:
            raise ApiError(5, f"Experiment {experiment_id!r} not found")

    def _create_run(self, req: RecordedRequest) -> dict[str, Any]:
        body = dict(req.json or {})
        self._check_target(body)
        now = self._stamp()
        run_id = str(uuid.uuid4())
        run = {
            **body,
            "run_id": run_id,
            "storage_state": "AVAILABLE",
            "created_at": now,
            "scheduled_at": now,
            "finished_at": _EPOCH,
            "state": "PENDING",
            "state_history": [{"update_time": now, "state": "PENDING"}],
        }
        self.runs[run_id] = run
        self._scripts[run_id] = list(self.run_script)
        return run

    def _advance(self, run: dict[str, Any]) -> None:
        script = self._scripts.get(run["run_id"], [])
        if not script or run["state"] in _TERMINAL:
            return
        run["state"] = script.pop(0)
        now = self._stamp()
        run["state_history"].append({"update_time": now, "state": run["state"]})
        if run["state"] in _TERMINAL:
            run["finished_at"] = now
        if run["state"] in {"FAILED", "ERROR"}:
            run["error"] = {"code": 2, "message": self.failure_message}

    def _get_run(self, req: RecordedRequest, rid: str) -> dict[str, Any]:
        if rid not in self.runs:
            raise ApiError(5, f"Run {rid!r} not found")
        self._advance(self.runs[rid])
        return self.runs[rid]

    def _list_runs(self, req: RecordedRequest) -> dict[str, Any]:
        experiment_id = req.param("experiment_id")
        items = [
            r
            for r in self.runs.values()
            if (not experiment_id or r.get("experiment_id") == experiment_id)
            and self._namespace_ok(r, req)
        ]
        return _listing(items, "runs", req.query)

    # recurring runs --------------------------------------------------------------------

    def _create_recurring_run(self, req: RecordedRequest) -> dict[str, Any]:
        body = dict(req.json or {})
        self._check_target(body)
        trigger = body.get("trigger") or {}
        if not (trigger.get("cron_schedule") or trigger.get("periodic_schedule")):
            raise ApiError(3, "a recurring run needs a cron_schedule or periodic_schedule")
        now = self._stamp()
        mode = body.get("mode") or "ENABLE"
        rr = {
            **body,
            "recurring_run_id": str(uuid.uuid4()),
            "created_at": now,
            "updated_at": now,
            "mode": mode,
            "status": "ENABLED" if mode == "ENABLE" else "DISABLED",
            # int64 fields travel as JSON strings in proto3 JSON.
            "max_concurrency": str(body.get("max_concurrency") or "1"),
            "no_catchup": bool(body.get("no_catchup")),
        }
        self.recurring_runs[rr["recurring_run_id"]] = rr
        return rr

    def _list_recurring_runs(self, req: RecordedRequest) -> dict[str, Any]:
        experiment_id = req.param("experiment_id")
        items = [
            r
            for r in self.recurring_runs.values()
            if (not experiment_id or r.get("experiment_id") == experiment_id)
            and self._namespace_ok(r, req)
        ]
        # The proto field is camelCase ("recurringRuns"), so the JSON key is too.
        return _listing(items, "recurringRuns", req.query)

    def _rr(self, rrid: str) -> dict[str, Any]:
        if rrid not in self.recurring_runs:
            raise ApiError(5, f"RecurringRun {rrid!r} not found")
        return self.recurring_runs[rrid]

    def _get_recurring_run(self, req: RecordedRequest, rrid: str) -> dict[str, Any]:
        return self._rr(rrid)

    def _set_mode(self, rrid: str, enabled: bool) -> dict[str, Any]:
        rr = self._rr(rrid)
        rr["mode"] = "ENABLE" if enabled else "DISABLE"
        rr["status"] = "ENABLED" if enabled else "DISABLED"
        rr["updated_at"] = self._stamp()
        return {}

    def _enable_rr(self, req: RecordedRequest, rrid: str) -> dict[str, Any]:
        return self._set_mode(rrid, True)

    def _disable_rr(self, req: RecordedRequest, rrid: str) -> dict[str, Any]:
        return self._set_mode(rrid, False)

    def _delete_rr(self, req: RecordedRequest, rrid: str) -> dict[str, Any]:
        self._rr(rrid)
        del self.recurring_runs[rrid]
        return {}


def _parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, str], dict]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body
    )
    form: dict[str, str] = {}
    files: dict[str, UploadedFile] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename is not None:
            files[name] = UploadedFile(filename, part.get_content_type(), data)
        else:
            form[name] = data.decode("utf-8")
    return form, files


def _make_handler(double: KfpApiDouble) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in two writes

        def _serve(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            # Header names as sent (kfp_server_api writes "authorization" in lower case).
            headers = {k.title(): v for k, v in self.headers.items()}
            auth = headers.pop("Authorization", None)
            authorized = None
            if auth is not None:
                scheme = auth.split(" ", 1)[0]
                headers["Authorization"] = f"{scheme} <redacted>"
            if double.token is not None:
                authorized = auth == f"Bearer {double.token}"
            req = RecordedRequest(
                method=self.command,
                path=urllib.parse.unquote(url.path),
                query=urllib.parse.parse_qs(url.query, keep_blank_values=True),
                headers=headers,
                authorized=authorized,
            )
            content_type = self.headers.get("Content-Type", "")
            if raw and content_type.startswith("multipart/form-data"):
                req.form, req.files = _parse_multipart(content_type, raw)
            elif raw:
                req.json = json.loads(raw)
            status, payload = double.handle(req)
            data = json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_PATCH = _serve

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the recorded requests are the log."""

    return Handler
