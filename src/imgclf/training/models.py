"""Model factory: torchvision classifiers (transfer learning) and the book's small CNN.

Every architecture comes out of one ``create_model(name, num_classes, pretrained=...)`` call
(STYLE rule 5): the name is looked up in a registry of factories (the small CNN plus every
classification model torchvision ships), the classification head is replaced to fit
``num_classes``, and the requested weights are loaded. Asking for pretrained weights that
cannot be found is an error, never a silent random init: a model trained from scratch by
accident looks like a working run with a worse score.

The head is found the same way for every torchvision family (``fc``, ``classifier[-1]``,
``heads.head``, ``head``, squeezenet's 1x1 conv), so differential learning rates and
``freeze_backbone`` work on any of them without per-model code.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.error import URLError

import torch
from torch import nn

from imgclf.contracts import MODEL_FILE, WEIGHTS_FILE
from imgclf.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Set to 1 on air-gapped clusters: a missing ImageNet cache then fails at once instead of
#: after a network timeout.
OFFLINE_ENV = "IMGCLF_OFFLINE"

# Attributes that hold the classification head in torchvision models, in lookup order.
_HEAD_ATTRS = ("fc", "classifier", "heads", "head")

# Builder arguments some torchvision models need to be trained by a plain loop: their
# auxiliary classifiers change the training output into a tuple.
_ARCH_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": False},
    "inception_v3": {"aux_logits": False, "init_weights": False},
}
# Extra arguments torchvision itself sets when building these models with ImageNet weights.
_PRETRAINED_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"transform_input": True},
    "inception_v3": {"transform_input": True},
}
# State-dict prefixes that the aux-free models above legitimately do not have.
_OPTIONAL_PREFIXES = ("AuxLogits.", "aux1.", "aux2.")


class SimpleCNN(nn.Module):
    """The book's first CNN (chapters 2-3), resized for small images.

    Conv-ReLU-MaxPool blocks learn local features, an adaptive average pool makes the
    classifier independent of the input size, dropout regularises the single linear layer.
    ``ceil_mode`` pooling keeps 8x8 inputs from shrinking to nothing after three blocks.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        widths: Iterable[int] = (32, 64, 128),
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=2, ceil_mode=True),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``[batch, num_classes]``."""
        return self.classifier(self.avgpool(self.features(x)))


def _simple_cnn(num_classes: int, in_channels: int, pretrained: str) -> nn.Module:
    if pretrained == "imagenet":
        raise ConfigError(
            "train.pretrained=imagenet: simple_cnn has no ImageNet weights; "
            "use a torchvision model (e.g. resnet18) or train.pretrained=none"
        )
    return SimpleCNN(num_classes, in_channels=in_channels)


def _torchvision_factory(name: str) -> Callable[[int, int, str], nn.Module]:
    def build(num_classes: int, in_channels: int, pretrained: str) -> nn.Module:
        import torchvision

        kwargs = dict(_ARCH_KWARGS.get(name, {}))
        if pretrained == "imagenet":
            kwargs.update(_PRETRAINED_KWARGS.get(name, {}))
            model = torchvision.models.get_model(name, weights=None, **kwargs)
            _load_state(model, _imagenet_state(name), f"ImageNet weights of {name}")
        else:
            model = torchvision.models.get_model(name, weights=None, **kwargs)
        replace_head(model, num_classes)
        if in_channels != 3:
            _adapt_input_channels(model, in_channels)
        return model

    return build


def _build_registry() -> dict[str, Callable[[int, int, str], nn.Module]]:
    import torchvision

    registry: dict[str, Callable[[int, int, str], nn.Module]] = {"simple_cnn": _simple_cnn}
    for name in torchvision.models.list_models(module=torchvision.models):
        registry[name] = _torchvision_factory(name)
    return registry


_REGISTRY: dict[str, Callable[[int, int, str], nn.Module]] | None = None


def model_names() -> list[str]:
    """Every name ``create_model`` accepts (``simple_cnn`` and torchvision classifiers)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = _build_registry()
    return sorted(_REGISTRY)


def check_model_name(name: str) -> None:
    """Refuse an unknown ``train.model`` (train calls this before any work)."""
    names = model_names()
    if name not in names:
        raise ConfigError(f"train.model={name!r} is not a known model; choices: {', '.join(names)}")


