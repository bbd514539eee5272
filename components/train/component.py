"""KFP component: train (or fine-tune) a classifier on the dataset; the pipeline adds the GPU."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(
    dataset: Input[Dataset],
    trained_model: Output[Model],
    metrics: Output[Metrics],
    training_curves: Output[HTML],
    model: str,
    pretrained: str,
    freeze_backbone: bool,
    freeze_epochs: int,
    train_image_size: int,
    augment: str,
    epochs: int,
    min_steps: int,
    batch_size: int,
    optimizer: str,
    lr: str,
    backbone_lr: str,
    weight_decay: float,
    scheduler: str,
    patience: int,
    train_seed: int,
    device: str,
    num_workers: str,
    threads: int,
    max_steps_per_epoch: int,
    checkpoint_root: str,
    checkpoint_every_steps: int,
    checkpoint_min_interval_s: float,
    keep_checkpoints: int,
    run_id: str,
    nproc_per_node: int,
):
    """Run ``imgclf.steps.train`` and publish the model dir as a Model artifact.

    Checkpoints go to ``checkpoint_root/run_id``: a KFP retry of the same run (a preempted
    GPU node) resumes from the last one instead of starting over. With ``nproc_per_node``
    > 1 (the pod's GPUs) the step runs as that many DistributedDataParallel processes.

    Args:
        dataset: Validated dataset dir written by the ingest component.
        trained_model: Output model dir: ``model.safetensors``, the ``model.pt2`` serving
            export, ``model.json`` (classes, input size, normalisation, dataset hash) and
            ``history.csv``.
        metrics: Output best validation accuracy and loss and the number of epochs run.
        training_curves: Output page with the train/validation loss and accuracy per epoch
            (a plot and a table), for the KFP UI's viewer.
        model: torchvision classifier name (``resnet18``, ...) or ``simple_cnn``.
        pretrained: ``none``, ``imagenet``, or a path or ``s3://`` URI of a weights file.
        freeze_backbone: Train only the new head (transfer learning with a frozen backbone).
        freeze_epochs: With pretrained weights, epochs that train the head only first.
        train_image_size: Side in pixels the images are resized to (the model's input).
        augment: Training augmentation preset: ``none``, ``light`` or ``strong``.
        epochs: Epochs for a large dataset (early stopping may end sooner).
        min_steps: Optimizer steps a small dataset trains for at least.
        batch_size: Images per training batch.
        optimizer: Optimizer name (``adamw``, ``sgd``, ...).
        lr: Learning rate of the head, or ``auto`` (the LR range test picks it).
        backbone_lr: Backbone rate, or ``auto``: lr/10 with pretrained weights (differential
            learning rates), lr from scratch.
        weight_decay: Weight decay of the optimizer.
        scheduler: Learning-rate schedule (``onecycle``, ...).
        patience: Epochs without validation-loss improvement before stopping early.
        train_seed: Seed of weight init, shuffling and augmentation.
        device: ``auto`` (the GPU when the pod has one), ``cuda`` or ``cpu``.
        num_workers: DataLoader worker processes, or ``auto`` (chosen from the machine).
        threads: CPU threads for torch (0: torch's default).
        max_steps_per_epoch: Cap on batches per epoch (0: whole epoch); for smoke runs.
        checkpoint_root: Object-store prefix (or local dir) of checkpoints, one folder per
            run; empty turns checkpoints off.
        checkpoint_every_steps: Optimizer steps between checkpoints (0: epoch ends only).
        checkpoint_min_interval_s: Seconds at least between scheduled checkpoints
            (SIGTERM always writes one).
        keep_checkpoints: Newest checkpoints kept per run.
        run_id: The KFP run's id (the pipeline passes its placeholder): retries share it.
        nproc_per_node: Training processes in this pod, one per GPU (1: no DDP).
    """
    inputs = dict(locals())  # first: exactly this component's parameters
    from pathlib import Path

    from imgclf import config
    from imgclf.kfp.components import publish_training, train_values
    from imgclf.kfp.report_html import write_curves_page
    from imgclf.steps import train as step
    from imgclf.steps import train_launch

    cfg = config.build(config.TrainConfig, train_values(inputs), "component:train")
    dataset_dir, out_dir = Path(dataset.path), Path(trained_model.path)
    if nproc_per_node > 1:
        summary = train_launch.launch(
            cfg, dataset_dir=dataset_dir, out_dir=out_dir, nproc=nproc_per_node
        )
    else:
        summary = step.run(cfg, dataset_dir=dataset_dir, out_dir=out_dir)
    publish_training(trained_model, metrics, summary)
    write_curves_page(Path(trained_model.path), Path(training_curves.path))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_job(
    dataset: Input[Dataset],
    trained_model: Output[Model],
    metrics: Output[Metrics],
    training_curves: Output[HTML],
    model: str,
    pretrained: str,
    freeze_backbone: bool,
    freeze_epochs: int,
    train_image_size: int,
    augment: str,
    epochs: int,
    min_steps: int,
    batch_size: int,
    optimizer: str,
    lr: str,
    backbone_lr: str,
    weight_decay: float,
    scheduler: str,
    patience: int,
    train_seed: int,
    device: str,
    num_workers: str,
    threads: int,
    max_steps_per_epoch: int,
    checkpoint_root: str,
    checkpoint_every_steps: int,
    checkpoint_min_interval_s: float,
    keep_checkpoints: int,
    run_id: str,
    image: str,
    cluster_settings: str,
):
    """Train as ``train`` does, on a TrainJob or PyTorchJob of ``kfp.num_nodes`` nodes.

    Args:
        dataset: Validated dataset dir written by the ingest component.
        trained_model: Output model dir, as ``train`` writes it (copied back from the job).
        metrics: Output best validation accuracy and loss and the number of epochs run.
        training_curves: Output page with the train/validation loss and accuracy per epoch
            (a plot and a table), for the KFP UI's viewer.
        model: torchvision classifier name (``resnet18``, ...) or ``simple_cnn``.
        pretrained: ``none``, ``imagenet``, or a path or ``s3://`` URI of a weights file.
        freeze_backbone: Train only the new head (transfer learning with a frozen backbone).
        freeze_epochs: With pretrained weights, epochs that train the head only first.
        train_image_size: Side in pixels the images are resized to (the model's input).
        augment: Training augmentation preset: ``none``, ``light`` or ``strong``.
        epochs: Epochs for a large dataset (early stopping may end sooner).
        min_steps: Optimizer steps a small dataset trains for at least.
        batch_size: Images per training batch.
        optimizer: Optimizer name (``adamw``, ``sgd``, ...).
        lr: Learning rate of the head, or ``auto`` (the LR range test picks it).
        backbone_lr: Backbone rate, or ``auto``.
        weight_decay: Weight decay of the optimizer.
        scheduler: Learning-rate schedule (``onecycle``, ...).
        patience: Epochs without validation-loss improvement before stopping early.
        train_seed: Seed of weight init, shuffling and augmentation.
        device: ``auto`` (the GPU when the node has one), ``cuda`` or ``cpu``.
        num_workers: DataLoader worker processes, or ``auto`` (chosen from the machine).
        threads: CPU threads for torch (0: torch's default).
        max_steps_per_epoch: Cap on batches per epoch (0: whole epoch); for smoke runs.
        checkpoint_root: Object-store prefix of checkpoints, one folder per run ('': off).
        checkpoint_every_steps: Optimizer steps between checkpoints (0: epoch ends only).
        checkpoint_min_interval_s: Seconds at least between scheduled checkpoints
            (SIGTERM always writes one).
        keep_checkpoints: Newest checkpoints kept per run.
        run_id: KFP run id; names the job, so a retried task waits for the same job, and
            the checkpoint folder, so a job restarted by its own backoff resumes.
        image: Image of the job's pods (the pipeline's own image).
        cluster_settings: The ``kfp`` section as JSON (backend, nodes, GPUs, Secret names).
    """
    inputs = dict(locals())  # first: exactly this component's parameters
    import json
    from pathlib import Path

    from imgclf import config, contracts
    from imgclf.kfp import trainjob
    from imgclf.kfp.components import publish_training, train_values
    from imgclf.kfp.report_html import write_curves_page
    from imgclf.kfp.settings import ClusterSettings
    from imgclf.serving.cluster import api_client

    values = train_values(inputs)
    config.build(config.TrainConfig, values, "component:train_job")  # fail here, not in the job
    cluster = config.build(ClusterSettings, json.loads(cluster_settings), "component:train_job")
    client = api_client()
    try:
        trainjob.run_training_job(
            cluster.train_backend,
            run_id=run_id,
            image=image,
            dataset_dir=Path(dataset.path),
            model_dir=Path(trained_model.path),
            staging_uri=f"{trainjob.s3_uri(trained_model.uri)}-job",
            train_args=trainjob.train_overrides(values),
            cluster=cluster,
            client=client,
            namespace=trainjob.pod_namespace("default"),
        )
    finally:
        client.close()
    summary = contracts.read_model_json(trained_model.path)
    publish_training(trained_model, metrics, summary)
    write_curves_page(Path(trained_model.path), Path(training_curves.path))
