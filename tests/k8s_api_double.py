"""A recording stand-in for the Kubernetes API server's custom-resource and pod endpoints.

It stands in ONLY for ``kube-apiserver`` (with KServe's CRD installed and a controller that
updates status), which cannot run on a CI runner. Everything on the client side is real:
the official ``kubernetes`` client talks real HTTP to this threaded ``http.server`` on
127.0.0.1 (a free port), so the methods, paths, query strings, headers and JSON bodies the
tests inspect are the ones a cluster would receive.

Modelled on the real server: objects under
``/apis/serving.kserve.io/v1beta1/namespaces/{ns}/inferenceservices[/{name}]`` get a
``uid``, ``creationTimestamp``, a string ``resourceVersion`` from one increasing counter and
a ``generation`` that increases only when ``spec`` changes; ``status`` is a subresource, so
writes to the main resource never change it. PUT with a stale ``resourceVersion`` answers
409 Conflict, POST of an existing name 409 AlreadyExists, a missing object or an unknown
path 404; errors are ``Status`` objects in the server's shape. PATCH takes JSON merge patch
(RFC 7386) only (415 otherwise).

The controller is simulated on reads: ``ready_after_polls`` GETs of an object after each
spec change, its status moves to the applied generation with the outcome ``mode`` chooses:

- ``"ready"``: ``Ready=True``;
- ``"never"``: ``Ready=False`` reason ``RevisionMissing`` (still rolling out, not terminal);
- ``"failed"``: ``Ready=False`` reason ``RevisionFailed`` and the model ``BlockedByFailedLoad``;
- ``"conflict_once"``: as ``"ready"``, but the first PUT answers 409 Conflict.

``conflicts_left`` counts the PUTs still to answer 409 whatever their resourceVersion
(1 in ``"conflict_once"`` mode, 0 otherwise); a test may raise it.

Until then a GET shows the previous status (a stale ``Ready=True`` of the old generation
after a replace), as a real controller that has not reconciled yet would.

Other custom resources (``RESOURCES``: Kubeflow Trainer's TrainJob and the training
operator's PyTorchJob besides InferenceService) are served under their own
``/apis/{group}/{version}/namespaces/{ns}/{plural}`` paths with the same object semantics
(:meth:`K8sApiDouble.store` holds each; ``objects`` stays the InferenceServices). Their
controller is a script: ``status_scripts[plural]`` lists the statuses the n-th GET of an
object shows (the last one stays), as a job that runs and then ends would.

Pods are a read-only list the test fills with :meth:`K8sApiDouble.add_pod`:
``GET /api/v1/namespaces/{ns}/pods`` honours an equality ``labelSelector``, and
``GET .../pods/{name}/log`` answers ``text/plain``; a pod's log may be a list of snapshots,
the n-th read getting the n-th (the last one stays), so a log that grows between polls can
be scripted.

Every request is recorded (method, path, query, headers with the Authorization *value*
redacted, parsed JSON body). With ``token=...`` every request must carry
``Authorization: Bearer <token>`` (401 otherwise). :func:`write_kubeconfig` writes a
kubeconfig that points ``kubernetes.config.new_client_from_config`` at the double.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import http.server
import itertools
import json
import re
import threading
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import yaml

GROUP = "serving.kserve.io"
VERSION = "v1beta1"
PLURAL = "inferenceservices"
MODES = ("ready", "never", "failed", "conflict_once")
_PODS = re.compile(r"/api/v1/namespaces/(?P<ns>[^/]+)/pods(?:/(?P<name>[^/]+)(?P<log>/log)?)?")


@dataclasses.dataclass(frozen=True)
class Resource:
    """A custom resource the double serves: its API group, version, plural and kind."""

    group: str
    version: str
    plural: str
    kind: str

    def path(self, namespace: str, name: str | None = None) -> str:
        """The API path of the collection, or of one object."""
        base = f"/apis/{self.group}/{self.version}/namespaces/{namespace}/{self.plural}"
        return f"{base}/{name}" if name else base


INFERENCE_SERVICES = Resource(GROUP, VERSION, PLURAL, "InferenceService")
PYTORCHJOBS = Resource("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob")
TRAINJOBS = Resource("trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob")
RESOURCES = (INFERENCE_SERVICES, PYTORCHJOBS, TRAINJOBS)
_ANY_COLLECTION = re.compile(
    r"/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)"
    r"(?:/(?P<name>[^/]+))?"
)
_STATUS_FIELDS = {
    "never": {
        "reason": "RevisionMissing",
        "message": 'Configuration "{name}-predictor" is waiting for a Revision to become ready.',
    },
    "failed": {
        "reason": "RevisionFailed",
        "message": 'Revision "{name}-predictor-00002" failed with message: back-off 5m0s '
        "restarting failed container=kserve-container.",
    },
}


@dataclasses.dataclass
class RecordedRequest:
    """One request as the server saw it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    authorized: bool | None
    json: Any = None


