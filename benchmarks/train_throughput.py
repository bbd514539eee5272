"""Training throughput: the engine's loop, and whether the real data path keeps up with it.

(a) ``imgclf.training.engine.train_one_epoch`` against a plain PyTorch loop. The engine adds
progress bars, metric accumulation, AMP and scheduler hooks around the step; this proves
that costs (almost) nothing: the ratio of images/s must stay >= 0.95. Both loops train the
same model with the same optimizer over the same in-memory ``TensorDataset`` (no image
decoding, so only loop overhead differs), with the same torch thread count. Repetitions
alternate between the two loops so that load from other processes hits both alike; the
median of each is reported.

(b) The real training data path alone: ``ManifestDataset`` over an ingested dataset's train
split, the train transform (``ClassificationPresetTrain`` with ``train.augment``) and the
loader settings of ``params.yaml`` (``auto`` by default), against the rate (a) trains at.
``loader ratio`` = loader images/s / engine images/s must be >= 2, so that the loader,
sharing the machine with training, still never makes it wait. The transform is also timed
alone, on images already decoded. The dataset is ``out/dataset`` when present, else
``sample:digits`` ingested into a temporary dir.

    python benchmarks/train_throughput.py --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from imgclf import config
from imgclf.config import IngestConfig, TrainConfig
from imgclf.data.loader import ManifestDataset, make_loader, resolve_loader_settings
from imgclf.training import engine
from imgclf.training.models import create_model, param_groups
from imgclf.training.presets import ClassificationPresetTrain

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
DEFAULT_DATASET = REPO / "out" / "dataset"


def plain_epoch(
    model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, device: torch.device
) -> int:
    """The textbook loop: forward, loss, backward, step; returns the number of images."""
    criterion = nn.CrossEntropyLoss()
    model.train()
    seen = 0
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(images), targets)
        loss.backward()
        optimizer.step()
        seen += targets.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen


def engine_epoch(
    model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, device: torch.device
) -> int:
    """One epoch through imgclf's engine; returns the number of images."""
    metrics = engine.train_one_epoch(model, loader, optimizer, None, device)
    return int(metrics["images"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Benchmark options; model, batch and image size default to params.yaml's train."""
    train = config.load_section(TrainConfig, "train", PARAMS)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=train.model, help="model name (params.yaml)")
    parser.add_argument("--batch-size", type=int, default=train.batch_size)
    parser.add_argument("--image-size", type=int, default=train.image_size)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--batches", type=int, default=12, help="batches per timed epoch")
    parser.add_argument("--reps", type=int, default=5, help="timed epochs per loop")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs per loop")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument(
        "--min-ratio", type=float, default=0.0, help="exit 1 if engine/plain is below this"
    )
    parser.add_argument(
        "--dataset", type=Path, default=None, help="ingested dataset dir (default out/dataset)"
    )
    parser.add_argument("--loader-epochs", type=int, default=3, help="timed loader epochs")
    parser.add_argument(
        "--min-loader-ratio", type=float, default=0.0, help="exit 1 if loader ratio is below"
    )
    return parser.parse_args(argv)


def engine_vs_plain(args: argparse.Namespace, device: torch.device) -> tuple[float, float]:
    """(a): print plain-loop and engine images/s; return (engine images/s, engine/plain)."""
    torch.manual_seed(0)
    n = args.batch_size * args.batches
    data = TensorDataset(
        torch.randn(n, 3, args.image_size, args.image_size),
        torch.randint(0, args.num_classes, (n,)),
    )
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True)
    model = engine.prepare_model(create_model(args.model, args.num_classes), device)
    optimizer = engine.create_optimizer(
        "adamw", param_groups(model, lr=1e-3, backbone_lr=1e-4), weight_decay=1e-4
    )
    loops = {"plain": plain_epoch, "engine": engine_epoch}
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for rep in range(args.warmup + args.reps):
        order = list(loops) if rep % 2 == 0 else list(reversed(loops))
        for name in order:
            start = time.perf_counter()
            images = loops[name](model, loader, optimizer, device)
            elapsed = time.perf_counter() - start
            if rep >= args.warmup:
                rates[name].append(images / elapsed)
    plain = statistics.median(rates["plain"])
    ours = statistics.median(rates["engine"])
    print(
        f"model={args.model} batch={args.batch_size} size={args.image_size} "
        f"device={device} threads={torch.get_num_threads()} reps={args.reps}"
    )
    print(f"plain loop : {plain:9.1f} images/s")
    print(f"imgclf     : {ours:9.1f} images/s")
    print(f"ratio      : {ours / plain:.3f} (target >= 0.95)")
    return ours, ours / plain


