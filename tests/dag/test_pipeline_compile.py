"""The training pipeline compiles to a valid KFP v2 spec with the cluster wiring it promises.

The compiled YAML is parsed strictly (unknown fields fail) into the protos the KFP backend
reads: ``PipelineSpec``, ``PipelineDeploymentConfig`` and, per executor, ``kfp.kubernetes``'
``KubernetesExecutorConfig``, so a typo in a field name is caught here and not by the API
server at upload time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format
from kfp.dsl.graph_component import GraphComponent
from kfp.kubernetes import kubernetes_executor_config_pb2
from kfp.pipeline_spec import pipeline_spec_pb2

from _repo_copy import REPO
from imgclf import config
from imgclf.errors import ConfigError
from imgclf.kfp.package import compile_pipeline
from imgclf.kfp.settings import ClusterSettings
from pipelines import training_pipeline as tp

COMMITTED = REPO / "pipelines" / "training_pipeline.yaml"
SECRET_SENTINEL = "sentinel-Secret-Value-3f9c1e"
TASKS = ("ingest", "validate", "check-retrain", "train", "evaluate", "deploy")


def _documents(path: Path) -> list[dict[str, Any]]:
    return list(yaml.safe_load_all(path.read_text(encoding="utf-8")))


def _parse_strict(doc: dict[str, Any], message: Any) -> Any:
    return json_format.ParseDict(doc, message, ignore_unknown_fields=False)


@dataclasses.dataclass
class Compiled:
    """A compiled pipeline: the two YAML documents and indexes into them."""

    spec: dict[str, Any]
    platform: dict[str, Any]

    def tasks(self) -> dict[str, dict[str, Any]]:
        """Every task of every DAG (root and condition groups), by task name."""
        out = dict(self.spec["root"]["dag"]["tasks"])
        for component in self.spec["components"].values():
            out.update(component.get("dag", {}).get("tasks", {}))
        return out

    def executor_label(self, task: str) -> str:
        component = self.tasks()[task]["componentRef"]["name"]
        return self.spec["components"][component]["executorLabel"]

    def container(self, task: str) -> dict[str, Any]:
        return self.spec["deploymentSpec"]["executors"][self.executor_label(task)]["container"]

    def k8s(self, task: str) -> dict[str, Any]:
        executors = self.platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        return executors.get(self.executor_label(task), {})

    def parameters(self) -> dict[str, dict[str, Any]]:
        return self.spec["root"]["inputDefinitions"]["parameters"]


def _compile(tmp_path: Path, pipeline: GraphComponent, name: str = "pipeline.yaml") -> Compiled:
    path = compile_pipeline(pipeline, tmp_path / name)
    spec, platform = _documents(path)
    return Compiled(spec, platform)


@pytest.fixture(scope="module")
def fresh_yaml(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The pipeline compiled by its CLI in a clean process, with secrets in the environment.

    A clean process, because the image is read from IMGCLF_IMAGE at import; secret-looking
    variables set to a sentinel prove the compile never copies credentials into the YAML.
    """
    out = tmp_path_factory.mktemp("compiled") / "training_pipeline.yaml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGCLF_")}
    env.update(
        AWS_ACCESS_KEY_ID=SECRET_SENTINEL,
        AWS_SECRET_ACCESS_KEY=SECRET_SENTINEL,
        MINIO_SECRET_KEY=SECRET_SENTINEL,
    )
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.training_pipeline", "--out", str(out)],
        cwd=tmp_path_factory.mktemp("cwd"),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == out
    return out.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def pipeline() -> GraphComponent:
    """The pipeline built from the repository's params.yaml, as the committed YAML is."""
    return tp.build_pipeline()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory, pipeline: GraphComponent) -> Compiled:
    return _compile(tmp_path_factory.mktemp("pipeline"), pipeline)


