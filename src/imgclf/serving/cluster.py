"""Apply the rendered InferenceService to a cluster, wait until KServe serves it, or undo.

``kubectl apply`` returns as soon as the API server has stored the object: it says nothing
about whether the new model loads. The deploy step needs that answer, and on a bad version it
must not leave the service half-rolled: so this module writes the object through the
official ``kubernetes`` client, polls its status until KServe reports ``Ready`` for *this*
generation, and otherwise puts back the spec it replaced (or deletes what it created) before
raising :class:`~imgclf.errors.DeployError`.

Writes are replacements (PUT) guarded by the ``resourceVersion`` that was read, so a change
someone else makes in between answers 409 Conflict instead of being overwritten silently;
the write is then retried on a fresh read, a bounded number of times.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import kubernetes
import urllib3
import yaml
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from kubernetes.config.incluster_config import SERVICE_HOST_ENV_NAME, InClusterConfigLoader

from imgclf.errors import DeployError
from imgclf.serving.manifest import API_VERSION, KIND

log = logging.getLogger(__name__)

GROUP, _, VERSION = API_VERSION.partition("/")
PLURAL = "inferenceservices"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
KUBECONFIG_ENV = "KUBECONFIG"
CONFLICT_RETRIES = 3
# One API call must not hang the deploy: the wait has its own, longer, deadline.
REQUEST_TIMEOUT_S = 30.0
# Ready=False for these reasons will not heal by waiting: Knative's for a revision that
# failed (crash loop, image pull, deadline) and KServe's for a model that failed to load.
TERMINAL_REASONS = frozenset(
    {
        "RevisionFailed",
        "ContainerMissing",
        "ProgressDeadlineExceeded",
        "ModelLoadFailed",
        "RuntimeUnhealthy",
        "RuntimeDisabled",
        "NoSupportingRuntime",
        "RuntimeNotRecognized",
        "InvalidPredictorSpec",
    }
)
TERMINAL_TRANSITIONS = frozenset({"BlockedByFailedLoad", "InvalidSpec"})
# Server-owned metadata that must not be sent when an object is created again.
_SERVER_FIELDS = (
    "resourceVersion",
    "uid",
    "generation",
    "creationTimestamp",
    "managedFields",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)

Action = Literal["created", "patched", "unchanged"]
Readiness = Literal["ready", "failed", "pending"]


@dataclasses.dataclass
class ApplyResult:
    """What :func:`apply_and_wait` did: the write, the generation now served, the old spec."""

    action: Action
    name: str
    namespace: str
    generation: int
    waited_s: float
    previous: dict[str, Any] | None


# credentials ---------------------------------------------------------------------------


def _in_cluster() -> bool:
    return bool(os.environ.get(SERVICE_HOST_ENV_NAME)) and (SERVICE_ACCOUNT_DIR / "token").is_file()


def _kubeconfig_path(kubeconfig: str | None) -> Path:
    listed = [p for p in os.environ.get(KUBECONFIG_ENV, "").split(os.pathsep) if p]
    if kubeconfig or listed:
        return Path(kubeconfig or listed[0]).expanduser()
    return Path.home() / ".kube" / "config"


def cluster_configured(kubeconfig: str | None = None) -> bool:
    """Whether :func:`api_client` has credentials to try, so callers can skip the cluster.

    True inside a pod with a mounted service-account token, or when the kubeconfig exists:
    ``kubeconfig`` if given, else the first path of ``$KUBECONFIG``, else ``~/.kube/config``.
    """
    return _in_cluster() or _kubeconfig_path(kubeconfig).is_file()


def api_client(kubeconfig: str | None = None) -> kubernetes.client.ApiClient:
    """A client with the pod's service account, else with a kubeconfig.

    An explicit ``kubeconfig`` wins over in-cluster credentials: whoever names a file means
    it. Any problem becomes a :class:`DeployError` naming where the credentials were looked
    for (never their content: a kubeconfig holds tokens).
    """
    if not kubeconfig and _in_cluster():
        configuration = kubernetes.client.Configuration()
        try:
            InClusterConfigLoader(
                token_filename=str(SERVICE_ACCOUNT_DIR / "token"),
                cert_filename=str(SERVICE_ACCOUNT_DIR / "ca.crt"),
                environ=os.environ,
            ).load_and_set(configuration)
        except ConfigException as exc:
            raise DeployError(f"in-cluster credentials in {SERVICE_ACCOUNT_DIR}: {exc}") from None
        return kubernetes.client.ApiClient(configuration=configuration)
    path = _kubeconfig_path(kubeconfig)
    if not path.is_file():
        raise DeployError(
            f"no Kubernetes credentials: kubeconfig {path} does not exist and "
            f"{SERVICE_HOST_ENV_NAME} / {SERVICE_ACCOUNT_DIR}/token are not set (not in a pod)"
        )
    try:
        return kubernetes.config.new_client_from_config(config_file=str(path), persist_config=False)
    except yaml.YAMLError:
        raise DeployError(f"kubeconfig {path} is not valid YAML") from None
    except (ConfigException, OSError, KeyError, TypeError, ValueError) as exc:
        raise DeployError(f"kubeconfig {path} cannot be used: {exc}") from None


# one InferenceService through the API ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Target:
    """The InferenceService ``namespace/name`` behind ``CustomObjectsApi``."""

    api: kubernetes.client.CustomObjectsApi
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    def _args(self) -> tuple[str, str, str, str]:
        return GROUP, VERSION, self.namespace, PLURAL

    def get(self) -> dict[str, Any] | None:
        try:
            return self.api.get_namespaced_custom_object(
                *self._args(), self.name, _request_timeout=REQUEST_TIMEOUT_S
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.api.create_namespaced_custom_object(
            *self._args(), body, _request_timeout=REQUEST_TIMEOUT_S
        )

    def replace(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.api.replace_namespaced_custom_object(
            *self._args(), self.name, body, _request_timeout=REQUEST_TIMEOUT_S
        )

    def delete(self) -> None:
        try:
            self.api.delete_namespaced_custom_object(
                *self._args(), self.name, _request_timeout=REQUEST_TIMEOUT_S
            )
        except ApiException as exc:
            if exc.status != 404:
                raise


def _api_problem(exc: ApiException) -> str:
    """``403 Forbidden: <message>`` from the Status body (response headers stay out)."""
    message = ""
    try:
        message = json.loads(exc.body or "{}").get("message", "")
    except (ValueError, AttributeError):
        message = ""
    return f"API server answered {exc.status} {exc.reason}" + (f": {message}" if message else "")


def _merged(current: Mapping[str, Any], desired: Mapping[str, Any], field: str) -> dict[str, str]:
    return {**(current.get(field) or {}), **(desired.get(field) or {})}


def _is_current(current: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    meta, want = current.get("metadata") or {}, desired.get("metadata") or {}
    return current.get("spec") == desired.get("spec") and all(
        _merged(meta, want, field) == (meta.get(field) or {}) for field in ("labels", "annotations")
    )


def _replacement(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """``desired``'s spec on ``current``'s metadata, so finalizers, owners and annotations that
    others (KServe, kubectl) keep there survive the PUT; its resourceVersion guards the write.
    """
    meta = {k: v for k, v in (current.get("metadata") or {}).items() if k != "managedFields"}
    want = desired.get("metadata") or {}
    meta["labels"] = _merged(meta, want, "labels")
    meta["annotations"] = _merged(meta, want, "annotations")
    return {
        "apiVersion": desired.get("apiVersion", API_VERSION),
        "kind": desired.get("kind", KIND),
        "metadata": meta,
        "spec": copy.deepcopy(desired.get("spec")),
    }


def _converge(
    target: _Target, desired: dict[str, Any]
) -> tuple[Action, dict[str, Any], dict[str, Any] | None]:
    """Create or replace until the stored object carries ``desired``.

    Returns the action, the stored object and the object it replaced. A 409 (changed since
    read, or created meanwhile) is retried on a fresh read, at most ``CONFLICT_RETRIES`` times.
    """
    for attempt in range(CONFLICT_RETRIES + 1):
        current = target.get()
        try:
            if current is None:
                log.info("creating InferenceService %s", target)
                return "created", target.create(desired), None
            if _is_current(current, desired):
                log.info("InferenceService %s already has this spec", target)
                return "unchanged", current, current
            log.info("replacing the spec of InferenceService %s", target)
            return "patched", target.replace(_replacement(current, desired)), current
        except ApiException as exc:
            if exc.status != 409:
                raise
            log.info(
                "InferenceService %s changed while being written (%s); retry %d of %d",
                target,
                exc.reason,
                attempt + 1,
                CONFLICT_RETRIES,
            )
    raise DeployError(
        f"InferenceService {target}: the object kept changing while being written "
        f"(409 Conflict {CONFLICT_RETRIES + 1} times); is another deploy running?"
    )


# readiness -----------------------------------------------------------------------------


def _condition_text(condition: Mapping[str, Any]) -> str:
    text = f"{condition.get('type')}={condition.get('status')}"
    if condition.get("reason"):
        text += f" reason {condition['reason']}"
    if condition.get("message"):
        text += f": {condition['message']}"
    return text


def readiness(obj: Mapping[str, Any], generation: int) -> tuple[Readiness, str]:
    """(``ready`` | ``failed`` | ``pending``, what the status says) for ``generation``.

    A status whose ``observedGeneration`` is older than ``generation`` describes the spec
    that was replaced, so it is neither success nor failure of this one.
    """
    status = obj.get("status") or {}
    observed = status.get("observedGeneration")
    if observed is not None and int(observed) < generation:
        return "pending", f"status still describes generation {observed} (applied {generation})"
    conditions = [c for c in status.get("conditions") or [] if isinstance(c, Mapping)]
    ready = next((c for c in conditions if c.get("type") == "Ready"), None)
    if ready is not None and ready.get("status") == "True":
        return "ready", _condition_text(ready)
    model = status.get("modelStatus") or {}
    if model.get("transitionStatus") in TERMINAL_TRANSITIONS:
        failure = model.get("lastFailureInfo") or {}
        detail = ": ".join(str(failure[k]) for k in ("reason", "message") if failure.get(k))
        return "failed", f"model {model['transitionStatus']}" + (f" ({detail})" if detail else "")
    for condition in conditions:
        if condition.get("status") == "False" and condition.get("reason") in TERMINAL_REASONS:
            return "failed", _condition_text(condition)
    return "pending", _condition_text(ready) if ready else "no Ready condition yet"


def _wait_ready(
    target: _Target,
    generation: int,
    *,
    timeout_s: float,
    poll_s: float,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> tuple[Readiness, str, float]:
    """Poll until ready, failed or ``timeout_s`` (then ``pending``); also the seconds waited."""
    start = clock()
    last = ""
    while True:
        try:
            obj = target.get()
        except ApiException as exc:
            if exc.status != 429 and exc.status < 500:
                return "failed", _api_problem(exc), clock() - start
            state, seen = "pending", _api_problem(exc)
        else:
            if obj is None:
                return "failed", "the object was deleted while waiting", clock() - start
            state, seen = readiness(obj, generation)
        if seen != last:
            log.info("InferenceService %s: %s", target, seen)
            last = seen
        waited = clock() - start
        if state != "pending" or waited >= timeout_s:
            return state, seen, waited
        sleep(min(poll_s, timeout_s - waited))


# undo ----------------------------------------------------------------------------------


def _as_new(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k not in _SERVER_FIELDS}
    return {
        "apiVersion": obj.get("apiVersion", API_VERSION),
        "kind": obj.get("kind", KIND),
        "metadata": meta,
        "spec": copy.deepcopy(obj.get("spec")),
    }


def restore(
    client: kubernetes.client.ApiClient,
    *,
    namespace: str,
    name: str,
    previous: Mapping[str, Any] | None,
) -> str:
    """Undo a deploy: put ``previous`` (the whole object read before it) back, or delete.

    ``previous`` None means the deploy created the object, so removing it restores the
    cluster. Returns what was done, for the error message.
    """
    target = _Target(kubernetes.client.CustomObjectsApi(client), namespace, name)
    if previous is None:
        log.warning("deleting InferenceService %s, which this deploy created", target)
        target.delete()
        return "deleted the InferenceService this deploy created"
    log.warning("restoring the previous spec of InferenceService %s", target)
    action, _, _ = _converge(target, _as_new(previous))
    return "re-created the previous object" if action == "created" else "restored previous spec"


def _undo(client: kubernetes.client.ApiClient, target: _Target, previous: Any) -> str:
    try:
        return restore(client, namespace=target.namespace, name=target.name, previous=previous)
    except ApiException as exc:
        return f"restoring FAILED too ({_api_problem(exc)}); fix it by hand"
    except (DeployError, urllib3.exceptions.HTTPError) as exc:
        return f"restoring FAILED too ({exc}); fix it by hand"


# the deploy ----------------------------------------------------------------------------


def _identity(manifest: Mapping[str, Any]) -> tuple[str, str]:
    meta = manifest.get("metadata") or {}
    if manifest.get("apiVersion") != API_VERSION or manifest.get("kind") != KIND:
        raise DeployError(
            f"not a {API_VERSION} {KIND}: {manifest.get('apiVersion')} {manifest.get('kind')}"
        )
    if not meta.get("name") or not meta.get("namespace"):
        raise DeployError(f"{KIND} manifest needs metadata.name and metadata.namespace")
    return str(meta["namespace"]), str(meta["name"])


def apply_and_wait(
    manifest: dict[str, Any],
    *,
    client: kubernetes.client.ApiClient,
    timeout_s: float,
    poll_s: float = 2.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> ApplyResult:
    """Create or replace the InferenceService and wait until it is Ready for this spec.

    Ready means condition ``Ready`` is ``"True"`` and ``status.observedGeneration`` (when
    KServe reports it) has reached the generation written, so a stale Ready of the replaced
    spec does not count. A terminal failure (see ``TERMINAL_REASONS``) or ``timeout_s``
    restores the previous spec, or deletes the object this call created, and raises
    :class:`DeployError`. ``clock`` and ``sleep`` are injectable so tests need no real time.
    """
    namespace, name = _identity(manifest)
    target = _Target(kubernetes.client.CustomObjectsApi(client), namespace, name)
    host = client.configuration.host
    try:
        action, stored, previous = _converge(target, manifest)
    except ApiException as exc:
        raise DeployError(f"cannot apply InferenceService {target}: {_api_problem(exc)}") from None
    except urllib3.exceptions.HTTPError as exc:
        raise DeployError(f"cannot reach the Kubernetes API server at {host}: {exc}") from None
    generation = int((stored.get("metadata") or {}).get("generation") or 0)
    log.info("waiting for InferenceService %s to become Ready (timeout %g s)", target, timeout_s)
    try:
        state, seen, waited = _wait_ready(
            target, generation, timeout_s=timeout_s, poll_s=poll_s, clock=clock, sleep=sleep
        )
    except urllib3.exceptions.HTTPError as exc:
        state, seen, waited = "failed", f"lost the API server at {host}: {exc}", 0.0
    if state == "ready":
        log.info("InferenceService %s is Ready (generation %d)", target, generation)
        return ApplyResult(
            action=action,
            name=name,
            namespace=namespace,
            generation=generation,
            waited_s=waited,
            previous=copy.deepcopy(previous.get("spec")) if previous else None,
        )
    what = (
        f"failed ({seen})"
        if state == "failed"
        else f"did not become Ready within {timeout_s:g} s (last seen: {seen})"
    )
    if action == "unchanged":
        undone = "nothing to restore: this deploy did not change the object"
    else:
        undone = _undo(client, target, previous)
    raise DeployError(f"InferenceService {target} {what}; {undone}")
