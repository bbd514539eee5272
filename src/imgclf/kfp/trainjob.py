"""Run ``imgclf train`` as a Kubeflow training job on several nodes, and wait for it.

With ``kfp.train_backend: trainjob`` or ``pytorchjob`` the pipeline's train task does not
train in its own pod: it renders a Kubeflow Trainer ``TrainJob`` (trainer.kubeflow.org/
v1alpha1) or a training-operator ``PyTorchJob`` (kubeflow.org/v1) that runs the same image
and ``imgclf train`` arguments on ``kfp.num_nodes`` nodes, each with the GPU, CPU and memory
of :class:`~imgclf.kfp.settings.ClusterSettings`, submits it and waits until it ends,
printing each status change and the master pod's log so that the KFP UI shows them.

The job's name comes from the KFP run (:func:`job_name`), so a retried task finds the job
its first attempt created (409 AlreadyExists) and waits for that one instead of starting
the training over. A job that fails, or does not finish in time, raises
:class:`TrainingJobFailed` with the reason the controller gave.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException

from imgclf.errors import ImgclfError
from imgclf.kfp.settings import ClusterSettings
from imgclf.serving import cluster as k8s_cluster
from imgclf.storage.staging import local_input, local_output

# Variables the library's S3 client reads (imgclf.storage.s3config); the Secret's keys may
# be named differently, the ConfigMap's keys are these names (as in the pipeline's pods).
ACCESS_KEY_ENV = "AWS_ACCESS_KEY_ID"
SECRET_KEY_ENV = "AWS_SECRET_ACCESS_KEY"
S3_CONFIG_ENV = ("MINIO_ENDPOINT", "AWS_REGION")
TRAIN_COMMAND = ("imgclf", "train")
# The training operator finds the training container of a PyTorchJob by this name.
PYTORCH_CONTAINER = "pytorch"
# The replicated job of the torch runtimes of Kubeflow Trainer, where overrides apply.
TRAINJOB_NODE_JOB = "node"
LABELS = {"app.kubernetes.io/name": "imgclf", "app.kubernetes.io/component": "train"}
# Pods are named <job>-worker-<i> (PyTorchJob) or <job>-node-0-<i> (TrainJob's JobSet) and
# a pod's hostname is a DNS label (<= 63): the job name leaves room for that suffix.
MAX_NAME_LENGTH = 52
REQUEST_TIMEOUT_S = 30.0


class TrainingJobFailed(ImgclfError):
    """The training job failed, vanished, could not be submitted or did not end in time."""

    exit_code = 4


@dataclasses.dataclass(frozen=True)
class JobKind:
    """What differs between the two job APIs: where they live and how they say "done"."""

    api_version: str
    kind: str
    plural: str
    succeeded: str
    failed: str

    @property
    def group(self) -> str:
        return self.api_version.partition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.partition("/")[2]

    def master_selector(self, name: str) -> str:
        """The label selector of the job's pods that may hold the master's log."""
        if self.kind == PYTORCHJOB.kind:
            return (
                f"training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=master"
            )
        return f"jobset.sigs.k8s.io/jobset-name={name}"


PYTORCHJOB = JobKind("kubeflow.org/v1", "PyTorchJob", "pytorchjobs", "Succeeded", "Failed")
TRAINJOB = JobKind("trainer.kubeflow.org/v1alpha1", "TrainJob", "trainjobs", "Complete", "Failed")
_KINDS = {(k.api_version, k.kind): k for k in (PYTORCHJOB, TRAINJOB)}


# names and locations ---------------------------------------------------------------------


def job_name(run_id: str, prefix: str = "imgclf-train") -> str:
    """A DNS-1123 job name for ``run_id`` (a KFP run id, or any name), stable across retries.

    Characters a name may not hold become ``-``; a name too long for the pods' hostnames is
    cut and ends with a hash of the whole, so two long run ids never share a job.
    """
    raw = f"{prefix}-{run_id}".lower()
    name = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", raw)).strip("-")
    if len(name) > MAX_NAME_LENGTH:
        digest = hashlib.sha256(raw.encode("utf-8")).hexdigest()[:8]
        name = f"{name[: MAX_NAME_LENGTH - 9].rstrip('-')}-{digest}"
    if not name or not name[0].isalpha():
        name = f"j{name}"[:MAX_NAME_LENGTH].rstrip("-")
    return name


def s3_uri(artifact_uri: str) -> str:
    """The ``s3://`` form of a KFP artifact URI (``minio://bucket/key`` on KFP's MinIO)."""
    scheme, sep, rest = artifact_uri.partition("://")
    if sep and scheme in ("minio", "s3"):
        return f"s3://{rest}"
    raise TrainingJobFailed(
        f"artifact {artifact_uri}: a training job's pods reach only s3:// or minio:// artifacts"
    )