def create_model(
    name: str, num_classes: int, *, pretrained: str = "none", in_channels: int = 3
) -> nn.Module:
    """Build ``name`` with a fresh ``num_classes`` head and the requested weights.

    ``pretrained`` is ``none`` (random init), ``imagenet`` (torchvision's default weights,
    from the torch hub cache or downloaded once), a local weights file (safetensors, or a
    state dict loaded with ``weights_only=True``), or an ``s3://`` URI of such a file. A
    file's head is dropped when its shape does not fit ``num_classes``; any other mismatch
    is a ConfigError naming the file.
    """
    check_model_name(name)
    assert _REGISTRY is not None
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    source = pretrained.strip() or "none"
    arch_weights = source if source in ("none", "imagenet") else "none"
    model = _REGISTRY[name](num_classes, in_channels, arch_weights)
    if source not in ("none", "imagenet"):
        state, origin = _read_weights(source)
        _load_state(model, state, origin, allow_head_mismatch=True)
    return model


def _imagenet_state(name: str) -> dict[str, torch.Tensor]:
    """torchvision's default weights for ``name`` from the hub cache, downloading if allowed."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        raise ConfigError(
            f"train.pretrained=imagenet: torchvision has no weights for {name}"
        ) from None
    url = weights.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    hint = (
        f"train.pretrained=imagenet needs {url} cached at {cached}; download it once "
        "(or set TORCH_HOME to a dir holding hub/checkpoints) or set train.pretrained=none "
        "or a weights file"
    )
    if not cached.is_file() and os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise ConfigError(f"{hint} ({OFFLINE_ENV} is set, not downloading)")
    try:
        return torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except (URLError, OSError, TimeoutError) as exc:
        raise ConfigError(f"{hint} (download failed: {exc})") from None
    except RuntimeError as exc:  # hash mismatch of a partial or corrupted download
        raise ConfigError(f"{hint} ({exc})") from None


def _read_weights(source: str) -> tuple[Mapping[str, torch.Tensor], str]:
    """Load a state dict from a local file or an s3:// object (copied to a temp file)."""
    if source.startswith("s3://"):
        from imgclf.storage import open_store

        parent, _, key = source.rpartition("/")
        with tempfile.TemporaryDirectory(prefix="imgclf-weights-") as tmp:
            local = Path(tmp) / key
            try:
                open_store(parent).download_file(key, local)
            except Exception as exc:
                raise ConfigError(f"train.pretrained={source}: cannot download: {exc}") from None
            return _load_weights_file(local, source), source
    path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"train.pretrained={source!r}: not 'none', 'imagenet', an s3:// URI or an existing "
            "weights file"
        )
    return _load_weights_file(path, str(path)), str(path)


