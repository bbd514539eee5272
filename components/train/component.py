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
):
    """Run ``imgclf.steps.train`` and publish the model dir as a Model artifact.

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
    """
    from pathlib import Path

    from imgclf import config
    from imgclf.kfp.components import log_scalar_metrics
    from imgclf.steps import train as step

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
        },
        "component:train",
    )
    summary = step.run(cfg, dataset_dir=Path(dataset.path), out_dir=Path(trained_model.path))
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
