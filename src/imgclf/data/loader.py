"""A torch Dataset over a dataset dir's ``manifest.csv`` (the ingest -> train contract).

Reading the manifest instead of walking ``images/`` means training sees exactly the files
that validation checked: rows whose image failed to decode (``error`` set) are skipped, and
label indices follow the sorted ``classes`` of ``dataset.json``, so a class missing from one
split does not shift every other label.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from imgclf.contracts import MANIFEST_FILE, SPLITS, read_dataset_info, read_manifest
from imgclf.errors import DataError


class ManifestDataset(Dataset):
    """Images of one split, as ``(transform(image), label_index)`` pairs.

    ``classes`` and ``class_to_idx`` mirror torchvision's ImageFolder, so code written
    against the book's ImageFolder examples works unchanged.
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike[str],
        split: str,
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        self.root = Path(dataset_dir)
        self.split = split
        self.transform = transform
        self.classes: list[str] = list(read_dataset_info(self.root)["classes"])
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples = self._read_manifest()
        self.targets = [label for _, label in self.samples]

    def _read_manifest(self) -> list[tuple[Path, int]]:
        samples = []
        for line, row in enumerate(read_manifest(self.root), start=2):
            if row["split"] != self.split or (row.get("error") or "").strip():
                continue
            if row["label"] not in self.class_to_idx:
                raise DataError(
                    f"{self.root / MANIFEST_FILE}:{line}: label {row['label']!r} "
                    "is not in dataset.json classes"
                )
            samples.append((self.root / row["path"], self.class_to_idx[row["label"]]))
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                image.load()
                sample = self.transform(image) if self.transform else image.copy()
        except OSError as exc:
            raise DataError(f"{path}: cannot read image listed in {MANIFEST_FILE}: {exc}") from None
        return sample, label


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader whose shuffle order depends only on ``seed`` (reproducible runs).

    Workers stay alive between epochs (``persistent_workers``) because re-forking them each
    epoch costs more than a small epoch itself.
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=generator,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
    )