def _load_weights_file(path: Path, origin: str) -> Mapping[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"train.pretrained={origin}: not a readable state dict: {exc}") from None
    # Common checkpoint wrappers: {"state_dict": ...} or {"model": ...}.
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ConfigError(f"train.pretrained={origin}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_state(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    origin: str,
    *,
    allow_head_mismatch: bool = False,
) -> None:
    """Load ``state`` into ``model``; only the head (when allowed) may be left out."""
    own = model.state_dict()
    head_prefix = head_name(model) + "." if allow_head_mismatch else None
    usable: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for key, value in state.items():
        if key not in own:
            if not key.startswith(_OPTIONAL_PREFIXES) and not (
                head_prefix and key.startswith(head_prefix)
            ):
                problems.append(f"unexpected {key}")
        elif own[key].shape != value.shape:
            if not (head_prefix and key.startswith(head_prefix)):
                problems.append(f"{key} {tuple(value.shape)} != {tuple(own[key].shape)}")
        else:
            usable[key] = value
    missing = [
        k for k in own if k not in usable and not (head_prefix and k.startswith(head_prefix))
    ]
    problems += [f"missing {k}" for k in missing]
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; ... {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        raise ConfigError(f"{origin}: weights do not fit {type(model).__name__}: {shown}")
    model.load_state_dict(usable, strict=False)
    if head_prefix and any(k.startswith(head_prefix) for k in own if k not in usable):
        log.info("%s: head %s re-initialised for the new classes", origin, head_prefix[:-1])


def head_name(model: nn.Module) -> str:
    """Qualified name of the final classification layer (a Linear or squeezenet's 1x1 conv)."""
    for attr in _HEAD_ATTRS:
        container = getattr(model, attr, None)
        if not isinstance(container, nn.Module):
            continue
        if isinstance(container, nn.Linear | nn.Conv2d):
            return attr
        last = None
        for sub_name, sub in container.named_modules():
            if isinstance(sub, nn.Linear | nn.Conv2d):
                last = sub_name
        if last is not None:
            return f"{attr}.{last}"
    raise ConfigError(
        f"{type(model).__name__}: no classification head found under {', '.join(_HEAD_ATTRS)}"
    )


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Swap the final layer for a freshly initialised one with ``num_classes`` outputs."""
    name = head_name(model)
    old = model.get_submodule(name)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        assert isinstance(old, nn.Conv2d)
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size)
    _set_submodule(model, name, new)
    return new


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _adapt_input_channels(model: nn.Module, in_channels: int) -> None:
    """Rebuild the first conv for ``in_channels``; RGB filters are folded to keep pretraining."""
    name, conv = next(
        ((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), (None, None)
    )
    if name is None or conv is None:
        raise ConfigError(f"{type(model).__name__}: no Conv2d to adapt to {in_channels} channels")
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        summed = conv.weight.sum(dim=1, keepdim=True)
        new.weight.copy_(summed.repeat(1, in_channels, 1, 1) / in_channels)
        if conv.bias is not None and new.bias is not None:
            new.bias.copy_(conv.bias)
    _set_submodule(model, name, new)


def backbone_and_head_params(
    model: nn.Module,
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """All parameters split into (backbone, head), for differential learning rates."""
    prefix = head_name(model) + "."
    backbone, head = [], []
    for name, param in model.named_parameters():
        (head if name.startswith(prefix) else backbone).append(param)
    return backbone, head


def param_groups(model: nn.Module, *, lr: float, backbone_lr: float) -> list[dict[str, Any]]:
    """Optimizer groups: trainable backbone params at ``backbone_lr``, head params at ``lr``.

    The head comes last so ``optimizer.param_groups[-1]["lr"]`` is the head's rate. Frozen
    parameters are left out, and an empty backbone group (frozen backbone) is dropped.
    """
    backbone, head = backbone_and_head_params(model)
    groups = [
        {"params": [p for p in backbone if p.requires_grad], "lr": backbone_lr, "name": "backbone"},
        {"params": [p for p in head if p.requires_grad], "lr": lr, "name": "head"},
    ]
    return [g for g in groups if g["params"]]


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Turn the backbone's gradients off (head-only epochs) or on again; the head always
    trains. Its parameters stay in the optimizer: frozen ones simply get no gradient."""
    backbone, head = backbone_and_head_params(model)
    for param in backbone:
        param.requires_grad_(trainable)
    for param in head:
        param.requires_grad_(True)


def freeze_backbone(model: nn.Module) -> nn.Module:
    """Stop gradients for everything but the head (the book's feature-extraction setting)."""
    set_backbone_trainable(model, False)
    return model


def load_model_dir(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained model from a model dir (``model.json`` + ``model.safetensors``)."""
    from safetensors.torch import load_file

    from imgclf.fsutil import read_json

    root = Path(path)
    meta_path, weights_path = root / MODEL_FILE, root / WEIGHTS_FILE
    for required in (meta_path, weights_path):
        if not required.is_file():
            raise DataError(f"{required}: missing; {root} is not a model dir written by train")
    meta = read_json(meta_path)
    try:
        channels = int(meta["input_size"][0])
        model = create_model(meta["architecture"], int(meta["num_classes"]), in_channels=channels)
    except (KeyError, TypeError, IndexError) as exc:
        raise DataError(f"{meta_path}: missing or bad field {exc}") from None
    try:
        model.load_state_dict(load_file(str(weights_path), device="cpu"))
    except RuntimeError as exc:
        raise DataError(f"{weights_path}: does not match {meta['architecture']}: {exc}") from None
    return model.eval(), meta