def _normalise_sdk_version(text: str) -> str:
    return "\n".join(
        "sdkVersion: <kfp>" if line.startswith("sdkVersion: kfp-") else line
        for line in text.splitlines()
    )


def test_committed_yaml_is_fresh(fresh_yaml: str) -> None:
    assert COMMITTED.is_file(), "run: python -m pipelines.training_pipeline"
    committed = _normalise_sdk_version(COMMITTED.read_text(encoding="utf-8"))
    assert committed == _normalise_sdk_version(fresh_yaml), (
        "pipelines/training_pipeline.yaml is stale (params.yaml, a component or the pipeline "
        "changed); recompile: python -m pipelines.training_pipeline"
    )


def test_compile_is_deterministic(tmp_path: Path, pipeline: GraphComponent) -> None:
    first = compile_pipeline(pipeline, tmp_path / "a.yaml").read_text(encoding="utf-8")
    again = compile_pipeline(tp.build_pipeline(), tmp_path / "b.yaml").read_text("utf-8")
    assert again == first


def test_compile_writes_only_the_target(tmp_path: Path, pipeline: GraphComponent) -> None:
    path = compile_pipeline(pipeline, tmp_path / "sub" / "p.yaml")
    assert path == tmp_path / "sub" / "p.yaml"
    assert [p.name for p in path.parent.iterdir()] == ["p.yaml"]


def test_yaml_parses_strictly_into_the_protos(fresh_yaml: str) -> None:
    docs = list(yaml.safe_load_all(fresh_yaml))
    assert len(docs) == 2
    spec = _parse_strict(docs[0], pipeline_spec_pb2.PipelineSpec())
    assert spec.pipeline_info.name == "imgclf-training"
    _parse_strict(docs[0]["deploymentSpec"], pipeline_spec_pb2.PipelineDeploymentConfig())
    platform = _parse_strict(docs[1], pipeline_spec_pb2.PlatformSpec())
    assert set(platform.platforms) == {"kubernetes"}
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert len(executors) == len(TASKS)
    for executor in executors.values():
        _parse_strict(executor, kubernetes_executor_config_pb2.KubernetesExecutorConfig())


def test_strict_parse_rejects_an_unknown_field(fresh_yaml: str) -> None:
    doc = next(yaml.safe_load_all(fresh_yaml))
    doc["root"]["dag"]["tasks"]["ingest"]["cachingOption"] = {}
    with pytest.raises(json_format.ParseError):
        _parse_strict(doc, pipeline_spec_pb2.PipelineSpec())


def test_dag_order_and_conditions(compiled: Compiled) -> None:
    tasks = compiled.tasks()
    assert set(TASKS) <= set(tasks)
    root = compiled.spec["root"]["dag"]["tasks"]
    assert set(root) == {"ingest", "validate", "check-retrain", "condition-1"}
    assert "validate" in root["check-retrain"]["dependentTasks"]
    gate = root["condition-1"]
    assert gate["taskInfo"]["name"] == "dataset-changed"
    assert "check-retrain-should_retrain" in gate["triggerPolicy"]["condition"]
    assert gate["triggerPolicy"]["condition"].endswith("== true")
    inner = compiled.spec["components"]["comp-condition-1"]["dag"]["tasks"]
    assert set(inner) == {"train", "evaluate", "condition-2"}
    assert inner["condition-2"]["taskInfo"]["name"] == "quality-gate-passed"
    assert "evaluate-passed" in inner["condition-2"]["triggerPolicy"]["condition"]
    assert set(compiled.spec["components"]["comp-condition-2"]["dag"]["tasks"]) == {"deploy"}
    deploy_inputs = tasks["deploy"]["inputs"]["artifacts"]
    assert set(deploy_inputs) == {"dataset", "trained_model", "evaluation"}
    assert tasks["evaluate"]["inputs"]["artifacts"]["trained_model"]["taskOutputArtifact"] == {
        "producerTask": "train",
        "outputArtifactKey": "trained_model",
    }


