"""Training jobs (TrainJob, PyTorchJob): manifests against the CRDs, and the wait over HTTP.

The API server is ``tests/k8s_api_double.py`` on 127.0.0.1 with a scripted job controller
and pods; the ``kubernetes`` client is the real one. Time is injected (``FakeClock``).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _k8s_schema import schema_path, validate_custom_resource
from imgclf import config
from imgclf.errors import ConfigError
from imgclf.kfp import trainjob
from imgclf.kfp.settings import ClusterSettings, load_cluster_settings
from imgclf.serving import cluster as k8s
from k8s_api_double import (
    PYTORCHJOBS,
    TRAINJOBS,
    FakeClock,
    K8sApiDouble,
    hide_cluster_credentials,
    write_kubeconfig,
)

TOKEN = "s3cr3t-bearer-token"
NAMESPACE = "imgclf"
RUN_ID = "7c6b8a8e-1d47-4a5e-9a54-3a0c8f3f2c11"
IMAGE = "ghcr.io/imgclf/imgclf:0.1.0"
TRAIN_ARGS = ["--dataset", "s3://mlpipeline/v2/ds", "--out", "s3://mlpipeline/v2/model"]
CRDS = {
    "trainjob": "trainer.kubeflow.org_trainjobs.yaml",
    "pytorchjob": "kubeflow.org_pytorchjobs.yaml",
}


def _manifest(backend: str, num_nodes: int = 1, **settings: Any) -> dict[str, Any]:
    cluster = ClusterSettings(train_backend=backend, num_nodes=num_nodes, **settings)
    return trainjob.render(
        backend,
        name=trainjob.job_name(RUN_ID),
        namespace=NAMESPACE,
        image=IMAGE,
        train_args=TRAIN_ARGS,
        cluster=cluster,
    )


def _condition(kind: str, reason: str, message: str = "", status: str = "True") -> dict[str, Any]:
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastUpdateTime": "2026-01-01T00:00:00Z",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }


CREATED = _condition("Created", "PyTorchJobCreated", "PyTorchJob imgclf/j is created.")
RUNNING = _condition("Running", "PyTorchJobRunning", "PyTorchJob imgclf/j is running.")
SUCCEEDED = _condition("Succeeded", "PyTorchJobSucceeded", "PyTorchJob imgclf/j succeeded.")
PYTORCH_SUCCESS = [
    {"conditions": [CREATED]},
    {"conditions": [CREATED, RUNNING]},
    {"conditions": [CREATED, {**RUNNING, "status": "False"}, SUCCEEDED]},
]
TRAINJOB_FAILED = {
    "conditions": [
        _condition(
            "Failed",
            "FailedJobs",
            'jobset failed: job "node-0" failed with reason BackoffLimitExceeded',
        )
    ]
}


@pytest.fixture(autouse=True)
def _no_in_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """This machine may run in a pod: hide its service account from every test."""
    hide_cluster_credentials(monkeypatch, tmp_path, home=False)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[K8sApiDouble, Any]]:
    with K8sApiDouble(token=TOKEN) as double:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", double.url, token=TOKEN)
        client = k8s.api_client(str(kubeconfig))
        yield double, client
        client.close()


def _wait(client: Any, clock: FakeClock, manifest: dict[str, Any], **kw: Any) -> Any:
    kw.setdefault("timeout_s", 60)
    kw.setdefault("poll_s", 5)
    return trainjob.submit_and_wait(manifest, client=client, clock=clock, sleep=clock.sleep, **kw)


# manifests -------------------------------------------------------------------------------


@pytest.mark.parametrize("num_nodes", [1, 3])
@pytest.mark.parametrize("backend", sorted(CRDS))
def test_manifests_match_the_crds(backend: str, num_nodes: int) -> None:
    validate_custom_resource(_manifest(backend, num_nodes), schema_path(CRDS[backend]))


@pytest.mark.parametrize("backend", sorted(CRDS))
def test_manifests_without_gpu_match_the_crds(backend: str) -> None:
    manifest = _manifest(backend, 2, gpu_limit=0)
    validate_custom_resource(manifest, schema_path(CRDS[backend]))
    assert "nvidia.com/gpu" not in str(manifest)


def test_pytorchjob_has_a_master_and_num_nodes_minus_one_workers() -> None:
    spec = _manifest("pytorchjob", 3)["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    assert {role: r["replicas"] for role, r in replicas.items()} == {"Master": 1, "Worker": 2}
    assert spec["nprocPerNode"] == "1"
    pod = replicas["Worker"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "pytorch"
    assert container["image"] == IMAGE
    assert container["command"] == ["imgclf", "train", *TRAIN_ARGS]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert list(_manifest("pytorchjob", 1)["spec"]["pytorchReplicaSpecs"]) == ["Master"]


def test_trainjob_runs_the_train_command_on_num_nodes() -> None:
    manifest = _manifest("trainjob", 3, gpu_limit=1, trainjob_runtime="torch-gpu")
    spec = manifest["spec"]
    assert spec["runtimeRef"]["name"] == "torch-gpu"
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 3
    assert trainer["image"] == IMAGE
    assert trainer["command"] == ["imgclf", "train", *TRAIN_ARGS]
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 1
    (override,) = spec["podSpecOverrides"]
    assert override["targetJobs"] == [{"name": "node"}]
    assert override["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


@pytest.mark.parametrize("backend", sorted(CRDS))
def test_credentials_are_secret_references_never_values(backend: str) -> None:
    manifest = _manifest(backend)
    env = (
        manifest["spec"]["trainer"]["env"]
        if backend == "trainjob"
        else manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0][
            "env"
        ]
    )
    by_name = {e["name"]: e for e in env}
    assert by_name["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "imgclf-minio",
        "key": "AWS_ACCESS_KEY_ID",
    }
    assert by_name["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "imgclf-minio"
    assert by_name["MINIO_ENDPOINT"]["valueFrom"]["configMapKeyRef"]["name"] == "imgclf-s3"
    assert all("value" not in e for e in env)


def test_job_names_are_dns_labels_stable_and_short() -> None:
    assert trainjob.job_name(RUN_ID) == f"imgclf-train-{RUN_ID}"
    assert trainjob.job_name("Run_42/B") == "imgclf-train-run-42-b"
    long_a, long_b = trainjob.job_name("a" * 80 + "1"), trainjob.job_name("a" * 80 + "2")
    assert long_a != long_b
    for name in (long_a, trainjob.job_name("--", prefix="9x")):
        assert len(name) <= trainjob.MAX_NAME_LENGTH
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name


def test_s3_uri_of_kfp_artifacts() -> None:
    assert trainjob.s3_uri("minio://mlpipeline/v2/a") == "s3://mlpipeline/v2/a"
    assert trainjob.s3_uri("s3://b/k") == "s3://b/k"
    with pytest.raises(trainjob.TrainingJobFailed, match="gs://b/k"):
        trainjob.s3_uri("gs://b/k")


def test_train_overrides_read_back_with_their_types() -> None:
    values = {"model": "resnet18", "lr": "1e-3", "epochs": 2, "freeze_backbone": True}
    flags = trainjob.train_overrides(values)
    assert flags[::2] == ["--set"] * 4
    parsed = dict(config.parse_override(flag) for flag in flags[1::2])
    assert parsed == values


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(trainjob.TrainingJobFailed, match="'pod'"):
        trainjob.render(
            "pod", name="n", namespace="ns", image=IMAGE, train_args=[], cluster=ClusterSettings()
        )


# settings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "error"),
    [
        ("train_backend: k8s", r"params.yaml:kfp.train_backend='k8s': must be one of pod, "),
        ("num_nodes: 0", r"params.yaml:kfp.num_nodes=0: must be >= 1"),
        ("num_nodes: 2", r"kfp.num_nodes=2: a pod is one node"),
        ("train_job_timeout_s: 0", r"kfp.train_job_timeout_s=0.0: must be > 0"),
    ],
)
def test_bad_backend_settings_are_refused(tmp_path: Path, section: str, error: str) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(f"kfp:\n  {section}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=error):
        load_cluster_settings(params)


def test_backend_settings_load(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("kfp:\n  train_backend: pytorchjob\n  num_nodes: 4\n", encoding="utf-8")
    settings = load_cluster_settings(params)
    assert (settings.train_backend, settings.num_nodes) == ("pytorchjob", 4)
    assert (ClusterSettings().train_backend, ClusterSettings().num_nodes) == ("pod", 1)


# submit and wait -------------------------------------------------------------------------


def test_pytorchjob_runs_to_success_and_streams_the_master_log(api: Any, clock: FakeClock) -> None:
    double, client = api
    manifest = _manifest("pytorchjob", 2)
    name = manifest["metadata"]["name"]
    double.status_scripts["pytorchjobs"] = PYTORCH_SUCCESS
    master = {
        "training.kubeflow.org/job-name": name,
        "training.kubeflow.org/replica-type": "master",
    }
    worker = {**master, "training.kubeflow.org/replica-type": "worker"}
    double.add_pod(NAMESPACE, f"{name}-worker-0", worker, "worker noise\n")
    double.add_pod(
        NAMESPACE,
        f"{name}-master-0",
        master,
        ["epoch 1 acc 0.5\n", "epoch 1 acc 0.5\nepoch 2 acc 0.9\n"],
    )
    lines: list[str] = []
    final = _wait(client, clock, copy.deepcopy(manifest), log=lines.append)

    assert final["status"]["conditions"][-1]["type"] == "Succeeded"
    (post,) = double.find("POST", PYTORCHJOBS.path(NAMESPACE))
    assert post.json == manifest
    assert post.authorized
    assert clock.sleeps == [5, 5]
    listing = double.find("GET", f"/api/v1/namespaces/{NAMESPACE}/pods")[0]
    assert listing.query["labelSelector"] == [
        f"training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=master"
    ]
    log_path = f"/api/v1/namespaces/{NAMESPACE}/pods/{name}-master-0/log"
    assert len(double.find("GET", log_path)) == 3
    text = "\n".join(lines)
    assert text.count("epoch 1 acc 0.5") == 1  # printed once, though read three times
    assert "epoch 2 acc 0.9" in text
    assert "worker noise" not in text
    assert "Running (PyTorchJobRunning)" in text
    assert f"PyTorchJob {NAMESPACE}/{name}: Succeeded (PyTorchJobSucceeded)" in text


def test_trainjob_failure_names_the_reason_and_shows_the_log(api: Any, clock: FakeClock) -> None:
    double, client = api
    manifest = _manifest("trainjob", 3)
    name = manifest["metadata"]["name"]
    double.status_scripts["trainjobs"] = [{}, TRAINJOB_FAILED]
    jobset = {"jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/job-index": "0"}
    double.add_pod(
        NAMESPACE,
        f"{name}-node-0-1",
        {**jobset, "batch.kubernetes.io/job-completion-index": "1"},
        "rank 1\n",
    )
    double.add_pod(
        NAMESPACE,
        f"{name}-node-0-0",
        {**jobset, "batch.kubernetes.io/job-completion-index": "0"},
        "Traceback: CUDA out of memory\n",
    )
    lines: list[str] = []
    with pytest.raises(trainjob.TrainingJobFailed) as caught:
        _wait(client, clock, manifest, log=lines.append)
    message = str(caught.value)
    assert message.startswith(f"TrainJob {NAMESPACE}/{name} failed: Failed (FailedJobs)")
    assert "BackoffLimitExceeded" in message
    assert "Traceback: CUDA out of memory" in "\n".join(lines)
    assert "rank 1" not in "\n".join(lines)
    (post,) = double.find("POST", TRAINJOBS.path(NAMESPACE))
    assert post.json == manifest
    assert double.find("GET", f"/api/v1/namespaces/{NAMESPACE}/pods")[0].query["labelSelector"] == [
        f"jobset.sigs.k8s.io/jobset-name={name}"
    ]


def test_an_existing_job_of_the_same_name_is_adopted(api: Any, clock: FakeClock) -> None:
    double, client = api
    manifest = _manifest("pytorchjob")
    name = manifest["metadata"]["name"]
    seeded = double.seed_object(PYTORCHJOBS, manifest, {"conditions": [CREATED, RUNNING]})
    double.status_scripts["pytorchjobs"] = PYTORCH_SUCCESS[1:]
    lines: list[str] = []
    final = _wait(client, clock, manifest, log=lines.append)

    assert len(double.find("POST")) == 1  # answered 409 AlreadyExists
    assert final["metadata"]["uid"] == seeded["metadata"]["uid"]
    assert list(double.store(PYTORCHJOBS)) == [(NAMESPACE, name)]
    assert any("already exists" in line for line in lines)


def test_timeout_names_the_last_status(api: Any, clock: FakeClock) -> None:
    double, client = api
    double.status_scripts["pytorchjobs"] = PYTORCH_SUCCESS[:2]  # Running for ever
    manifest = _manifest("pytorchjob")
    with pytest.raises(trainjob.TrainingJobFailed) as caught:
        _wait(client, clock, manifest, timeout_s=10, poll_s=3, log=lambda _: None)
    message = str(caught.value)
    assert "did not finish within 10 s" in message
    assert "Running (PyTorchJobRunning)" in message
    assert clock.sleeps == [3, 3, 3, 1]  # the last sleep stops at the deadline
    assert double.store(PYTORCHJOBS)  # left running: a retried task adopts it


def test_a_job_deleted_while_waiting_fails(api: Any, clock: FakeClock) -> None:
    double, client = api
    manifest = _manifest("trainjob")
    name = manifest["metadata"]["name"]

    def sleep(seconds: float) -> None:
        double.store(TRAINJOBS).pop((NAMESPACE, name))
        clock.sleep(seconds)

    with pytest.raises(trainjob.TrainingJobFailed, match="was deleted while waiting"):
        trainjob.submit_and_wait(
            manifest, client=client, timeout_s=60, clock=clock, sleep=sleep, log=lambda _: None
        )


def test_a_refused_create_fails_with_the_server_message(tmp_path: Path, clock: FakeClock) -> None:
    with K8sApiDouble(token=TOKEN) as double:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", double.url, token="wrong")
        client = k8s.api_client(str(kubeconfig))
        with pytest.raises(trainjob.TrainingJobFailed, match=r"cannot create .* 401"):
            _wait(client, clock, _manifest("pytorchjob"), log=lambda _: None)
        client.close()


# the train task's side -------------------------------------------------------------------


def test_pod_namespace_is_the_service_accounts(tmp_path: Path) -> None:
    assert trainjob.pod_namespace("fallback") == "fallback"
    account = k8s.SERVICE_ACCOUNT_DIR
    account.mkdir(parents=True)
    (account / "namespace").write_text("team-a\n", encoding="utf-8")
    assert trainjob.pod_namespace("fallback") == "team-a"


def test_run_training_job_stages_the_dataset_and_fetches_the_model(
    api: Any, clock: FakeClock, tmp_path: Path
) -> None:
    double, client = api
    double.status_scripts["trainjobs"] = [{"conditions": [_condition("Complete", "JobsCompleted")]}]
    dataset, staging, model = tmp_path / "dataset", tmp_path / "staging", tmp_path / "model"
    (dataset / "images").mkdir(parents=True)
    (dataset / "manifest.csv").write_text("path,label\n", encoding="utf-8")
    # What the job's master writes (the double runs no pods): the published model dir.
    (staging / "model").mkdir(parents=True)
    (staging / "model" / "model.json").write_text("{}", encoding="utf-8")
    cluster = ClusterSettings(train_backend="trainjob", num_nodes=2)

    job = trainjob.run_training_job(
        "trainjob",
        run_id=RUN_ID,
        image=IMAGE,
        dataset_dir=dataset,
        model_dir=model,
        staging_uri=f"{staging}/",
        train_args=["--set", "epochs=2"],
        cluster=cluster,
        client=client,
        namespace=NAMESPACE,
        clock=clock,
        sleep=clock.sleep,
        log=lambda _: None,
    )

    assert job["metadata"]["name"] == trainjob.job_name(RUN_ID)
    assert (staging / "dataset" / "manifest.csv").is_file()
    assert (model / "model.json").read_text(encoding="utf-8") == "{}"
    (post,) = double.find("POST", TRAINJOBS.path(NAMESPACE))
    assert post.json["spec"]["trainer"]["command"] == [
        "imgclf",
        "train",
        "--dataset",
        f"{staging}/dataset",
        "--out",
        f"{staging}/model",
        "--set",
        "epochs=2",
    ]
    assert post.json["spec"]["trainer"]["numNodes"] == 2
