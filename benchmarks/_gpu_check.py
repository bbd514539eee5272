"""The Python half of ``benchmarks/gpu_check.sh``: ResNet-50 training throughput on one GPU.

``bench`` (the default) prints images/s of the book's fp32 loop, then with AMP (bf16 where
supported, else fp16 with a GradScaler), AMP + channels_last and AMP + channels_last +
``torch.compile``, each on synthetic batches already on the GPU (compute only), then the
best eager variant fed by imgclf's real data path (``ClassificationPresetTrain`` and
``make_loader`` with the ``auto`` settings) over a folder of generated JPEGs, and that data
path alone. ``ddp`` is a smoke test run under ``torchrun``: two processes train a few steps
with DistributedDataParallel and check that their weights agree. ``resume`` is one
checkpoint/resume round trip of the real ``imgclf train`` on CUDA: SIGTERM after the first
checkpoint (exit 75 expected), then a rerun that must resume; with ``--nproc 2`` the same
through ``imgclf train --nproc 2`` (NCCL).

    python benchmarks/_gpu_check.py bench --steps 30
    torchrun --standalone --nproc_per_node=2 benchmarks/_gpu_check.py ddp
    python benchmarks/_gpu_check.py resume [--nproc 2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from imgclf.data.loader import make_loader, resolve_loader_settings
from imgclf.training import engine
from imgclf.training.presets import ClassificationPresetTrain

SIZE = 224
CLASSES = 10
DDP_TOLERANCE = 1e-3  # summed weights; identical replicas agree to rounding


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield


def amp_dtype() -> torch.dtype:
    """bf16 where the GPU supports it (no scaler needed), else fp16."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def make_step(
    model: nn.Module, *, amp: torch.dtype | None, channels_last: bool
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One book-style training step (Adam lr 1e-3, cross-entropy) with the given options."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    loss_fn = nn.CrossEntropyLoss()
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def step(images: torch.Tensor, targets: torch.Tensor) -> None:
        images = images.cuda(non_blocking=True).contiguous(memory_format=fmt)
        targets = targets.cuda(non_blocking=True)
        autocast = torch.autocast("cuda", dtype=amp) if amp is not None else _nothing()
        with autocast:
            loss = loss_fn(model(images), targets)
        engine.optimizer_step(loss, optimizer, scaler)

    return step


def resnet50(*, channels_last: bool, compiled: bool) -> nn.Module:
    """A fresh ResNet-50 on the GPU."""
    from torchvision.models import resnet50 as build

    model = build(weights=None, num_classes=CLASSES).cuda()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compiled else model


