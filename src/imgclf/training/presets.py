"""Image transforms as small keyword-only presets, training and evaluation apart.

The split follows torchvision's ``references/classification/presets.py``: training adds a
named augmentation recipe, evaluation only resizes and normalises, so the served model sees
exactly what the evaluation saw. Every image is converted to RGB first: grayscale scans
(digits, X-rays) then fit ImageNet-pretrained stems without a special case.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision.transforms import v2

from imgclf.errors import ConfigError
from imgclf.training.models import IMAGENET_MEAN, IMAGENET_STD


class ConvertMode:
    """Convert a PIL image to ``mode`` (grayscale L becomes three equal RGB channels)."""

    def __init__(self, mode: str = "RGB") -> None:
        self.mode = mode

    def __call__(self, image: Any) -> Any:
        """The image in ``self.mode`` (unchanged when it already is)."""
        return image if image.mode == self.mode else image.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"


def _none(size: tuple[int, int]) -> list[Any]:
    return [v2.Resize(size, antialias=True)]


def _light(size: tuple[int, int]) -> list[Any]:
    # No flips: digits and text are not mirror-symmetric (a flipped 2 is not a 2). Crops,
    # shifts, small rotations and lighting changes keep every class what it is, and a model
    # trained from scratch on a few hundred images needs them not to memorise positions.
    return [
        v2.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.85, 1.15), antialias=True),
        v2.RandomAffine(degrees=12, translate=(0.1, 0.1)),
        v2.ColorJitter(brightness=0.2, contrast=0.2),
    ]


def _strong(size: tuple[int, int]) -> list[Any]:
    return [
        v2.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomAffine(degrees=15, translate=(0.1, 0.1)),
        v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05),
    ]


#: Augmentation recipes by name (``train.augment``); each maps an output size to transforms.
AUGMENTATIONS: dict[str, Callable[[tuple[int, int]], list[Any]]] = {
    "none": _none,
    "light": _light,
    "strong": _strong,
}


def check_augment(name: str) -> None:
    """Refuse an unknown ``train.augment`` (train calls this before any work)."""
    if name not in AUGMENTATIONS:
        raise ConfigError(f"train.augment={name!r} is unknown; choices: {', '.join(AUGMENTATIONS)}")


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    height, width = size
    return (int(height), int(width))


def _to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> list[Any]:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]


class ClassificationPresetTrain:
    """Training transform: RGB, an augmentation recipe, tensor, normalisation."""

    def __init__(
        self,
        *,
        size: int | Sequence[int],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        augment: str = "light",
    ) -> None:
        check_augment(augment)
        self.transforms = v2.Compose(
            [
                ConvertMode("RGB"),
                *AUGMENTATIONS[augment](_hw(size)),
                *_to_normalized_tensor(mean, std),
            ]
        )

    def __call__(self, image: Any) -> torch.Tensor:
        """A normalised ``[3, H, W]`` float tensor."""
        return self.transforms(image)


class ClassificationPresetEval:
    """Evaluation and serving transform: RGB, resize to the training size, normalisation."""

    def __init__(
        self,
        *,
        size: int | Sequence[int],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.transforms = v2.Compose(
            [
                ConvertMode("RGB"),
                v2.Resize(_hw(size), antialias=True),
                *_to_normalized_tensor(mean, std),
            ]
        )

    def __call__(self, image: Any) -> torch.Tensor:
        """A normalised ``[3, H, W]`` float tensor."""
        return self.transforms(image)
