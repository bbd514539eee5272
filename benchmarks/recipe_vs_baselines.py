"""Test accuracy and wall time of the default ``imgclf train`` recipe against two baselines.

A training recipe is only worth shipping if it beats what a user would write in ten
minutes. For each dataset this script ingests the images once (the real ingest step, with
the split settings of ``params.yaml``), so every method sees the same train/val/test files,
then measures, in one process and one go:

- ``recipe``: ``imgclf.steps.train.run`` + ``imgclf.steps.evaluate.run`` with the ``train``
  and ``evaluate`` sections of the repo's ``params.yaml`` exactly as shipped (no overrides),
  against a fresh empty registry; test accuracy from evaluate's ``metrics.json``.
- ``book``: the plain loop of *Programming PyTorch for Deep Learning*: torchvision
  ``ImageFolder`` over ``images/train``, ``Resize((32, 32))``, ``ToTensor``, ImageNet
  ``Normalize``, ``resnet18(weights=None)``, ``Adam(lr=1e-3)``, 8 epochs of batch 64,
  ``CrossEntropyLoss``; scored on ``images/test``. It never looks at val (the book only
  prints val loss). Seeded; same device as the recipe.
- ``svc``: scikit-learn ``SVC`` (RBF kernel, ``gamma="scale"``) on 32x32 grayscale pixels
  in [0, 1]. ``C`` is picked from 1, 10, 100 by val accuracy, then the model is refitted on
  train + val: the strongest cheap classical baseline, so beating it means something.

Datasets: ``digits`` (the embedded 8x8 scans upscaled to 32 px, 1,797 images) and two
generated ones (``benchmarks/_synthetic_datasets.py``) where the class is a shape or a
texture at a random place, size, rotation and colour, so raw pixels are not enough.
Wall time covers everything a user would wait for: data loading and decoding, training,
and, for the recipe, export and the evaluate step. The test splits are small (50-60 images
for the generated sets), so an accuracy difference of one or two images is noise.

    python benchmarks/recipe_vs_baselines.py --datasets digits,shapes,textures
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _synthetic_datasets import GENERATORS
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from imgclf import config
from imgclf.config import EvaluateConfig, IngestConfig, RegistryConfig, TrainConfig
from imgclf.contracts import IMAGES_DIR, METRICS_FILE, read_eval_metrics, read_manifest
from imgclf.data.sample import write_digits
from imgclf.steps import evaluate, ingest, train
from imgclf.training import engine
from imgclf.training.models import IMAGENET_MEAN, IMAGENET_STD

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
METHODS = ("recipe", "book", "svc")
SIZE = 32  # the recipe's default train.image_size; both baselines use it too

BOOK_EPOCHS, BOOK_BATCH, BOOK_LR, BOOK_SEED = 8, 64, 1e-3, 42
SVC_C_GRID = (1.0, 10.0, 100.0)
DATASET_SEED = 0

# model.json entries worth showing next to the recipe's result, where the recipe records them
# (the resolved rate first: params.lr may only say "auto")
RECIPE_DETAILS = (
    ("lr", ("training", "lr")),
    ("lr", ("lr",)),
    ("lr", ("params", "lr")),
    ("lr_source", ("training", "lr_source")),
    ("lr_steepest", ("training", "lr_steepest")),
    ("backbone_lr", ("training", "backbone_lr")),
    ("epochs", ("training", "epochs_planned")),
    ("epochs", ("params", "epochs")),
    ("epochs_run", ("metrics", "epochs_run")),
    ("best_epoch", ("metrics", "best_epoch")),
    ("best_val_acc", ("metrics", "best_val_accuracy")),
)


def write_source(name: str, dest: Path) -> None:
    """Write dataset ``name`` as an ImageFolder tree ``dest/<class>/<image>``."""
    if name == "digits":
        write_digits(dest, image_size=SIZE)
    else:
        GENERATORS[name](dest, seed=DATASET_SEED)


def ingest_dataset(source: Path, out_dir: Path) -> dict[str, int]:
    """Run the real ingest step (split settings from params.yaml); return images per split."""
    cfg = config.load_section(IngestConfig, "ingest", PARAMS, overrides={"source": str(source)})
    ingest.run(cfg, out_dir=out_dir)
    counts = dict.fromkeys(("train", "val", "test"), 0)
    for row in read_manifest(out_dir):
        counts[row["split"]] += 1
    return counts


def run_recipe(dataset_dir: Path, work: Path) -> dict[str, Any]:
    """The shipped defaults: train + evaluate exactly as ``imgclf train`` / ``evaluate`` run."""
    train_cfg = config.load_section(TrainConfig, "train", PARAMS)
    eval_cfg = config.load_section(EvaluateConfig, "evaluate", PARAMS)
    # a fresh, empty local registry: no champion, so the gate only applies its floor
    registry = RegistryConfig(uri=str(work / "registry"), model_name=dataset_dir.parent.name)
    start = time.perf_counter()
    meta = train.run(train_cfg, dataset_dir=dataset_dir, out_dir=work / "model")
    trained = time.perf_counter()
    evaluate.run(
        eval_cfg,
        registry,
        dataset_dir=dataset_dir,
        model_dir=work / "model",
        out_dir=work / "eval",
    )
    end = time.perf_counter()
    metrics = read_eval_metrics(work / "eval")
    return {
        "accuracy": float(metrics["accuracy"]),
        "seconds": end - start,
        "train_seconds": trained - start,
        "evaluate_seconds": end - trained,
        "details": recipe_details(meta),
        "model_params": meta.get("params", {}),
        "model_training": meta.get("training", {}),
        "model_metrics": meta.get("metrics", {}),
        "metrics_file": str(work / "eval" / METRICS_FILE),
    }


def recipe_details(meta: dict[str, Any]) -> dict[str, Any]:
    """The ``RECIPE_DETAILS`` entries that ``model.json`` has (the first found per name)."""
    found: dict[str, Any] = {}
    for name, keys in RECIPE_DETAILS:
        value: Any = meta
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None and name not in found:
            found[name] = value
    return found


def _to_rgb(image: Image.Image) -> Image.Image:
    """Modes are mixed (L and RGB after ingest); the book's loop assumes three channels."""
    return image.convert("RGB")