def timed(
    step: Callable[[torch.Tensor, torch.Tensor], None],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    warmup: int,
) -> float:
    """Images/s of ``step`` over ``batches``, the first ``warmup`` batches untimed."""
    seen, start = 0, 0.0
    for index, (images, targets) in enumerate(batches):
        if index == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        step(images, targets)
        if index >= warmup:
            seen += images.shape[0]
    torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def synthetic(batch_size: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` references to one random batch already on the GPU: compute only."""
    images = torch.randn(batch_size, 3, SIZE, SIZE, device="cuda")
    targets = torch.randint(0, CLASSES, (batch_size,), device="cuda")
    return [(images, targets)] * steps


VARIANTS = {
    "fp32 (book loop)": {"amp": False, "channels_last": False, "compiled": False},
    "amp": {"amp": True, "channels_last": False, "compiled": False},
    "amp + channels_last": {"amp": True, "channels_last": True, "compiled": False},
    "amp + channels_last + compile": {"amp": True, "channels_last": True, "compiled": True},
}


def write_jpeg_folder(root: Path, per_class: int) -> None:
    """An ImageFolder of smooth random JPEGs at 224 px (noise upscaled, so sizes are photo-like)."""
    rng = np.random.default_rng(0)
    for label in range(CLASSES):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.integers(0, 256, size=(28, 28, 3), dtype=np.uint8)
            image = Image.fromarray(pixels).resize((SIZE, SIZE), Image.BILINEAR)
            image.save(folder / f"{index}.jpg", quality=90)


def data_path_rate(loader: Iterable[tuple[torch.Tensor, torch.Tensor]], epochs: int) -> float:
    """Images/s of the loader alone, after one untimed epoch that starts the workers."""
    for _ in loader:
        pass
    seen, start = 0, time.perf_counter()
    for _ in range(epochs):
        for images, _targets in loader:
            seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def bench(args: argparse.Namespace) -> int:
    """Print every variant's images/s on synthetic data, then the real data path."""
    torch.backends.cudnn.benchmark = True
    dtype = amp_dtype()
    print(f"gpu={torch.cuda.get_device_name()} torch={torch.__version__} amp dtype={dtype}")
    print(f"ResNet-50, {SIZE} px, batch {args.batch_size}, {args.steps} timed steps")
    rates = {}
    for name, options in VARIANTS.items():
        if options["compiled"] and args.no_compile:
            continue
        model = resnet50(channels_last=options["channels_last"], compiled=options["compiled"])
        step = make_step(
            model, amp=dtype if options["amp"] else None, channels_last=options["channels_last"]
        )
        warmup = args.warmup * (4 if options["compiled"] else 1)
        start = time.perf_counter()
        rates[name] = timed(step, synthetic(args.batch_size, warmup + args.steps), warmup)
        wall = time.perf_counter() - start
        print(f"synthetic  {name:<30} {rates[name]:8.1f} images/s   ({wall:.0f} s incl. warm-up)")
        del model, step
        torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        from torchvision.datasets import ImageFolder

        write_jpeg_folder(Path(scratch), args.images_per_class)
        dataset = ImageFolder(scratch, transform=ClassificationPresetTrain(size=SIZE))
        settings = resolve_loader_settings(device_type="cuda")
        loader = make_loader(
            dataset,
            batch_size=args.batch_size,
            shuffle=True,
            num_workers="auto",
            pin_memory="auto",
            device_type="cuda",
            drop_last=True,
        )
        print(
            f"image folder: {len(dataset)} JPEGs, loader {settings} "
            f"({len(os.sched_getaffinity(0))} cores)"
        )
        alone = data_path_rate(loader, args.loader_epochs)
        print(f"data path alone (decode + train transform)   {alone:8.1f} images/s")
        model = resnet50(channels_last=True, compiled=False)
        step = make_step(model, amp=dtype, channels_last=True)
        fed = timed(step, iter_loader(loader, args.loader_epochs + 1), args.warmup)
        eager = rates["amp + channels_last"]
        print(f"image folder amp + channels_last             {fed:8.1f} images/s")
        print(f"data path / synthetic training rate: {alone / eager:.2f} (>= 1: GPU never waits)")
    return 0


def iter_loader(loader: Iterable[Any], epochs: int) -> Iterator[Any]:
    """The loader's batches for ``epochs`` passes, as one stream."""
    for _ in range(epochs):
        yield from loader


def ddp(args: argparse.Namespace) -> int:
    """A few DDP steps on every rank; rank 0 reports whether the weights stayed in sync."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torchvision.models import resnet18

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    torch.manual_seed(0)
    model = DistributedDataParallel(resnet18(num_classes=CLASSES).cuda(), device_ids=[local])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(1 + rank)  # different data per rank, as a DistributedSampler gives
    start = time.perf_counter()
    for _ in range(args.steps):
        images = torch.randn(32, 3, 64, 64, device="cuda")
        targets = torch.randint(0, CLASSES, (32,), device="cuda")
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(images), targets).backward()
        optimizer.step()
    torch.cuda.synchronize()
    checksum = torch.stack([p.detach().float().sum() for p in model.parameters()]).sum()
    gathered = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(gathered, checksum)
    spread = max(float((g - gathered[0]).abs()) for g in gathered)
    if rank == 0:
        verdict = "ok" if spread < DDP_TOLERANCE else "FAILED (weights differ)"
        print(
            f"ddp {verdict}: world={world} {args.steps} steps in "
            f"{time.perf_counter() - start:.1f} s, weight checksum spread {spread:.2e}"
        )
    dist.destroy_process_group()
    return 0 if spread < DDP_TOLERANCE else 1


def resume(args: argparse.Namespace) -> int:
    """``imgclf ingest`` a small JPEG folder, ``imgclf train`` on CUDA until its first
    checkpoint, SIGTERM (exit 75 expected), then train again: it must resume and finish."""
    with tempfile.TemporaryDirectory(prefix="imgclf-gpu-resume-") as tmp:
        root = Path(tmp)
        write_jpeg_folder(root / "raw", per_class=16)
        ingest = ["imgclf", "ingest", "--source", str(root / "raw"), "--out", str(root / "ds")]
        subprocess.run(ingest, check=True, capture_output=True, text=True)
        checkpoints = root / "checkpoints"
        command = [
            "imgclf", "train", "--dataset", str(root / "ds"), "--out", str(root / "model"),
            "--checkpoint-dir", str(checkpoints), "--nproc", str(args.nproc),
            "--set", "device=cuda", "--set", "model=resnet18", "--set", "image_size=64",
            "--set", "epochs=10", "--set", "min_steps=0", "--set", "batch_size=8",
            "--set", "lr=0.001", "--set", "backbone_lr=0.001", "--set", "checkpoint_every_steps=2",
        ]  # fmt: skip
        start = time.perf_counter()
        first = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        while not list(checkpoints.glob("*.json")):
            if first.poll() is not None or time.perf_counter() - start > 240:
                first.kill()
                print(f"resume FAILED: no checkpoint appeared\n{first.communicate()[1][-2000:]}")
                return 1
            time.sleep(0.05)
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=120)
        stopped = time.perf_counter()
        second = subprocess.run(command, capture_output=True, text=True, timeout=600)
        resumed = [line for line in second.stderr.splitlines() if "resuming from" in line]
        ok = first.returncode == 75 and second.returncode == 0 and bool(resumed)
        print(
            f"resume {'ok' if ok else 'FAILED'} (nproc={args.nproc}): SIGTERM exit "
            f"{first.returncode} (75 expected), rerun exit {second.returncode}; "
            f"{resumed[0].strip() if resumed else 'no resume line'}; "
            f"rerun {time.perf_counter() - stopped:.1f} s"
        )
        if not ok:
            print(stderr[-2000:], second.stderr[-2000:], sep="\n")
        return 0 if ok else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options of both modes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="bench", choices=("bench", "ddp", "resume"))
    parser.add_argument("--nproc", type=int, default=1, help="resume: training processes")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (x4 compiled)")
    parser.add_argument("--images-per-class", type=int, default=128)
    parser.add_argument("--loader-epochs", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run ``bench``, ``ddp`` or ``resume``; without CUDA, say so and succeed."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: torch sees none, nothing to check")
        return 0
    return {"bench": bench, "ddp": ddp, "resume": resume}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