def pod_namespace(default: str) -> str:
    """The namespace of the pod this runs in (its service account's), else ``default``."""
    path = k8s_cluster.SERVICE_ACCOUNT_DIR / "namespace"
    try:
        return path.read_text(encoding="utf-8").strip() or default
    except OSError:
        return default


def train_overrides(values: Mapping[str, Any]) -> list[str]:
    """``--set key=value`` flags of ``imgclf train`` for ``values`` of the ``train`` section.

    Each value is written as JSON, which is YAML too, so the CLI reads back the same type
    (the string ``"1e-3"`` stays a string, ``2`` an int).
    """
    flags: list[str] = []
    for key, value in values.items():
        flags += ["--set", f"{key}={json.dumps(value)}"]
    return flags


# manifests -------------------------------------------------------------------------------


def _env(cluster: ClusterSettings) -> list[dict[str, Any]]:
    """The object store's credentials (Secret references, never values) and endpoint."""
    secrets = (
        (ACCESS_KEY_ENV, cluster.minio_access_key_key),
        (SECRET_KEY_ENV, cluster.minio_secret_key_key),
    )
    env = [
        {"name": var, "valueFrom": {"secretKeyRef": {"name": cluster.minio_secret, "key": key}}}
        for var, key in secrets
    ]
    env += [
        {"name": var, "valueFrom": {"configMapKeyRef": {"name": cluster.s3_config_map, "key": var}}}
        for var in S3_CONFIG_ENV
    ]
    return env


def _resources(cluster: ClusterSettings) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": cluster.train_cpu_limit, "memory": cluster.train_memory_limit}
    if cluster.gpu_limit > 0:
        limits[cluster.gpu_resource] = cluster.gpu_limit
    requests = {"cpu": cluster.train_cpu_request, "memory": cluster.train_memory_request}
    return {"requests": requests, "limits": limits}


def _placement(cluster: ClusterSettings) -> dict[str, Any]:
    """Node selector and toleration of GPU nodes; nothing when training without a GPU."""
    if cluster.gpu_limit <= 0:
        return {}
    toleration = {
        "key": cluster.gpu_toleration_key,
        "operator": "Exists",
        "effect": cluster.gpu_toleration_effect,
    }
    return {"nodeSelector": dict(cluster.gpu_node_selector), "tolerations": [toleration]}