@contextmanager
def _torch_defaults() -> Iterator[None]:
    """Run with torch's default (non-deterministic) kernels, as the book does.

    The recipe's seeding switches deterministic algorithms on for the whole process; the
    baseline should not inherit that from an earlier dataset's recipe run.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def book_loaders(dataset_dir: Path) -> tuple[DataLoader, DataLoader, int]:
    """ImageFolder train and test loaders with the book's transforms, and the class count."""
    from torchvision import datasets, transforms

    transform = transforms.Compose(
        [
            transforms.Lambda(_to_rgb),
            transforms.Resize((SIZE, SIZE)),
            transforms.ToTensor(),
            transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )
    root = dataset_dir / IMAGES_DIR
    train_set = datasets.ImageFolder(str(root / "train"), transform=transform)
    test_set = datasets.ImageFolder(str(root / "test"), transform=transform)
    if test_set.classes != train_set.classes:
        raise RuntimeError(
            f"{root}: train classes {train_set.classes} != test classes {test_set.classes}; "
            "ImageFolder label indices would not match"
        )
    # The book's loop keeps the last partial batch; a batch of one image cannot train
    # BatchNorm, so only that case (digits has none) drops it.
    ragged_one = len(train_set) % BOOK_BATCH == 1
    train_loader = DataLoader(train_set, batch_size=BOOK_BATCH, shuffle=True, drop_last=ragged_one)
    test_loader = DataLoader(test_set, batch_size=BOOK_BATCH)
    return train_loader, test_loader, len(train_set.classes)


def run_book(dataset_dir: Path, device: torch.device) -> dict[str, Any]:
    """Train and test the book's plain loop; accuracy on the test split."""
    from torchvision import models

    start = time.perf_counter()
    with _torch_defaults():
        random.seed(BOOK_SEED)
        np.random.seed(BOOK_SEED)
        torch.manual_seed(BOOK_SEED)
        train_loader, test_loader, num_classes = book_loaders(dataset_dir)
        model = models.resnet18(weights=None, num_classes=num_classes).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=BOOK_LR)
        loss_fn = nn.CrossEntropyLoss()
        for _ in range(BOOK_EPOCHS):
            model.train()
            for inputs, targets in train_loader:
                optimizer.zero_grad()
                loss = loss_fn(model(inputs.to(device)), targets.to(device))
                loss.backward()
                optimizer.step()
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for inputs, targets in test_loader:
                predicted = model(inputs.to(device)).argmax(dim=1).cpu()
                correct += int((predicted == targets).sum())
                total += len(targets)
    return {"accuracy": correct / total, "seconds": time.perf_counter() - start}


def pixel_features(dataset_dir: Path, rows: Iterable[dict[str, str]]) -> np.ndarray:
    """32x32 grayscale pixels in [0, 1], one flattened row per image."""
    features = []
    for row in rows:
        with Image.open(dataset_dir / row["path"]) as image:
            small = image.convert("L").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
            features.append(np.asarray(small, dtype=np.float32).ravel() / 255.0)
    return np.stack(features)


