"""Settings of the Kubeflow pipeline, read from ``params.yaml`` without importing KFP.

The pipeline has two kinds of settings:

- **run parameters** (epochs, lr, quality gate, ...): KFP pipeline parameters a user can
  change per run in the KFP UI. Their defaults are the ``params.yaml`` sections the DVC stages
  read, so a compiled pipeline starts from the same knobs as ``dvc repro``.
- **cluster settings** (:class:`ClusterSettings`, the ``kfp`` section): GPU count, node
  selector, toleration, CPU/memory, the names of the MinIO Secret and ConfigMap, retries. KFP
  needs most of these as literals when the pipeline is compiled, so changing one means
  recompiling. The MinIO endpoint itself is not one of them: pods read it from the
  ``imgclf-s3`` ConfigMap that the ``k8s/`` overlay of their cluster installs, so one
  compiled pipeline runs against the dev cluster's MinIO and the production one alike.

Locations are the exception to "defaults from params.yaml": ``ingest.source`` and
``registry.uri`` in params.yaml address the developer's disk (the DVC-tracked ``data`` folder,
a local ``registry`` dir), which a pod cannot see, so the pipeline's defaults for them come
from ``kfp.source`` and ``kfp.registry_uri`` instead; likewise ``train.checkpoint_dir`` (a local
``out/checkpoints``) becomes ``kfp.checkpoint_root``, an object-store prefix under which each
run's train task keeps its checkpoints in a folder named by the run id.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imgclf import config
from imgclf.errors import ConfigError

SECTION = "kfp"
TRAIN_BACKENDS = ("pod", "trainjob", "pytorchjob")


@dataclasses.dataclass(frozen=True)
class ClusterSettings:
    """Compile-time wiring of the pipeline's pods (the ``kfp`` section of params.yaml).

    The defaults fit the manifests in ``k8s/``: namespace ``imgclf``, the ``imgclf-minio``
    Secret, the ``imgclf-s3`` ConfigMap, the buckets the dev overlay creates, and NVIDIA's
    GPU operator, which labels GPU nodes ``nvidia.com/gpu.present=true``; GPU pools usually
    carry a ``nvidia.com/gpu:NoSchedule`` taint so that only GPU work lands there.
    ``gpu_limit: 0`` trains on ordinary nodes (no accelerator, selector or toleration).
    """

    source: str = "sample:digits"
    registry_uri: str = "s3://imgclf-models/registry"
    # Train checkpoints, one folder per KFP run (so a retried train task resumes); "": off.
    checkpoint_root: str = "s3://imgclf-models/checkpoints"
    minio_secret: str = "imgclf-minio"
    minio_access_key_key: str = "AWS_ACCESS_KEY_ID"
    minio_secret_key_key: str = "AWS_SECRET_ACCESS_KEY"
    s3_config_map: str = "imgclf-s3"
    gpu_resource: str = "nvidia.com/gpu"
    gpu_limit: int = 1
    gpu_node_selector: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true"}
    )
    gpu_toleration_key: str = "nvidia.com/gpu"
    gpu_toleration_effect: str = "NoSchedule"
    train_cpu_request: str = "4"
    train_cpu_limit: str = "8"
    train_memory_request: str = "16G"
    train_memory_limit: str = "32G"
    retries: int = 2
    retry_backoff: str = "60s"
    retry_backoff_factor: float = 2.0
    # How the train task runs: in its own pod ("pod"), or as a Kubeflow Trainer TrainJob
    # ("trainjob") or training-operator PyTorchJob ("pytorchjob") on num_nodes nodes, each
    # with gpu_limit GPUs, that the task submits and waits for (imgclf.kfp.trainjob).
    train_backend: str = "pod"
    num_nodes: int = 1
    trainjob_runtime: str = "torch-distributed"
    train_job_timeout_s: float = 86400.0

    def __post_init__(self) -> None:
        if self.train_backend not in TRAIN_BACKENDS:
            raise ConfigError(
                f"{SECTION}.train_backend={self.train_backend!r}: must be one of "
                f"{', '.join(TRAIN_BACKENDS)}"
            )
        if self.num_nodes < 1:
            raise ConfigError(f"{SECTION}.num_nodes={self.num_nodes}: must be >= 1")
        if self.num_nodes > 1 and self.train_backend == "pod":
            raise ConfigError(
                f"{SECTION}.num_nodes={self.num_nodes}: a pod is one node; set "
                f"{SECTION}.train_backend to trainjob or pytorchjob to train on several"
            )
        if self.train_backend != "pod" and self.gpu_limit > 1:
            raise ConfigError(
                f"{SECTION}.gpu_limit={self.gpu_limit} with train_backend="
                f"{self.train_backend}: a training job runs one process per node, on one GPU; "
                f"set gpu_limit to 1 and num_nodes to the GPUs wanted (or train_backend: pod "
                f"for several GPUs in one pod)"
            )
        if not self.train_job_timeout_s > 0:
            raise ConfigError(
                f"{SECTION}.train_job_timeout_s={self.train_job_timeout_s}: must be > 0"
            )


# params.yaml section -> the config class its pipeline parameters are built from.
RUN_SECTIONS: dict[str, type] = {
    "ingest": config.IngestConfig,
    "validate": config.ValidateConfig,
    "train": config.TrainConfig,
    "evaluate": config.EvaluateConfig,
    "registry": config.RegistryConfig,
    "deploy": config.DeployConfig,
}


def load_cluster_settings(
    params_path: str | Path = config.DEFAULT_PARAMS,
    overrides: Mapping[str, Any] | None = None,
) -> ClusterSettings:
    """The ``kfp`` section of ``params_path`` (all defaults when absent), plus ``overrides``."""
    settings = config.load_section(ClusterSettings, SECTION, params_path, overrides)
    for key, value in settings.gpu_node_selector.items():
        if not isinstance(value, str):
            raise ConfigError(
                f"{Path(params_path).name}:{SECTION}.gpu_node_selector.{key}: label values "
                f"are strings; quote {value!r}"
            )
    return settings


def run_defaults(
    params_path: str | Path = config.DEFAULT_PARAMS,
    cluster: ClusterSettings | None = None,
) -> dict[str, dict[str, Any]]:
    """Default run parameters per section: params.yaml over the dataclass defaults.

    Each section goes through :func:`imgclf.config.load_section`, so a typo or a wrong type in
    params.yaml fails the compile with the key named instead of compiling a broken default.
    The location keys are replaced by the cluster's (see the module docstring).
    """
    cluster = cluster or load_cluster_settings(params_path)
    out = {
        name: config.to_dict(config.load_section(cls, name, params_path))
        for name, cls in RUN_SECTIONS.items()
    }
    out["ingest"]["source"] = cluster.source
    out["registry"]["uri"] = cluster.registry_uri
    out["train"]["checkpoint_dir"] = cluster.checkpoint_root
    return out