def test_every_task_input_has_its_run_parameter_name(compiled: Compiled) -> None:
    """A value keeps one name from the KFP UI to the component (``model`` is ``model``).

    Inside a condition group KFP renames a pipeline input to ``pipelinechannel--<name>``;
    outputs of other tasks (``dataset``, ``should_retrain``) are not run parameters, and
    neither are the constants the pipeline sets: the run id placeholder and the GPU count.
    """
    run_parameters = set(compiled.parameters())
    fed = set()
    for task, spec in compiled.tasks().items():
        if task.startswith("condition-"):
            continue
        for name, source in spec["inputs"].get("parameters", {}).items():
            if "runtimeValue" in source:
                continue
            pipeline_input = source["componentInputParameter"].removeprefix("pipelinechannel--")
            assert pipeline_input == name, f"{task}.{name} is fed by {pipeline_input}"
            fed.add(name)
    assert fed == run_parameters, "a run parameter feeds no task, or a task input none"


def test_train_task_checkpoints_under_the_run_id_with_one_process_per_gpu(
    compiled: Compiled,
) -> None:
    """A retried train task finds its checkpoints by the run id; DDP spans the pod's GPUs."""
    inputs = compiled.tasks()["train"]["inputs"]["parameters"]
    assert inputs["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    assert inputs["nproc_per_node"]["runtimeValue"]["constant"] == ClusterSettings().gpu_limit
    default = compiled.parameters()["checkpoint_root"]["defaultValue"]
    assert default == ClusterSettings().checkpoint_root


def test_train_task_asks_for_a_gpu_node(compiled: Compiled) -> None:
    cluster = ClusterSettings()
    resources = compiled.container("train")["resources"]
    assert resources["accelerator"]["resourceType"] == cluster.gpu_resource == "nvidia.com/gpu"
    assert resources["accelerator"]["resourceCount"] == str(cluster.gpu_limit)
    assert resources["resourceCpuRequest"] == cluster.train_cpu_request
    assert resources["resourceCpuLimit"] == cluster.train_cpu_limit
    assert resources["resourceMemoryRequest"] == cluster.train_memory_request
    assert resources["resourceMemoryLimit"] == cluster.train_memory_limit
    k8s = compiled.k8s("train")
    assert k8s["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert k8s["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    for task in set(TASKS) - {"train"}:
        assert "resources" not in compiled.container(task), task
        assert "nodeSelector" not in compiled.k8s(task), task
        assert "tolerations" not in compiled.k8s(task), task


def test_every_task_gets_object_store_credentials_by_reference(compiled: Compiled) -> None:
    for task in TASKS:
        k8s = compiled.k8s(task)
        (secret,) = k8s["secretAsEnv"]
        assert secret["secretName"] == "imgclf-minio"
        assert {(e["secretKey"], e["envVar"]) for e in secret["keyToEnv"]} == {
            ("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"),
            ("AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"),
        }
        (config_map,) = k8s["configMapAsEnv"]
        assert config_map["configMapName"] == "imgclf-s3"
        assert {e["envVar"] for e in config_map["keyToEnv"]} == {"MINIO_ENDPOINT", "AWS_REGION"}
        assert "env" not in compiled.container(task), "the endpoint must come from the ConfigMap"


def test_caching_is_explicit_per_task(compiled: Compiled) -> None:
    tasks = compiled.tasks()
    enabled = {name: tasks[name]["cachingOptions"].get("enableCache", False) for name in TASKS}
    assert enabled == {
        "ingest": False,
        "validate": True,
        "check-retrain": False,
        "train": False,
        "evaluate": False,
        "deploy": False,
    }


def test_train_and_deploy_retry_with_backoff(compiled: Compiled) -> None:
    tasks = compiled.tasks()
    for name in ("train", "deploy"):
        policy = tasks[name]["retryPolicy"]
        assert policy["maxRetryCount"] == 2
        assert policy["backoffDuration"] == "60s"
        assert policy["backoffFactor"] == 2.0
    for name in set(TASKS) - {"train", "deploy"}:
        assert "retryPolicy" not in tasks[name], name


def test_no_secret_value_in_the_yaml(fresh_yaml: str) -> None:
    assert SECRET_SENTINEL not in fresh_yaml
    assert "REPLACE_ME" not in fresh_yaml
    assert "imgclf-minio" in fresh_yaml  # the Secret is referenced by name only


def test_parameter_defaults_come_from_params_yaml(compiled: Compiled) -> None:
    params = config.read_params(REPO / "params.yaml")
    train = config.load_section(config.TrainConfig, "train", REPO / "params.yaml")
    evaluate = config.load_section(config.EvaluateConfig, "evaluate", REPO / "params.yaml")
    defaults = {name: p.get("defaultValue") for name, p in compiled.parameters().items()}
    assert defaults["epochs"] == train.epochs
    assert defaults["lr"] == train.lr
    assert defaults["model"] == train.model
    assert defaults["min_accuracy"] == evaluate.min_accuracy
    assert defaults["allowed_modes"] == list(
        config.load_section(config.ValidateConfig, "validate", REPO / "params.yaml").allowed_modes
    )
    assert defaults["model_name"] == (params.get("registry") or {}).get(
        "model_name", config.RegistryConfig().model_name
    )
    # Locations are the cluster's, never the developer's disk.
    assert defaults["source"] == ClusterSettings().source
    assert defaults["registry_uri"] == ClusterSettings().registry_uri
    assert defaults["force"] is False


def test_every_parameter_is_documented(compiled: Compiled) -> None:
    params = compiled.parameters()
    for required in (
        "source",
        "image_size",
        "split_train",
        "split_val",
        "split_test",
        "split_seed",
        "min_width",
        "max_imbalance_ratio",
        "model",
        "pretrained",
        "freeze_backbone",
        "epochs",
        "batch_size",
        "lr",
        "backbone_lr",
        "augment",
        "min_accuracy",
        "max_regression",
        "registry_uri",
        "model_name",
        "force",
    ):
        assert required in params, required
    undocumented = sorted(name for name, p in params.items() if not p.get("description"))
    assert undocumented == []


def test_without_params_yaml_the_dataclass_defaults_apply(tmp_path: Path) -> None:
    result = _compile(tmp_path, tp.build_pipeline(tmp_path / "absent.yaml"))
    defaults = {name: p.get("defaultValue") for name, p in result.parameters().items()}
    assert defaults["epochs"] == config.TrainConfig().epochs
    assert defaults["image_size"] == config.IngestConfig().image_size
    assert defaults["split_train"] == config.SplitRatios().train
    assert defaults["max_regression"] == config.EvaluateConfig().max_regression
    assert defaults["serving_image"] == config.DeployConfig().image


def test_params_yaml_sets_defaults_and_cluster_settings(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "train": {"epochs": 3, "model": "simple_cnn"},
                "kfp": {
                    "gpu_limit": 2,
                    "gpu_node_selector": {"cloud.example.com/accelerator": "h100"},
                    "minio_secret": "other-secret",
                    "registry_uri": "s3://models/reg",
                },
            }
        )
    )
    result = _compile(tmp_path, tp.build_pipeline(params))
    defaults = {name: p.get("defaultValue") for name, p in result.parameters().items()}
    assert (defaults["epochs"], defaults["model"]) == (3, "simple_cnn")
    assert defaults["registry_uri"] == "s3://models/reg"
    assert result.container("train")["resources"]["accelerator"]["resourceCount"] == "2"
    assert result.k8s("train")["nodeSelector"]["labels"] == {
        "cloud.example.com/accelerator": "h100"
    }
    assert result.k8s("ingest")["secretAsEnv"][0]["secretName"] == "other-secret"


