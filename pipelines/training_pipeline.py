"""The training pipeline: ingest -> validate -> check_retrain -> train -> evaluate -> deploy.

::

    ingest -> validate -> check_retrain --(dataset changed or force)--> train (GPU)
                                           -> evaluate --(passed)--> deploy

:func:`build_pipeline` makes the pipeline from a ``params.yaml`` (the repository's by
default), read when it is called and never at import, so importing this module reads no file
and the CLI can load the builder through the ``pipelines.training_pipeline:build_pipeline``
entry point. Run parameters (every knob a user may change per run in the KFP UI) default to
its step sections; cluster wiring (GPU count, node selector, toleration, CPU/memory, MinIO
Secret and ConfigMap names, retries) comes from its ``kfp`` section
(:class:`imgclf.kfp.settings.ClusterSettings`) because KFP needs those as literals at compile
time. So ``pipelines/training_pipeline.yaml`` is a function of params.yaml and this file:
recompile after changing either::

    python -m pipelines.training_pipeline --out pipelines/training_pipeline.yaml

Set ``IMGCLF_IMAGE`` at compile time to run the components in another image.
"""

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from kfp import dsl, kubernetes
from kfp.dsl.graph_component import GraphComponent

from components._image import IMAGE
from components.check_retrain.component import check_retrain
from components.deploy.component import deploy
from components.evaluate.component import evaluate
from components.ingest.component import ingest
from components.train.component import train, train_job
from components.validate.component import validate
from imgclf import config
from imgclf.kfp.package import compile_pipeline
from imgclf.kfp.settings import ClusterSettings, load_cluster_settings, run_defaults

PIPELINE_NAME = "imgclf-training"
REPO_ROOT = Path(__file__).resolve().parents[1]
PARAMS_PATH = REPO_ROOT / "params.yaml"
COMPILED_PATH = Path(__file__).with_suffix(".yaml")

# Variables the library's S3 client reads (imgclf.storage.s3config); the Secret's keys may
# be named differently, the ConfigMap's keys are these names.
ACCESS_KEY_ENV = "AWS_ACCESS_KEY_ID"
SECRET_KEY_ENV = "AWS_SECRET_ACCESS_KEY"
S3_CONFIG_ENV = ("MINIO_ENDPOINT", "AWS_REGION")


def use_object_store(task: dsl.PipelineTask, cluster: ClusterSettings) -> dsl.PipelineTask:
    """Give ``task`` the MinIO credentials (a Secret reference, never a value) and endpoint.

    The endpoint comes from a ConfigMap rather than a literal so that the cluster's k8s
    overlay, not the compiled pipeline, decides which MinIO a run talks to.
    """
    kubernetes.use_secret_as_env(
        task,
        secret_name=cluster.minio_secret,
        secret_key_to_env={
            cluster.minio_access_key_key: ACCESS_KEY_ENV,
            cluster.minio_secret_key_key: SECRET_KEY_ENV,
        },
    )
    return kubernetes.use_config_map_as_env(
        task,
        config_map_name=cluster.s3_config_map,
        config_map_key_to_env={name: name for name in S3_CONFIG_ENV},
    )


def use_gpu(task: dsl.PipelineTask, cluster: ClusterSettings) -> dsl.PipelineTask:
    """Request CPU, memory and (unless ``gpu_limit`` is 0) a GPU node for ``task``."""
    task.set_cpu_request(cluster.train_cpu_request).set_cpu_limit(cluster.train_cpu_limit)
    task.set_memory_request(cluster.train_memory_request)
    task.set_memory_limit(cluster.train_memory_limit)
    if cluster.gpu_limit <= 0:
        return task
    task.set_accelerator_type(cluster.gpu_resource).set_accelerator_limit(cluster.gpu_limit)
    for label, value in sorted(cluster.gpu_node_selector.items()):
        kubernetes.add_node_selector(task, label_key=label, label_value=value)
    kubernetes.add_toleration(
        task,
        key=cluster.gpu_toleration_key,
        operator="Exists",
        effect=cluster.gpu_toleration_effect,
    )
    return task


def use_retries(task: dsl.PipelineTask, cluster: ClusterSettings) -> dsl.PipelineTask:
    """Retry ``task`` with exponential backoff (preempted GPU nodes, a flaky object store)."""
    return task.set_retry(
        num_retries=cluster.retries,
        backoff_duration=cluster.retry_backoff,
        backoff_factor=cluster.retry_backoff_factor,
    )


