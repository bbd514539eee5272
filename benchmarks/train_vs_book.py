"""End to end on the digits sample: ``imgclf train`` with the shipped params vs the book's loop.

- ``recipe``: the real step ``imgclf.steps.train.run`` with the ``train`` section of
  ``params.yaml`` as shipped (``num_workers: auto`` included), scored on the test split by
  the real evaluate step; both via ``recipe_vs_baselines.run_recipe``.
- ``book``: ``recipe_vs_baselines.run_book``, the plain loop of *Programming PyTorch for Deep
  Learning* (ImageFolder over ``images/train``, Resize/ToTensor/Normalize, resnet18,
  Adam lr 1e-3, scored on ``images/test``), run with the epochs the recipe ran and its batch
  size, on the same device, so the comparison is per epoch of the same length.

Both read the same ingested files (the real ingest step with the split of params.yaml). The
recipe's wall time covers the normalisation pass, the LR range test, training, early
stopping and the export; the evaluate step is timed apart.

    python benchmarks/train_vs_book.py
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import recipe_vs_baselines as rvb

from imgclf import config
from imgclf.config import TrainConfig
from imgclf.training import engine


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Benchmark options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work", type=Path, help="keep dataset and model here (default: a temp dir, removed)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log the steps' progress")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Ingest digits, run the recipe, then the book loop at the recipe's epochs and batch."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    train_cfg = config.load_section(TrainConfig, "train", rvb.PARAMS)
    if train_cfg.image_size != rvb.SIZE:
        raise SystemExit(f"train.image_size={train_cfg.image_size}: the book loop uses {rvb.SIZE}")
    device = engine.select_device(train_cfg.device)
    work = args.work or Path(tempfile.mkdtemp(prefix="imgclf-train-vs-book-"))
    try:
        rvb.write_source("digits", work / "raw")
        dataset_dir = work / "dataset"
        counts = rvb.ingest_dataset(work / "raw", dataset_dir)
        print("[digits] recipe ...", file=sys.stderr, flush=True)
        recipe = rvb.run_recipe(dataset_dir, work)
        epochs = int(recipe["model_metrics"]["epochs_run"])
        # run_book reads its settings from these module constants: match the recipe's.
        rvb.BOOK_EPOCHS, rvb.BOOK_BATCH = epochs, train_cfg.batch_size
        print(f"[digits] book ({epochs} epochs) ...", file=sys.stderr, flush=True)
        book = rvb.run_book(dataset_dir, device)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    split = f"{counts['train']}/{counts['val']}/{counts['test']}"
    print(
        f"digits train/val/test={split} device={device} epochs={epochs} "
        f"batch={train_cfg.batch_size} num_workers={train_cfg.num_workers}"
    )
    print(
        f"recipe: test accuracy {recipe['accuracy']:.4f}  train {recipe['train_seconds']:.1f} s"
        f"  (+ evaluate {recipe['evaluate_seconds']:.1f} s)"
    )
    print(f"book  : test accuracy {book['accuracy']:.4f}  train+test {book['seconds']:.1f} s")
    print(
        f"ratio : time recipe/book {recipe['train_seconds'] / book['seconds']:.2f}  "
        f"accuracy recipe-book {recipe['accuracy'] - book['accuracy']:+.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