def ingested_dataset(path: Path | None, scratch: Path) -> Path:
    """``path``, else out/dataset when ingested, else sample:digits ingested into ``scratch``."""
    if path is not None:
        return path
    if (DEFAULT_DATASET / "manifest.csv").exists():
        return DEFAULT_DATASET
    from imgclf.steps import ingest

    ingest.run(IngestConfig(source="sample:digits"), out_dir=scratch / "dataset")
    return scratch / "dataset"


def transform_seconds_per_image(dataset: ManifestDataset) -> tuple[float, float]:
    """(decode, transform) seconds per image over the split, the transform on decoded images."""
    from PIL import Image

    start = time.perf_counter()
    images = []
    for path, _ in dataset.samples:
        with Image.open(path) as image:
            image.load()
            images.append(image.copy())
    decoded = time.perf_counter()
    assert dataset.transform is not None
    for image in images:
        dataset.transform(image)
    end = time.perf_counter()
    return (decoded - start) / len(images), (end - decoded) / len(images)


def loader_rate(loader: DataLoader, epochs: int) -> float:
    """Images/s over ``epochs`` passes, after one untimed pass that starts the workers."""
    for _ in loader:
        pass
    seen = 0
    start = time.perf_counter()
    for _ in range(epochs):
        for images, _targets in loader:
            seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def data_path(args: argparse.Namespace, device: torch.device, train_rate: float) -> float:
    """(b): print the real train data path's images/s against ``train_rate``; return the ratio."""
    cfg = config.load_section(TrainConfig, "train", PARAMS)
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as scratch:
        dataset_dir = ingested_dataset(args.dataset, Path(scratch))
        transform = ClassificationPresetTrain(size=args.image_size, augment=cfg.augment)
        dataset = ManifestDataset(dataset_dir, "train", transform)
        decode_s, transform_s = transform_seconds_per_image(dataset)
        settings = resolve_loader_settings(
            num_workers=cfg.num_workers,
            prefetch_factor=cfg.prefetch_factor,
            persistent_workers=cfg.persistent_workers,
            pin_memory=cfg.pin_memory,
            device_type=device.type,
        )
        loader = make_loader(
            dataset,
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=cfg.num_workers,
            prefetch_factor=cfg.prefetch_factor,
            persistent_workers=cfg.persistent_workers,
            pin_memory=cfg.pin_memory,
            device_type=device.type,
            drop_last=len(dataset) > args.batch_size,
        )
        rate = loader_rate(loader, args.loader_epochs)
        del loader  # stops persistent workers before the dir goes
    ratio = rate / train_rate
    print(f"dataset    : {dataset_dir} ({len(dataset)} train images, augment={cfg.augment})")
    print(
        f"decode     : {decode_s * 1e3:7.3f} ms/image   "
        f"transform: {transform_s * 1e3:7.3f} ms/image (one process)"
    )
    print(
        f"loader     : {rate:9.1f} images/s  (num_workers={settings.num_workers} "
        f"prefetch_factor={settings.prefetch_factor} "
        f"persistent_workers={settings.persistent_workers} pin_memory={settings.pin_memory})"
    )
    print(f"loader ratio: {ratio:.2f} (loader / engine training images/s; target >= 2)")
    return ratio


def main(argv: list[str] | None = None) -> int:
    """(a) then (b); exit 1 when a ratio is below its ``--min-*`` bound."""
    args = parse_args(argv)
    engine.set_threads(args.threads)
    device = engine.select_device(args.device)
    train_rate, engine_ratio = engine_vs_plain(args, device)
    loader_ratio = data_path(args, device, train_rate)
    return 1 if engine_ratio < args.min_ratio or loader_ratio < args.min_loader_ratio else 0


if __name__ == "__main__":
    sys.exit(main())