def test_gpu_limit_zero_trains_on_cpu_nodes(tmp_path: Path) -> None:
    cluster = ClusterSettings(gpu_limit=0)
    result = _compile(tmp_path, tp.build_pipeline(tmp_path / "absent.yaml", cluster))
    resources = result.container("train")["resources"]
    assert "accelerator" not in resources
    assert resources["resourceCpuLimit"] == cluster.train_cpu_limit
    assert "nodeSelector" not in result.k8s("train")
    assert "tolerations" not in result.k8s("train")


@pytest.mark.parametrize(
    ("section", "text", "named"),
    [
        ("train", "train:\n  epochs: many\n", "train.epochs"),
        ("kfp", "kfp:\n  gpu_limt: 1\n", "gpu_limt"),
        ("kfp", "kfp:\n  gpu_node_selector: {gpu: true}\n", "gpu_node_selector.gpu"),
    ],
)
def test_bad_params_fail_the_compile_naming_the_key(
    tmp_path: Path, section: str, text: str, named: str
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(text)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")) as info:
        tp.build_pipeline(params)
    assert f"params.yaml:{section}" in str(info.value)


def test_importing_the_pipeline_needs_no_heavy_library() -> None:
    code = (
        "import sys, pipelines.training_pipeline as p; "
        "heavy = sorted(m for m in ('torch', 'torchvision', 'great_expectations', "
        "'imgclf.steps') if m in sys.modules); "
        "assert not heavy, heavy; print(p.PIPELINE_NAME)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "imgclf-training"


def test_importing_the_pipeline_reads_no_repository_file() -> None:
    """params.yaml is read by :func:`build_pipeline` when called, never at import.

    Python's audit hook sees every ``open``; the import's own source files are left out.
    """
    code = (
        "import sys; from pathlib import Path; opened = []; "
        "sys.addaudithook(lambda event, args: opened.append(args[0]) "
        "if event == 'open' and isinstance(args[0], str) else None); "
        "import pipelines.training_pipeline; "
        f"repo = Path({str(REPO)!r}); venv = Path(sys.prefix).resolve(); "
        "paths = {Path(p).resolve() for p in opened}; "
        "print(sorted(str(p) for p in paths if p.is_relative_to(repo) "
        "and not p.is_relative_to(venv) and p.suffix not in ('.py', '.pyc')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("backend", ["trainjob", "pytorchjob"])
def test_a_job_backend_makes_the_train_task_a_launcher(tmp_path: Path, backend: str) -> None:
    """With kfp.train_backend a job trains on num_nodes nodes; the task submits and waits."""
    cluster = ClusterSettings(train_backend=backend, num_nodes=3)
    compiled = _compile(tmp_path, tp.build_pipeline(cluster=cluster))
    task = compiled.tasks()["train-job"]
    inputs = task["inputs"]["parameters"]
    settings = json.loads(inputs["cluster_settings"]["runtimeValue"]["constant"])
    assert settings["train_backend"] == backend and settings["num_nodes"] == 3
    assert inputs["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    assert inputs["image"]["runtimeValue"]["constant"] == compiled.container("train-job")["image"]
    # The launcher pod asks for no GPU (the job's pods do) and still retries.
    resources = compiled.container("train-job")["resources"]
    assert "accelerator" not in resources
    assert task["retryPolicy"]["maxRetryCount"] == cluster.retries
    # evaluate reads the model the job published, through the launcher task's output
    evaluate = compiled.tasks()["evaluate"]["inputs"]["artifacts"]["trained_model"]
    assert evaluate["taskOutputArtifact"]["producerTask"] == "train-job"


def test_a_job_backend_refuses_several_gpus_per_node() -> None:
    with pytest.raises(ConfigError, match="one process per node"):
        ClusterSettings(train_backend="trainjob", num_nodes=2, gpu_limit=4)