def _metadata(name: str, namespace: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": dict(LABELS)}


def render_pytorchjob(
    *, name: str, namespace: str, image: str, train_args: Sequence[str], cluster: ClusterSettings
) -> dict[str, Any]:
    """A PyTorchJob: one Master and ``num_nodes - 1`` Workers running ``imgclf train``.

    ``nprocPerNode`` is 1 because ``imgclf train`` is started directly (not by torchrun):
    one process per node, using that node's GPUs. Finished pods are kept
    (``cleanPodPolicy: None``) so their logs can still be read; restarts after a failure are
    the job's (``backoffLimit`` = ``kfp.retries``), not new jobs.
    """
    container = {
        "name": PYTORCH_CONTAINER,
        "image": image,
        "command": [*TRAIN_COMMAND, *train_args],
        "env": _env(cluster),
        "resources": _resources(cluster),
    }
    template = {
        "metadata": {"labels": dict(LABELS)},
        "spec": {"containers": [container], **_placement(cluster)},
    }
    replicas = {"Master": 1, "Worker": cluster.num_nodes - 1}
    specs = {
        role: {"replicas": count, "restartPolicy": "OnFailure", "template": copy.deepcopy(template)}
        for role, count in replicas.items()
        if count > 0
    }
    return {
        "apiVersion": PYTORCHJOB.api_version,
        "kind": PYTORCHJOB.kind,
        "metadata": _metadata(name, namespace),
        "spec": {
            "nprocPerNode": "1",
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": cluster.retries},
            "pytorchReplicaSpecs": specs,
        },
    }


def render_trainjob(
    *,
    name: str,
    namespace: str,
    image: str,
    train_args: Sequence[str],
    cluster: ClusterSettings,
    runtime: str | None = None,
) -> dict[str, Any]:
    """A TrainJob on the ClusterTrainingRuntime ``runtime`` (default ``kfp.trainjob_runtime``).

    The runtime supplies the pod template (JobSet); this job sets the image, the
    ``imgclf train`` command, ``numNodes`` and the resources per node, and pins the nodes to
    GPU nodes through ``podSpecOverrides`` of the runtime's ``node`` job.
    """
    trainer = {
        "image": image,
        "command": [*TRAIN_COMMAND, *train_args],
        "numNodes": cluster.num_nodes,
        "numProcPerNode": 1,
        "resourcesPerNode": _resources(cluster),
        "env": _env(cluster),
    }
    spec: dict[str, Any] = {
        "runtimeRef": {
            "apiGroup": TRAINJOB.group,
            "kind": "ClusterTrainingRuntime",
            "name": runtime or cluster.trainjob_runtime,
        },
        "trainer": trainer,
    }
    placement = _placement(cluster)
    if placement:
        spec["podSpecOverrides"] = [{"targetJobs": [{"name": TRAINJOB_NODE_JOB}], **placement}]
    return {
        "apiVersion": TRAINJOB.api_version,
        "kind": TRAINJOB.kind,
        "metadata": _metadata(name, namespace),
        "spec": spec,
    }


def render(
    backend: str,
    *,
    name: str,
    namespace: str,
    image: str,
    train_args: Sequence[str],
    cluster: ClusterSettings,
) -> dict[str, Any]:
    """The manifest of ``backend`` (``trainjob`` | ``pytorchjob``, as ``kfp.train_backend``)."""
    if backend == "trainjob":
        return render_trainjob(
            name=name, namespace=namespace, image=image, train_args=train_args, cluster=cluster
        )
    if backend == "pytorchjob":
        return render_pytorchjob(
            name=name, namespace=namespace, image=image, train_args=train_args, cluster=cluster
        )
    raise TrainingJobFailed(
        f"train backend {backend!r} is not a training job (trainjob, pytorchjob)"
    )


# status ----------------------------------------------------------------------------------


def _condition_text(condition: Mapping[str, Any]) -> str:
    text = str(condition.get("type"))
    if condition.get("reason"):
        text += f" ({condition['reason']})"
    if condition.get("message"):
        text += f": {condition['message']}"
    return text


def job_state(kind: JobKind, obj: Mapping[str, Any]) -> tuple[str, str]:
    """(``succeeded`` | ``failed`` | ``running``, the newest true condition as text)."""
    conditions = [
        c
        for c in (obj.get("status") or {}).get("conditions") or []
        if isinstance(c, Mapping) and c.get("status") == "True"
    ]
    for condition in conditions:
        if condition.get("type") == kind.failed:
            return "failed", _condition_text(condition)
    for condition in conditions:
        if condition.get("type") == kind.succeeded:
            return "succeeded", _condition_text(condition)
    if not conditions:
        return "running", "submitted, no condition yet"
    return "running", _condition_text(conditions[-1])


def _api_problem(exc: ApiException) -> str:
    message = ""
    try:
        message = json.loads(exc.body or "{}").get("message", "")
    except (ValueError, AttributeError):
        message = ""
    return f"API server answered {exc.status} {exc.reason}" + (f": {message}" if message else "")


# the master's log --------------------------------------------------------------------------


@dataclasses.dataclass
class _LogFollower:
    """Prints the master pod's log as it grows; a log that shrank (restart) is printed anew."""

    core: kubernetes.client.CoreV1Api
    namespace: str
    selector: str
    log: Callable[[str], None]
    printed: int = 0
    pod: str | None = None

    def _master(self) -> str | None:
        pods = self.core.list_namespaced_pod(
            self.namespace, label_selector=self.selector, _request_timeout=REQUEST_TIMEOUT_S
        ).items

        def rank(pod: Any) -> tuple[int, int, str]:
            # A JobSet's first pod of its first job is node 0, which torch makes the master.
            labels = pod.metadata.labels or {}
            job = labels.get("jobset.sigs.k8s.io/job-index", "0")
            index = labels.get("batch.kubernetes.io/job-completion-index", "0")
            return (
                int(job) if job.isdigit() else 0,
                int(index) if index.isdigit() else 0,
                pod.metadata.name,
            )

        return min(pods, key=rank).metadata.name if pods else None

    def follow(self) -> None:
        """Print what is new in the log; an unreadable log (pod not started) waits."""
        try:
            self.pod = self.pod or self._master()
            if self.pod is None:
                return
            text = self.core.read_namespaced_pod_log(
                self.pod, self.namespace, _request_timeout=REQUEST_TIMEOUT_S
            )
        except (ApiException, urllib3.exceptions.HTTPError):
            return
        if len(text) < self.printed:
            self.log(f"--- log of pod {self.pod} restarted ---")
            self.printed = 0
        new = text[self.printed :]
        self.printed = len(text)
        if new:
            self.log(new.rstrip("\n"))


# submit and wait ---------------------------------------------------------------------------


def _identity(manifest: Mapping[str, Any]) -> tuple[JobKind, str, str]:
    kind = _KINDS.get((manifest.get("apiVersion"), manifest.get("kind")))  # type: ignore[arg-type]
    if kind is None:
        raise TrainingJobFailed(
            f"not a PyTorchJob or TrainJob: {manifest.get('apiVersion')} {manifest.get('kind')}"
        )
    meta = manifest.get("metadata") or {}
    if not meta.get("name") or not meta.get("namespace"):
        raise TrainingJobFailed(f"{kind.kind} manifest needs metadata.name and metadata.namespace")
    return kind, str(meta["namespace"]), str(meta["name"])


def submit_and_wait(
    manifest: dict[str, Any],
    *,
    client: kubernetes.client.ApiClient,
    timeout_s: float,
    poll_s: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Create the job (or adopt the one of that name), wait until it ends; the final object.

    Prints each status change and, as it grows, the master pod's log. Raises
    :class:`TrainingJobFailed` naming the job's reason when it fails, when it is deleted
    while waited for, or when it has not ended within ``timeout_s`` (the job keeps running:
    a retried task adopts it). ``clock`` and ``sleep`` are injectable so tests need no time.
    """
    kind, namespace, name = _identity(manifest)
    where = f"{kind.kind} {namespace}/{name}"
    api = kubernetes.client.CustomObjectsApi(client)
    args = (kind.group, kind.version, namespace, kind.plural)
    try:
        api.create_namespaced_custom_object(*args, manifest, _request_timeout=REQUEST_TIMEOUT_S)
        log(f"{where}: created ({kind.kind.lower()} of {_nodes(manifest)} node(s))")
    except ApiException as exc:
        if exc.status != 409:
            raise TrainingJobFailed(f"cannot create {where}: {_api_problem(exc)}") from None
        log(f"{where}: already exists (a retried task); waiting for it instead of a new one")
    except urllib3.exceptions.HTTPError as exc:
        raise TrainingJobFailed(
            f"cannot reach the Kubernetes API server at {client.configuration.host}: {exc}"
        ) from None
    logs = _LogFollower(
        kubernetes.client.CoreV1Api(client), namespace, kind.master_selector(name), log
    )
    start, last = clock(), ""
    while True:
        try:
            obj = api.get_namespaced_custom_object(*args, name, _request_timeout=REQUEST_TIMEOUT_S)
        except ApiException as exc:
            if exc.status == 404:
                raise TrainingJobFailed(f"{where} was deleted while waiting for it") from None
            if exc.status != 429 and exc.status < 500:
                raise TrainingJobFailed(f"cannot read {where}: {_api_problem(exc)}") from None
            state, seen = "running", _api_problem(exc)
        except urllib3.exceptions.HTTPError as exc:
            state, seen = "running", f"API server unreachable: {exc}"
        else:
            state, seen = job_state(kind, obj)
        if seen != last:
            log(f"{where}: {seen}")
            last = seen
        logs.follow()
        waited = clock() - start
        if state == "succeeded":
            return obj
        if state == "failed":
            raise TrainingJobFailed(f"{where} failed: {seen}")
        if waited >= timeout_s:
            raise TrainingJobFailed(
                f"{where} did not finish within {timeout_s:g} s (last seen: {seen}); "
                "it keeps running, and a retried task waits for it again"
            )
        sleep(min(poll_s, timeout_s - waited))


def _nodes(manifest: Mapping[str, Any]) -> int:
    spec = manifest.get("spec") or {}
    if "trainer" in spec:
        return int(spec["trainer"].get("numNodes") or 1)
    return sum(
        int(r.get("replicas") or 1) for r in (spec.get("pytorchReplicaSpecs") or {}).values()
    )


def run_training_job(
    backend: str,
    *,
    run_id: str,
    image: str,
    dataset_dir: Path,
    model_dir: Path,
    staging_uri: str,
    train_args: Sequence[str],
    cluster: ClusterSettings,
    client: kubernetes.client.ApiClient,
    namespace: str,
    **wait: Any,
) -> dict[str, Any]:
    """Train on a job instead of here: what the train task does with a job backend.

    The job's pods cannot see this pod's files, so the dataset is published to
    ``<staging_uri>/dataset`` (with its ``_SUCCESS`` marker, as ``imgclf train`` requires of
    a remote input), the job runs ``imgclf train --dataset <staging>/dataset --out
    <staging>/model <train_args>``, and the model it published is copied into ``model_dir``.
    ``wait`` goes to :func:`submit_and_wait` (``timeout_s`` defaults to
    ``kfp.train_job_timeout_s``). Returns the finished job.
    """
    staging = staging_uri.rstrip("/")
    dataset_uri, model_uri = f"{staging}/dataset", f"{staging}/model"
    with local_output(dataset_uri) as out:
        shutil.copytree(dataset_dir, out, dirs_exist_ok=True)
    manifest = render(
        backend,
        name=job_name(run_id),
        namespace=namespace,
        image=image,
        train_args=["--dataset", dataset_uri, "--out", model_uri, *train_args],
        cluster=cluster,
    )
    wait.setdefault("timeout_s", cluster.train_job_timeout_s)
    job = submit_and_wait(manifest, client=client, **wait)
    with local_input(model_uri) as src:
        shutil.copytree(src, model_dir, dirs_exist_ok=True)
    return job