def use_job_launcher(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """A train task that only submits and watches a training job: no GPU, little CPU.

    Its pod needs a service account allowed to create the job and read its pods' logs
    (``k8s/``); the GPUs, node selector and toleration are on the job's pods instead.
    """
    task.set_cpu_request("100m").set_memory_request("512M").set_memory_limit("2G")
    return task


def build_pipeline(
    params_path: str | Path = PARAMS_PATH, cluster: ClusterSettings | None = None
) -> GraphComponent:
    """The pipeline with run-parameter defaults from ``params_path`` and ``cluster`` wiring.

    ``cluster`` defaults to the ``kfp`` section of ``params_path``; pass one to compile for
    another cluster. Each run parameter has the name of the component input it feeds, and
    that is its config field's name, qualified (``split_seed``, ``train_seed``,
    ``train_image_size``, ``eval_batch_size``, ``registry_uri``, ``registry_alias``,
    ``serving_image``) where the bare field name would be ambiguous or say too little in
    the UI's one flat list of parameters.
    """
    cluster = cluster or load_cluster_settings(params_path)
    defaults = run_defaults(params_path, cluster)
    ing, val, trn = defaults["ingest"], defaults["validate"], defaults["train"]
    ev, reg, dep = defaults["evaluate"], defaults["registry"], defaults["deploy"]

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description=(
            "Ingest, validate, train (GPU), evaluate and deploy a PyTorch image classifier; "
            "trains only when the dataset changed since the production model."
        ),
    )
    def training_pipeline(
        source: str = ing["source"],
        image_size: int = ing["image_size"],
        split_train: float = ing["split"]["train"],
        split_val: float = ing["split"]["val"],
        split_test: float = ing["split"]["test"],
        split_seed: int = ing["seed"],
        image_format: str = ing["image_format"],
        min_width: int = val["min_width"],
        max_width: int = val["max_width"],
        min_height: int = val["min_height"],
        max_height: int = val["max_height"],
        allowed_modes: list = list(val["allowed_modes"]),  # noqa: B006 (KFP reads it, never mutated)
        min_images_per_class: int = val["min_images_per_class"],
        min_images_per_split: int = val["min_images_per_split"],
        max_duplicate_fraction: float = val["max_duplicate_fraction"],
        max_imbalance_ratio: float = val["max_imbalance_ratio"],
        imbalance_blocking: bool = val["imbalance_blocking"],
        model: str = trn["model"],
        pretrained: str = trn["pretrained"],
        freeze_backbone: bool = trn["freeze_backbone"],
        freeze_epochs: int = trn["freeze_epochs"],
        train_image_size: int = trn["image_size"],
        augment: str = trn["augment"],
        epochs: int = trn["epochs"],
        min_steps: int = trn["min_steps"],
        batch_size: int = trn["batch_size"],
        optimizer: str = trn["optimizer"],
        lr: str = str(trn["lr"]),
        backbone_lr: str = str(trn["backbone_lr"]),
        weight_decay: float = trn["weight_decay"],
        scheduler: str = trn["scheduler"],
        patience: int = trn["patience"],
        train_seed: int = trn["seed"],
        device: str = trn["device"],
        num_workers: str = str(trn["num_workers"]),
        threads: int = trn["threads"],
        max_steps_per_epoch: int = trn["max_steps_per_epoch"],
        checkpoint_root: str = trn["checkpoint_dir"],
        checkpoint_every_steps: int = trn["checkpoint_every_steps"],
        checkpoint_min_interval_s: float = trn["checkpoint_min_interval_s"],
        keep_checkpoints: int = trn["keep_checkpoints"],
        min_accuracy: float = ev["min_accuracy"],
        max_regression: float = ev["max_regression"],
        top_k: int = ev["top_k"],
        eval_batch_size: int = ev["batch_size"],
        registry_uri: str = reg["uri"],
        model_name: str = reg["model_name"],
        registry_alias: str = reg["alias"],
        namespace: str = dep["namespace"],
        service_account: str = dep["service_account"],
        serving_image: str = dep["image"],
        storage_uri_prefix: str = dep["storage_uri_prefix"],
        smoke_samples: int = dep["smoke_samples"],
        smoke_p95_ms: float = dep["smoke_p95_ms"],
        canary_percent: int = dep["canary_percent"],
        apply_inference_service: str = str(dep["apply"]).lower(),
        force: bool = False,
    ):
        """Train an image classifier when its data changed, and ship it if it is good enough.

        Args:
            source: Images to ingest: sample:digits, s3://bucket/prefix or an archive URL.
            image_size: Side in pixels of images rendered by sample: sources.
            split_train: Fraction of each class in the train split.
            split_val: Fraction of each class in the validation split.
            split_test: Fraction of each class in the test split.
            split_seed: Seed of the split assignment.
            image_format: keep (source bytes where they need no conversion) or png.
            min_width: Smallest accepted image width in pixels.
            max_width: Largest accepted image width in pixels.
            min_height: Smallest accepted image height in pixels.
            max_height: Largest accepted image height in pixels.
            allowed_modes: Accepted PIL image modes.
            min_images_per_class: Fewest images of each class in every split.
            min_images_per_split: Fewest images in each split.
            max_duplicate_fraction: Largest accepted fraction of duplicate images.
            max_imbalance_ratio: Largest ratio of biggest to smallest train class.
            imbalance_blocking: Fail the run on class imbalance instead of warning.
            model: torchvision classifier name (resnet18, ...) or simple_cnn.
            pretrained: none, imagenet, or a path or s3:// URI of weights.
            freeze_backbone: Train only the new head on a frozen backbone.
            freeze_epochs: With pretrained weights, epochs that train the head only first.
            train_image_size: Side in pixels the model sees.
            augment: Augmentation preset: none, light or strong.
            epochs: Training epochs for a large dataset (early stopping may end sooner).
            min_steps: Optimizer steps a small dataset trains for at least.
            batch_size: Training batch size.
            optimizer: Optimizer name (adamw, sgd, ...).
            lr: Learning rate of the head, or ``auto`` (the LR range test picks it).
            backbone_lr: Backbone rate, or ``auto`` (lr/10 pretrained, lr from scratch).
            weight_decay: Optimizer weight decay.
            scheduler: Learning-rate schedule (onecycle, ...).
            patience: Epochs without improvement before early stopping.
            train_seed: Seed of weight init, shuffling and augmentation.
            device: auto, cuda or cpu.
            num_workers: DataLoader worker processes, or auto (chosen from the machine).
            threads: CPU threads for torch (0: default).
            max_steps_per_epoch: Cap on batches per epoch (0: whole epoch).
            checkpoint_root: Object-store prefix of train checkpoints; each run keeps its own
                under its run id, so a retried (preempted) train task resumes ('' disables).
            checkpoint_every_steps: Optimizer steps between checkpoints (0: epoch ends only).
            checkpoint_min_interval_s: Seconds at least between scheduled checkpoints.
            keep_checkpoints: Newest checkpoints kept per run.
            min_accuracy: Lowest test accuracy that may be deployed.
            max_regression: Largest accuracy drop allowed against production.
            top_k: k of the reported top-k accuracy.
            eval_batch_size: Evaluation batch size.
            registry_uri: Model registry, s3://bucket/prefix.
            model_name: Registry and InferenceService name of the model.
            registry_alias: Alias of the serving version.
            namespace: Namespace of the rendered InferenceService.
            service_account: Service account KServe reads the model with.
            serving_image: Image of the KServe predictor.
            storage_uri_prefix: Storage URI prefix for a registry not on S3 (e.g. pvc://...).
            smoke_samples: Test images the deploy smoke test sends to the real model server
                before promoting (0 skips it).
            smoke_p95_ms: Highest p95 latency (ms) the smoke test accepts.
            canary_percent: Share of traffic a new version takes first while another serves
                (0: all at once; finish with imgclf registry promote --finish).
            apply_inference_service: auto, true or false: apply the InferenceService from
                the deploy task and wait for Ready (auto: when the pod has a service account).
            force: Train even if the dataset is unchanged since production.
        """
        ingest_task = ingest(
            source=source,
            image_size=image_size,
            split_train=split_train,
            split_val=split_val,
            split_test=split_test,
            split_seed=split_seed,
            image_format=image_format,
        )
        # Never cached: the same source URI can hold new images tomorrow, and a cached
        # ingest would hide them from the retraining check below.
        ingest_task.set_caching_options(enable_caching=False)
        dataset = ingest_task.outputs["dataset"]

        validate_task = validate(
            dataset=dataset,
            min_width=min_width,
            max_width=max_width,
            min_height=min_height,
            max_height=max_height,
            allowed_modes=allowed_modes,
            min_images_per_class=min_images_per_class,
            min_images_per_split=min_images_per_split,
            max_duplicate_fraction=max_duplicate_fraction,
            max_imbalance_ratio=max_imbalance_ratio,
            imbalance_blocking=imbalance_blocking,
        )
        validate_task.set_caching_options(enable_caching=True)

        check_task = check_retrain(
            dataset=dataset,
            registry_uri=registry_uri,
            model_name=model_name,
            registry_alias=registry_alias,
            force=force,
        ).after(validate_task)
        check_task.set_caching_options(enable_caching=False)

        with dsl.If(check_task.outputs["should_retrain"] == True, name="dataset-changed"):  # noqa: E712
            if cluster.train_backend == "pod":
                where = {"nproc_per_node": max(1, cluster.gpu_limit)}
                train_component = train
            else:  # a TrainJob or PyTorchJob trains; this task submits it and waits
                where = {
                    "image": IMAGE,
                    "cluster_settings": json.dumps(config.to_dict(cluster), sort_keys=True),
                }
                train_component = train_job
            train_task = train_component(
                dataset=dataset,
                model=model,
                pretrained=pretrained,
                freeze_backbone=freeze_backbone,
                freeze_epochs=freeze_epochs,
                train_image_size=train_image_size,
                augment=augment,
                epochs=epochs,
                min_steps=min_steps,
                batch_size=batch_size,
                optimizer=optimizer,
                lr=lr,
                backbone_lr=backbone_lr,
                weight_decay=weight_decay,
                scheduler=scheduler,
                patience=patience,
                train_seed=train_seed,
                device=device,
                num_workers=num_workers,
                threads=threads,
                max_steps_per_epoch=max_steps_per_epoch,
                checkpoint_root=checkpoint_root,
                checkpoint_every_steps=checkpoint_every_steps,
                checkpoint_min_interval_s=checkpoint_min_interval_s,
                keep_checkpoints=keep_checkpoints,
                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                **where,
            )
            train_task.set_caching_options(enable_caching=False)
            if cluster.train_backend == "pod":
                use_gpu(train_task, cluster)
            else:
                use_job_launcher(train_task)
            use_retries(train_task, cluster)

            evaluate_task = evaluate(
                dataset=dataset,
                trained_model=train_task.outputs["trained_model"],
                min_accuracy=min_accuracy,
                max_regression=max_regression,
                top_k=top_k,
                eval_batch_size=eval_batch_size,
                registry_uri=registry_uri,
                model_name=model_name,
                registry_alias=registry_alias,
            )
            evaluate_task.set_caching_options(enable_caching=False)

            with dsl.If(evaluate_task.outputs["passed"] == True, name="quality-gate-passed"):  # noqa: E712
                deploy_task = deploy(
                    dataset=dataset,
                    trained_model=train_task.outputs["trained_model"],
                    evaluation=evaluate_task.outputs["evaluation"],
                    namespace=namespace,
                    service_account=service_account,
                    serving_image=serving_image,
                    storage_uri_prefix=storage_uri_prefix,
                    registry_uri=registry_uri,
                    model_name=model_name,
                    registry_alias=registry_alias,
                    smoke_samples=smoke_samples,
                    smoke_p95_ms=smoke_p95_ms,
                    canary_percent=canary_percent,
                    apply_inference_service=apply_inference_service,
                )
                deploy_task.set_caching_options(enable_caching=False)
                use_retries(deploy_task, cluster)

        for task in (ingest_task, validate_task, check_task, train_task, evaluate_task):
            use_object_store(task, cluster)
        use_object_store(deploy_task, cluster)

    return training_pipeline


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipelines.training_pipeline [--out PATH] [--params PATH]``."""
    parser = argparse.ArgumentParser(description="Compile the imgclf training pipeline to YAML.")
    parser.add_argument("--out", type=Path, default=COMPILED_PATH, help="output YAML path")
    parser.add_argument(
        "--params",
        type=Path,
        default=PARAMS_PATH,
        help="params.yaml whose sections give the run-parameter defaults and cluster settings",
    )
    args = parser.parse_args(argv)
    print(compile_pipeline(build_pipeline(args.params), args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