class ApiStatus(Exception):
    """An error answer, sent as a ``Status`` object with HTTP status ``code``."""

    def __init__(self, code: int, reason: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def body(self) -> dict[str, Any]:
        out = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            out["details"] = self.details
        return out


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


class K8sApiDouble:
    """The fake API server. Use as a context manager; ``url`` is its base URL."""

    def __init__(
        self, *, token: str | None = None, mode: str = "ready", ready_after_polls: int = 1
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        self.token = token
        self.mode = mode
        self.ready_after_polls = ready_after_polls
        self.requests: list[RecordedRequest] = []
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self._stores: dict[Resource, dict[tuple[str, str], dict[str, Any]]] = {
            res: {} for res in RESOURCES
        }
        self._stores[INFERENCE_SERVICES] = self.objects
        self.status_scripts: dict[str, list[dict[str, Any]]] = {}
        self._script_reads: dict[tuple[str, str, str], int] = {}
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self._log_reads: dict[tuple[str, str], int] = {}
        self._logs: dict[tuple[str, str], list[str]] = {}
        self._polls: dict[tuple[str, str], int] = {}
        self.conflicts_left = 1 if mode == "conflict_once" else 0
        self._versions = itertools.count(1000)
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> K8sApiDouble:
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
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
        assert self._server is not None, "use K8sApiDouble as a context manager"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @staticmethod
    def path(namespace: str, name: str | None = None) -> str:
        """The API path of the collection, or of one object."""
        base = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"
        return f"{base}/{name}" if name else base

    def store(self, resource: Resource) -> dict[tuple[str, str], dict[str, Any]]:
        """The stored objects of ``resource`` by (namespace, name)."""
        return self._stores[resource]

    def seed_object(
        self, resource: Resource, manifest: dict[str, Any], status: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Store an existing object of ``resource`` (with ``status``) without a request."""
        with self._lock:
            meta = manifest["metadata"]
            obj = self._stored(resource, copy.deepcopy(manifest), meta["namespace"], meta["name"])
            if status is not None:
                obj["status"] = copy.deepcopy(status)
            return copy.deepcopy(obj)

    def add_pod(
        self,
        namespace: str,
        name: str,
        labels: dict[str, str],
        log: str | list[str] = "",
        phase: str = "Running",
    ) -> None:
        """A pod the pod endpoints list and whose log they serve (see the module docstring)."""
        with self._lock:
            self.pods[(namespace, name)] = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "labels": dict(labels),
                    "uid": str(uuid.uuid4()),
                    "creationTimestamp": _now(),
                },
                "spec": {"containers": [{"name": "main", "image": "example"}]},
                "status": {"phase": phase},
            }
            self._logs[(namespace, name)] = [log] if isinstance(log, str) else list(log)
            self._log_reads[(namespace, name)] = 0

    def find(self, method: str, path: str | None = None) -> list[RecordedRequest]:
        """Recorded requests with this method (and path, when given), in order."""
        return [r for r in self.requests if r.method == method and path in (None, r.path)]

    def seed(self, manifest: dict[str, Any], *, ready: bool = True) -> dict[str, Any]:
        """Store an existing object (generation 1, reconciled) without recording a request."""
        with self._lock:
            meta = manifest["metadata"]
            obj = self._stored(
                INFERENCE_SERVICES, copy.deepcopy(manifest), meta["namespace"], meta["name"]
            )
            if ready:
                obj["status"] = self._status(obj, "ready")
            return copy.deepcopy(obj)

    # dispatch --------------------------------------------------------------------------

    def handle(self, req: RecordedRequest, content_type: str) -> tuple[int, Any]:
        """Route one recorded request; returns (HTTP status, JSON body)."""
        with self._lock:
            self.requests.append(req)
            if self.token is not None and not req.authorized:
                return 401, ApiStatus(401, "Unauthorized", "Unauthorized").body()
            try:
                pods = _PODS.fullmatch(req.path)
                if pods is not None:
                    return self._pods(req, pods["ns"], pods["name"], bool(pods["log"]))
                match = _ANY_COLLECTION.fullmatch(req.path)
                res = self._resource(match)
                ns, name = match["ns"], match["name"]
                if name is None:
                    return self._collection(req, res, ns)
                return self._item(req, res, ns, name, content_type)
            except ApiStatus as exc:
                return exc.code, exc.body()

    def _resource(self, match: re.Match[str] | None) -> Resource:
        for res in RESOURCES:
            if match is not None and (res.group, res.version, res.plural) == (
                match["group"],
                match["version"],
                match["plural"],
            ):
                return res
        raise ApiStatus(404, "NotFound", "the server could not find the requested resource")

    def _pods(self, req: RecordedRequest, ns: str, name: str | None, log: bool) -> tuple[int, Any]:
        if req.method != "GET":
            raise ApiStatus(405, "MethodNotAllowed", f"{req.method} is not supported here")
        if name is None:
            wanted = _parse_selector((req.query.get("labelSelector") or [""])[0])
            items = [
                copy.deepcopy(pod)
                for (n, _), pod in sorted(self.pods.items())
                if n == ns and wanted.items() <= pod["metadata"]["labels"].items()
            ]
            listing = {
                "apiVersion": "v1",
                "kind": "PodList",
                "metadata": {"resourceVersion": str(next(self._versions))},
                "items": items,
            }
            return 200, listing
        key = (ns, name)
        if key not in self.pods:
            raise ApiStatus(
                404, "NotFound", f'pods "{name}" not found', {"name": name, "kind": "pods"}
            )
        if not log:
            return 200, copy.deepcopy(self.pods[key])
        snapshots = self._logs[key]
        text = snapshots[min(self._log_reads[key], len(snapshots) - 1)]
        self._log_reads[key] += 1
        return 200, text

    def _collection(self, req: RecordedRequest, res: Resource, ns: str) -> tuple[int, Any]:
        objects = self._stores[res]
        if req.method == "GET":
            items = [copy.deepcopy(o) for (n, _), o in sorted(objects.items()) if n == ns]
            listing = {
                "apiVersion": f"{res.group}/{res.version}",
                "kind": f"{res.kind}List",
                "metadata": {"resourceVersion": str(next(self._versions))},
                "items": items,
            }
            return 200, listing
        if req.method == "POST":
            return 201, self._create(res, req.json or {}, ns)
        raise ApiStatus(405, "MethodNotAllowed", f"{req.method} is not supported here")

    def _item(
        self, req: RecordedRequest, res: Resource, ns: str, name: str, content_type: str
    ) -> tuple[int, Any]:
        key = (ns, name)
        objects = self._stores[res]
        if key not in objects:
            raise self._not_found(name, res)
        if req.method == "GET":
            if res == INFERENCE_SERVICES:
                self._reconcile(key)
            else:
                self._run_script(res, key)
            return 200, copy.deepcopy(objects[key])
        if res != INFERENCE_SERVICES and req.method != "DELETE":
            raise ApiStatus(405, "MethodNotAllowed", f"{req.method} is not supported here")
        if req.method == "PUT":
            return 200, self._replace(req.json or {}, key)
        if req.method == "PATCH":
            if content_type.split(";")[0].strip() != "application/merge-patch+json":
                raise ApiStatus(
                    415,
                    "UnsupportedMediaType",
                    f"the body of the request was in an unknown format: {content_type}",
                )
            return 200, self._patch(req.json, key)
        if req.method == "DELETE":
            obj = objects.pop(key)
            details = {
                "name": name,
                "group": res.group,
                "kind": res.plural,
                "uid": obj["metadata"]["uid"],
            }
            return 200, {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": details,
            }
        raise ApiStatus(405, "MethodNotAllowed", f"{req.method} is not supported here")

    # object store --------------------------------------------------------------------

    @staticmethod
    def _not_found(name: str, res: Resource = INFERENCE_SERVICES) -> ApiStatus:
        details = {"name": name, "group": res.group, "kind": res.plural}
        return ApiStatus(404, "NotFound", f'{res.plural}.{res.group} "{name}" not found', details)

    def _stored(self, res: Resource, body: dict[str, Any], ns: str, name: str) -> dict[str, Any]:
        meta = body.setdefault("metadata", {})
        meta.update(
            namespace=ns,
            uid=str(uuid.uuid4()),
            creationTimestamp=_now(),
            generation=1,
            resourceVersion=str(next(self._versions)),
        )
        body.pop("status", None)
        self._stores[res][(ns, name)] = body
        if res == INFERENCE_SERVICES:
            self._polls[(ns, name)] = 0
        else:
            self._script_reads[(res.plural, ns, name)] = 0
        return body

    def _create(self, res: Resource, body: dict[str, Any], ns: str) -> dict[str, Any]:
        meta = body.get("metadata") or {}
        name = meta.get("name")
        if not name or meta.get("namespace", ns) != ns:
            raise ApiStatus(400, "BadRequest", "metadata.name is required and namespace must match")
        if (ns, name) in self._stores[res]:
            details = {"name": name, "group": res.group, "kind": res.plural}
            raise ApiStatus(
                409, "AlreadyExists", f'{res.plural}.{res.group} "{name}" already exists', details
            )
        return copy.deepcopy(self._stored(res, copy.deepcopy(body), ns, name))

    def _conflict(self, name: str) -> ApiStatus:
        return ApiStatus(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {PLURAL}.{GROUP} "{name}": the object has been '
            "modified; please apply your changes to the latest version and try again",
            {"name": name, "group": GROUP, "kind": PLURAL},
        )

    def _replace(self, body: dict[str, Any], key: tuple[str, str]) -> dict[str, Any]:
        stored = self.objects[key]
        meta = body.get("metadata") or {}
        if meta.get("name") != key[1] or meta.get("namespace", key[0]) != key[0]:
            raise ApiStatus(
                400, "BadRequest", "the name/namespace of the body does not match the URL"
            )
        if self.conflicts_left:
            self.conflicts_left -= 1
            raise self._conflict(key[1])
        version = meta.get("resourceVersion")
        if version is not None and version != stored["metadata"]["resourceVersion"]:
            raise self._conflict(key[1])
        return self._store_update(copy.deepcopy(body), key)

    def _patch(self, patch: Any, key: tuple[str, str]) -> dict[str, Any]:
        stored = self.objects[key]
        version = ((patch or {}).get("metadata") or {}).get("resourceVersion")
        if version is not None and version != stored["metadata"]["resourceVersion"]:
            raise self._conflict(key[1])
        return self._store_update(_merge_patch(stored, patch), key)

    def _store_update(self, new: dict[str, Any], key: tuple[str, str]) -> dict[str, Any]:
        """Write ``new`` over the stored object, keeping server-owned fields and status."""
        stored = self.objects[key]
        old_meta = stored["metadata"]
        meta = new.setdefault("metadata", {})
        for field in ("uid", "creationTimestamp", "namespace", "name"):
            meta[field] = old_meta[field]
        spec_changed = new.get("spec") != stored.get("spec")
        meta["generation"] = old_meta["generation"] + int(spec_changed)
        meta["resourceVersion"] = str(next(self._versions))
        new.pop("status", None)
        if "status" in stored:
            new["status"] = stored["status"]
        if spec_changed:
            self._polls[key] = 0
        self.objects[key] = new
        return copy.deepcopy(new)

    # the simulated controller ----------------------------------------------------------

    def _status(self, obj: dict[str, Any], mode: str) -> dict[str, Any]:
        generation = obj["metadata"]["generation"]
        name = obj["metadata"]["name"]
        stamp = _now()
        if mode in ("ready", "conflict_once"):
            ready = {"type": "Ready", "status": "True", "lastTransitionTime": stamp}
            return {
                "observedGeneration": generation,
                "conditions": [
                    {"type": "PredictorReady", "status": "True", "lastTransitionTime": stamp},
                    ready,
                ],
                "url": f"http://{name}.{obj['metadata']['namespace']}.example.com",
                "modelStatus": {"transitionStatus": "UpToDate"},
            }
        fields = {k: v.format(name=name) for k, v in _STATUS_FIELDS[mode].items()}
        status: dict[str, Any] = {
            "observedGeneration": generation,
            "conditions": [
                {
                    "type": "PredictorReady",
                    "status": "False",
                    "lastTransitionTime": stamp,
                    **fields,
                },
                {"type": "Ready", "status": "False", "lastTransitionTime": stamp, **fields},
            ],
            "modelStatus": {"transitionStatus": "InProgress"},
        }
        if mode == "failed":
            status["modelStatus"] = {
                "transitionStatus": "BlockedByFailedLoad",
                "lastFailureInfo": {"reason": "ModelLoadFailed", "message": fields["message"]},
            }
        return status

    def _run_script(self, res: Resource, key: tuple[str, str]) -> None:
        script = self.status_scripts.get(res.plural)
        reads = (res.plural, *key)
        if not script:
            return
        step = script[min(self._script_reads.get(reads, 0), len(script) - 1)]
        self._script_reads[reads] = self._script_reads.get(reads, 0) + 1
        self._stores[res][key]["status"] = copy.deepcopy(step)

    def _reconcile(self, key: tuple[str, str]) -> None:
        obj = self.objects[key]
        self._polls[key] += 1
        observed = (obj.get("status") or {}).get("observedGeneration")
        due = self._polls[key] >= self.ready_after_polls
        if due and observed != obj["metadata"]["generation"]:
            obj["status"] = self._status(obj, self.mode)


def _parse_selector(text: str) -> dict[str, str]:
    """An equality-based label selector (``a=b,c==d``) as a dict; other forms are refused."""
    wanted: dict[str, str] = {}
    for term in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = term.replace("==", "=").partition("=")
        if not sep or "!" in key:
            raise ApiStatus(
                400, "BadRequest", f"the double only serves equality selectors, got {term!r}"
            )
        wanted[key.strip()] = value.strip()
    return wanted


def write_kubeconfig(
    path: Path, server: str, *, token: str | None = None, namespace: str = "default"
) -> Path:
    """A kubeconfig with one context whose cluster is ``server`` and user a bearer ``token``."""
    user: dict[str, Any] = {"token": token} if token else {}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "double", "cluster": {"server": server}}],
        "users": [{"name": "double", "user": user}],
        "contexts": [
            {
                "name": "double",
                "context": {"cluster": "double", "user": "double", "namespace": namespace},
            }
        ],
        "current-context": "double",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def _make_handler(double: K8sApiDouble) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in two writes

        def _serve(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            headers = {k.title(): v for k, v in self.headers.items()}
            auth = headers.pop("Authorization", None)
            if auth is not None:
                headers["Authorization"] = f"{auth.split(' ', 1)[0]} <redacted>"
            authorized = None if double.token is None else auth == f"Bearer {double.token}"
            req = RecordedRequest(
                method=self.command,
                path=urllib.parse.unquote(url.path),
                query=urllib.parse.parse_qs(url.query, keep_blank_values=True),
                headers=headers,
                authorized=authorized,
                json=json.loads(raw) if raw else None,
            )
            status, payload = double.handle(req, self.headers.get("Content-Type", ""))
            # A pod log is the one plain-text answer; everything else is JSON.
            text = isinstance(payload, str)
            data = payload.encode("utf-8") if text else json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if text else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the recorded requests are the log."""

    return Handler


class FakeClock:
    """``clock`` and ``sleep`` for the wait loops (apply_and_wait, submit_and_wait):
    sleeping only moves the clock, so timeouts are tested without waiting."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def hide_cluster_credentials(monkeypatch: Any, tmp_path: Path, *, home: bool = True) -> None:
    """Keep this machine's credentials (a pod's service account, ~/.kube/config,
    $KUBECONFIG) out of a test: only what the test writes may reach a cluster."""
    from imgclf.serving import cluster

    if home:
        (tmp_path / "home").mkdir(exist_ok=True)
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(cluster, "SERVICE_ACCOUNT_DIR", tmp_path / "no-service-account")
