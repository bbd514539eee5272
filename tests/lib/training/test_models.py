"""Model factory: every head family, weights sources, freezing and parameter groups.

Models are built on random tensors (timm's tests/test_models.py style); "ImageNet" weights
are stood in for by a real state dict written into a private TORCH_HOME, so the cache path
of the factory is exercised without a network.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from imgclf.errors import ConfigError
from imgclf.training.models import (
    OFFLINE_ENV,
    SimpleCNN,
    backbone_and_head_params,
    create_model,
    freeze_backbone,
    head_name,
    model_names,
    param_groups,
)

pytestmark = pytest.mark.timeout(120)

# One model per head family, with the smallest input each accepts.
HEAD_FAMILIES = [
    ("simple_cnn", 8, "classifier.2"),
    ("resnet18", 32, "fc"),
    ("resnet50", 32, "fc"),
    ("mobilenet_v3_small", 32, "classifier.3"),
    ("efficientnet_b0", 32, "classifier.1"),
    ("densenet121", 32, "classifier"),
    ("squeezenet1_1", 64, "classifier.1"),
    ("googlenet", 32, "fc"),
    ("convnext_tiny", 32, "classifier.2"),
    ("swin_t", 64, "head"),
    ("vit_b_16", 224, "heads.head"),
]


@pytest.mark.parametrize(("name", "size", "head"), HEAD_FAMILIES)
def test_factory_replaces_head(name: str, size: int, head: str) -> None:
    model = create_model(name, 7).eval()
    assert head_name(model) == head
    layer = model.get_submodule(head)
    assert (layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels) == 7
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_every_torchvision_classifier_is_registered() -> None:
    import torchvision

    names = model_names()
    assert "simple_cnn" in names
    assert set(torchvision.models.list_models(module=torchvision.models)) <= set(names)


def test_unknown_model_lists_choices() -> None:
    with pytest.raises(ConfigError, match=r"train.model='resnet19'.*resnet18.*simple_cnn"):
        create_model("resnet19", 3)


def test_in_channels_changes_first_conv() -> None:
    model = create_model("resnet18", 4, in_channels=1).eval()
    assert model.conv1.in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 4)


def _private_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv(OFFLINE_ENV, "1")
    return home


def test_imagenet_without_cache_offline_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = _private_torch_home(tmp_path, monkeypatch)
    with pytest.raises(ConfigError) as info:
        create_model("resnet18", 3, pretrained="imagenet")
    message = str(info.value)
    assert "pretrained=imagenet" in message
    assert str(home / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "train.pretrained=none" in message


def test_imagenet_from_cache_loads_backbone_and_new_head(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision

    home = _private_torch_home(tmp_path, monkeypatch)
    torch.manual_seed(123)
    reference = torchvision.models.resnet18()
    cache = home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cache.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cache)

    model = create_model("resnet18", 5, pretrained="imagenet")
    assert torch.equal(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert model.fc.out_features == 5

    gray = create_model("resnet18", 5, pretrained="imagenet", in_channels=1)
    assert torch.allclose(gray.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))


def test_simple_cnn_has_no_imagenet_weights() -> None:
    with pytest.raises(ConfigError, match="simple_cnn has no ImageNet weights"):
        create_model("simple_cnn", 3, pretrained="imagenet")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_file_keeps_backbone_and_refits_head(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(7)
    source = SimpleCNN(num_classes=3)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save({"state_dict": source.state_dict()}, path)

    same = create_model("simple_cnn", 3, pretrained=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(same.state_dict()[key], value), key

    refit = create_model("simple_cnn", 6, pretrained=str(path))
    assert torch.equal(refit.features[0].weight, source.features[0].weight)
    assert refit.classifier[2].out_features == 6


def test_weights_file_of_another_architecture_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file(create_model("mobilenet_v3_small", 3).state_dict(), str(path))
    with pytest.raises(ConfigError, match=r"other\.safetensors: weights do not fit"):
        create_model("simple_cnn", 3, pretrained=str(path))


def test_missing_weights_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.pretrained="):
        create_model("simple_cnn", 3, pretrained=str(tmp_path / "nope.pt"))


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": SimpleCNN(3).state_dict(), "extra": os.getcwd}, path)
    with pytest.raises(ConfigError, match="not a readable state dict"):
        create_model("simple_cnn", 3, pretrained=str(path))


@pytest.mark.s3
def test_weights_from_s3_uri(tmp_path: Path, s3_env: dict[str, str], s3_uri: str) -> None:
    from imgclf.storage import open_store

    torch.manual_seed(3)
    source = SimpleCNN(num_classes=4)
    local = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(local))
    open_store(s3_uri).upload_file(local, "weights/w.safetensors")

    model = create_model("simple_cnn", 4, pretrained=f"{s3_uri}/weights/w.safetensors")
    assert torch.equal(model.features[3].weight, source.features[3].weight)


def test_freeze_backbone_freezes_only_backbone() -> None:
    model = freeze_backbone(create_model("resnet18", 3))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    backbone, head = backbone_and_head_params(model)
    assert len(head) == 2
    assert len(backbone) == len(list(model.parameters())) - 2


def test_param_groups_have_two_learning_rates() -> None:
    model = create_model("mobilenet_v3_small", 3)
    groups = param_groups(model, lr=1e-2, backbone_lr=1e-4)
    assert [(g["name"], g["lr"]) for g in groups] == [("backbone", 1e-4), ("head", 1e-2)]
    head = model.get_submodule(head_name(model))
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in head.parameters()}
    total = sum(len(g["params"]) for g in groups)
    assert total == len(list(model.parameters()))

    frozen = param_groups(freeze_backbone(model), lr=1e-2, backbone_lr=1e-4)
    assert [g["name"] for g in frozen] == ["head"]