def run_svc(dataset_dir: Path) -> dict[str, Any]:
    """RBF SVC on pixels: C chosen on val, refitted on train + val, scored on test."""
    from sklearn.svm import SVC

    start = time.perf_counter()
    rows = [r for r in read_manifest(dataset_dir) if not (r.get("error") or "").strip()]
    data = {}
    for split in ("train", "val", "test"):
        subset = [r for r in rows if r["split"] == split]
        data[split] = (pixel_features(dataset_dir, subset), [r["label"] for r in subset])
    val_scores = {
        c: SVC(C=c, gamma="scale").fit(*data["train"]).score(*data["val"]) for c in SVC_C_GRID
    }
    best_c = max(SVC_C_GRID, key=lambda c: (val_scores[c], -c))
    x = np.concatenate([data["train"][0], data["val"][0]])
    y = data["train"][1] + data["val"][1]
    accuracy = SVC(C=best_c, gamma="scale").fit(x, y).score(*data["test"])
    return {
        "accuracy": float(accuracy),
        "seconds": time.perf_counter() - start,
        "C": best_c,
        "val_accuracy_by_C": val_scores,
    }


def benchmark(name: str, work: Path, device: torch.device) -> dict[str, Any]:
    """Generate, ingest and run every method on dataset ``name``; one result record."""
    root = work / name
    shutil.rmtree(root, ignore_errors=True)
    write_source(name, root / "raw")
    dataset_dir = root / "dataset"
    counts = ingest_dataset(root / "raw", dataset_dir)
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "svc": lambda: run_svc(dataset_dir),
        "book": lambda: run_book(dataset_dir, device),
        "recipe": lambda: run_recipe(dataset_dir, root),
    }
    results = {}
    for method, runner in runners.items():
        print(f"[{name}] {method} ...", file=sys.stderr, flush=True)
        results[method] = runner()
    return {"dataset": name, "images": counts, **results}


def ratios(record: dict[str, Any]) -> dict[str, float]:
    """recipe - book accuracy, recipe / svc accuracy, recipe / book wall time."""
    recipe, book, svc = (record[m] for m in METHODS)
    return {
        "acc_recipe_minus_book": recipe["accuracy"] - book["accuracy"],
        "acc_recipe_over_svc": recipe["accuracy"] / svc["accuracy"] if svc["accuracy"] else 0.0,
        "time_recipe_over_book": recipe["seconds"] / book["seconds"],
    }


def print_table(records: list[dict[str, Any]], device: torch.device) -> None:
    """One line per dataset: split sizes, accuracy and seconds per method, the ratios."""
    print(f"device={device} torch threads={torch.get_num_threads()} image size={SIZE}")
    header = (
        f"{'dataset':<9} {'train/val/test':>14} "
        + " ".join(f"{m + ' acc':>10} {'s':>6}" for m in METHODS)
        + f" {'acc r-b':>8} {'acc r/svc':>9} {'time r/b':>8}"
    )
    print(header)
    print("-" * len(header))
    for record in records:
        images = record["images"]
        split = f"{images['train']}/{images['val']}/{images['test']}"
        cells = " ".join(
            f"{record[m]['accuracy']:>10.4f} {record[m]['seconds']:>6.1f}" for m in METHODS
        )
        r = record["ratios"]
        print(
            f"{record['dataset']:<9} {split:>14} {cells} {r['acc_recipe_minus_book']:>+8.4f} "
            f"{r['acc_recipe_over_svc']:>9.3f} {r['time_recipe_over_book']:>8.2f}"
        )
    print()
    for record in records:
        details = " ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in record["recipe"]["details"].items()
        )
        print(
            f"{record['dataset']}: recipe {details or '(model.json records no lr/epochs)'}; "
            f"svc C={record['svc']['C']:g}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Benchmark options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    choices = ("digits", *GENERATORS)
    parser.add_argument(
        "--datasets",
        default=",".join(choices),
        help=f"comma-separated, from {', '.join(choices)} (default all)",
    )
    parser.add_argument(
        "--work", type=Path, help="keep datasets and models here (default: a temp dir, removed)"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the steps' progress")
    args = parser.parse_args(argv)
    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = sorted(set(args.datasets) - set(choices))
    if unknown or not args.datasets:
        parser.error(f"--datasets: unknown {', '.join(unknown) or '(none given)'}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Benchmark each dataset, print the table, optionally write JSON."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    device = engine.select_device(config.load_section(TrainConfig, "train", PARAMS).device)
    work = args.work or Path(tempfile.mkdtemp(prefix="imgclf-recipe-bench-"))
    records = []
    try:
        for name in args.datasets:
            record = benchmark(name, work, device)
            record["ratios"] = ratios(record)
            records.append(record)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print_table(records, device)
    if args.json:
        settings = {
            "book": {"epochs": BOOK_EPOCHS, "batch_size": BOOK_BATCH, "lr": BOOK_LR},
            "svc": {"kernel": "rbf", "gamma": "scale", "C_grid": list(SVC_C_GRID)},
            "recipe": dataclasses.asdict(config.load_section(TrainConfig, "train", PARAMS)),
        }
        args.json.write_text(
            json.dumps({"settings": settings, "results": records}, indent=2) + "\n",
            encoding="utf-8",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
