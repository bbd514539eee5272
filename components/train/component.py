"""KFP component: train (or fine-tune) a classifier on the dataset; the pipeline adds the GPU."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(
    dataset: Input[Dataset],
    trained_model: Output[Model],
    metrics: Output[Metrics],
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
        keep_checkpoints: Newest checkpoints kept per run.
        run_id: The KFP run's id (the pipeline passes its placeholder): retries share it.
        nproc_per_node: Training processes in this pod, one per GPU (1: no DDP).
    """
    from pathlib import Path

    from imgclf import config
    from imgclf.kfp.components import checkpoint_location, log_scalar_metrics
    from imgclf.steps import train as step
    from imgclf.steps import train_launch

    cfg = config.build(
        config.TrainConfig,
        {
            "model": model,
            "pretrained": pretrained,
            "freeze_backbone": freeze_backbone,
            "freeze_epochs": freeze_epochs,
            "image_size": train_image_size,
            "augment": augment,
            "epochs": epochs,
            "min_steps": min_steps,
            "batch_size": batch_size,
            "optimizer": optimizer,
            "lr": lr,
            "backbone_lr": backbone_lr,
            "weight_decay": weight_decay,
            "scheduler": scheduler,
            "patience": patience,
            "seed": train_seed,
            "device": device,
            "num_workers": num_workers,
            "threads": threads,
            "max_steps_per_epoch": max_steps_per_epoch,
            "checkpoint_dir": checkpoint_location(checkpoint_root, run_id),
            "checkpoint_every_steps": checkpoint_every_steps,
            "keep_checkpoints": keep_checkpoints,
        },
        "component:train",
    )
    dataset_dir, out_dir = Path(dataset.path), Path(trained_model.path)
    if nproc_per_node > 1:
        summary = train_launch.launch(
            cfg, dataset_dir=dataset_dir, out_dir=out_dir, nproc=nproc_per_node
        )
    else:
        summary = step.run(cfg, dataset_dir=dataset_dir, out_dir=out_dir)
    trained_model.metadata.update(
        {
            "framework": "pytorch",
            "architecture": summary["architecture"],
            "classes": summary["classes"],
            "input_size": summary["input_size"],
            "dataset_hash": summary["dataset_hash"],
            "torch_version": summary["torch_version"],
        }
    )
    log_scalar_metrics(metrics, {**summary["metrics"], "lr": summary["training"]["lr"]})
