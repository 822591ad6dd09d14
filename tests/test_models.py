"""Every architecture builds for each image shape and gives one logit per class."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sofim_tune.data import DATASETS, DatasetInfo
from sofim_tune.errors import UserInputError
from sofim_tune.models import arch_names, build_model

BUILTIN = ["mlp", "cnn", "resnet18", "resnet34", "wrn-16-4"]
INFOS = {
    "digits": DATASETS["digits"],
    "mnist": DATASETS["mnist"],
    "cifar100": DATASETS["cifar100"],
    "folder64": DatasetInfo("folder", 7, 3, 64, "cnn", augment=True),
}


def forward(arch: str, info: DatasetInfo, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(0)
    model = build_model(arch, info)
    model.train()  # batch statistics: the shape test must not depend on running stats
    return model(torch.randn(batch, info.channels, info.image_size, info.image_size))


def test_arch_names():
    names = arch_names()
    assert names[:5] == BUILTIN
    assert "tv:resnet50" in names and "tv:vit_b_16" in names
    assert not any(name.startswith("tv:") and "raft" in name for name in names)  # classification models only


@pytest.mark.parametrize("arch", BUILTIN)
@pytest.mark.parametrize("dataset", ["digits", "mnist", "cifar100"])
def test_builtin_forward(arch, dataset):
    info = INFOS[dataset]
    out = forward(arch, info)
    assert out.shape == (2, info.num_classes) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_small_models_on_larger_images(arch):
    assert forward(arch, INFOS["folder64"], batch=3).shape == (3, 7)


def test_backward_reaches_every_parameter():
    model = build_model("wrn-16-4", INFOS["cifar100"])
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts():
    cifar10 = DATASETS["cifar10"]
    assert parameters(build_model("resnet18", cifar10)) == 11_173_962  # the usual CIFAR ResNet-18
    assert parameters(build_model("resnet34", cifar10)) == 21_282_122
    assert 2.7e6 < parameters(build_model("wrn-16-4", cifar10)) < 2.8e6  # 2.7M in the WRN paper


def test_same_seed_same_weights():
    torch.manual_seed(3)
    a = build_model("cnn", INFOS["mnist"])
    torch.manual_seed(3)
    b = build_model("cnn", INFOS["mnist"])
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_torchvision_model_with_one_channel():
    info = INFOS["mnist"]
    model = build_model("tv:resnet18", info)
    assert model.conv1.in_channels == 1
    assert (model.conv1.out_channels, model.conv1.kernel_size, model.conv1.stride, model.conv1.padding) == (64, (7, 7), (2, 2), (3, 3))
    assert model.conv1.bias is None
    model.eval()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_torchvision_model_nested_first_conv():
    model = build_model("tv:mobilenet_v3_small", INFOS["mnist"])
    assert model.features[0][0].in_channels == 1
    model.eval()
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 10)


def test_torchvision_model_keeps_three_channels():
    model = build_model("tv:resnet18", INFOS["cifar100"])
    assert model.conv1.in_channels == 3 and model.fc.out_features == 100


def test_unknown_arch_lists_names():
    with pytest.raises(UserInputError) as raised:
        build_model("resnet9000", INFOS["digits"])
    message = str(raised.value)
    assert "\n" not in message and all(name in message for name in BUILTIN)
    assert "tv:<name>" in message and "list_models" in message


def test_unknown_torchvision_model():
    with pytest.raises(UserInputError, match="list_models"):
        build_model("tv:not_a_model", INFOS["digits"])
