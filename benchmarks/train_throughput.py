"""Training throughput of ``imgclf.training.engine.train_one_epoch`` against a plain PyTorch loop.

The engine adds progress bars, metric accumulation, AMP and scheduler hooks around the
step; this benchmark proves that costs (almost) nothing: the ratio of images/s must stay
>= 0.95. Both loops train the same model with the same optimizer over the same in-memory
``TensorDataset`` (no image decoding, so only loop overhead differs), with the same torch
thread count. Repetitions alternate between the two loops so that load from other
processes hits both alike; the median of each is reported.

    python benchmarks/train_throughput.py --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from imgclf.training import engine
from imgclf.training.models import create_model, param_groups


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
    """Benchmark options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="model name (default resnet18)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--batches", type=int, default=12, help="batches per timed epoch")
    parser.add_argument("--reps", type=int, default=5, help="timed epochs per loop")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs per loop")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument(
        "--min-ratio", type=float, default=0.0, help="exit 1 if engine/plain is below this"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run both loops alternately and print their images/s and the ratio."""
    args = parse_args(argv)
    engine.set_threads(args.threads)
    device = engine.select_device(args.device)
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
    ratio = ours / plain
    print(
        f"model={args.model} batch={args.batch_size} size={args.image_size} "
        f"device={device} threads={torch.get_num_threads()} reps={args.reps}"
    )
    print(f"plain loop : {plain:9.1f} images/s")
    print(f"imgclf     : {ours:9.1f} images/s")
    print(f"ratio      : {ratio:.3f} (target >= 0.95)")
    return 1 if ratio < args.min_ratio else 0


if __name__ == "__main__":
    sys.exit(main())
