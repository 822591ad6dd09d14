"""Architectures by name, sized from a dataset's :class:`~sofim_tune.data.DatasetInfo`.

Built-in: ``mlp``, ``cnn``, CIFAR-style ``resnet18`` / ``resnet34`` (He et al. 2016 with a
3×3 stride-1 stem and no max-pool, as is usual for 32×32 images) and ``wrn-16-4``
(Zagoruyko & Komodakis 2016). Any torchvision classification model is available as
``tv:<name>``, randomly initialised. Seeding is the caller's job: call
``torch.manual_seed`` before :func:`build_model` for a reproducible initialisation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from sofim_tune.data import DatasetInfo
from sofim_tune.errors import UserInputError

_TORCHVISION_PREFIX = "tv:"
_LIST_TORCHVISION = "torchvision.models.list_models(module=torchvision.models)"


def _mlp(info: DatasetInfo) -> nn.Module:
    """Two hidden layers of 256 ReLU units on the flattened image."""
    inputs = info.channels * info.image_size**2
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(inputs, 256),
        nn.ReLU(inplace=True),
        nn.Linear(256, 256),
        nn.ReLU(inplace=True),
        nn.Linear(256, info.num_classes),
    )


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _cnn(info: DatasetInfo) -> nn.Module:
    """Three 3×3 conv-BN-ReLU blocks (32, 64, 128 channels), 2×2 max-pool after the first two.

    Pooling only twice keeps an 8×8 input at 2×2 before the global average pool; the
    global pool makes the head independent of the image size.
    """
    return nn.Sequential(
        *_conv_bn_relu(info.channels, 32),
        nn.MaxPool2d(2),
        *_conv_bn_relu(32, 64),
        nn.MaxPool2d(2),
        *_conv_bn_relu(64, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, info.num_classes),
    )


class _BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 convs with BN, identity or 1×1-conv shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn_relu(cin, cout, stride),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class _ResNet(nn.Module):
    """CIFAR-style ResNet: 3×3 stride-1 stem, four stages of 64..512 channels, global average pool."""

    def __init__(self, blocks: tuple[int, int, int, int], info: DatasetInfo) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(info.channels, 64))
        stages: list[nn.Module] = []
        cin = 64
        for stage, (count, cout) in enumerate(zip(blocks, (64, 128, 256, 512))):
            for i in range(count):
                stages.append(_BasicBlock(cin, cout, stride=2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, info.num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)))


class _WideBlock(nn.Module):
    """Pre-activation wide block: BN-ReLU-conv3×3, BN-ReLU-conv3×3, 1×1-conv shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.pre = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True))
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        )
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = self.pre(x)
        # As in the reference code, a projection shortcut takes the pre-activated input.
        shortcut = x if self.shortcut is None else self.shortcut(activated)
        return self.body(activated) + shortcut


class _WideResNet(nn.Module):
    """WRN-depth-k: 3×3 stem of 16 channels, three groups of 16k, 32k, 64k channels."""

    def __init__(self, depth: int, widen: int, info: DatasetInfo) -> None:
        super().__init__()
        per_group = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        layers: list[nn.Module] = [nn.Conv2d(info.channels, 16, 3, padding=1, bias=False)]
        cin = 16
        for group, cout in enumerate(widths):
            for i in range(per_group):
                layers.append(_WideBlock(cin, cout, stride=2 if group > 0 and i == 0 else 1))
                cin = cout
        layers += [
            nn.BatchNorm2d(cin),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(cin, info.num_classes),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


_BUILTIN: dict[str, Callable[[DatasetInfo], nn.Module]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "resnet18": lambda info: _ResNet((2, 2, 2, 2), info),
    "resnet34": lambda info: _ResNet((3, 4, 6, 3), info),
    "wrn-16-4": lambda info: _WideResNet(16, 4, info),
}


def _torchvision_names() -> list[str]:
    # Imported here, not with the module: importing torchvision loads torch._dynamo (1.6 s),
    # which only tv:NAME architectures need. module=torchvision.models restricts the list to
    # classification models.
    import torchvision.models

    return torchvision.models.list_models(module=torchvision.models)


def arch_names() -> list[str]:
    """Built-in architectures, then every torchvision classification model as ``tv:<name>``."""
    return [*_BUILTIN, *(_TORCHVISION_PREFIX + name for name in _torchvision_names())]


def build_model(arch: str, info: DatasetInfo) -> nn.Module:
    """A freshly initialised model for ``info``'s images and classes.

    Args:
        arch: a name from :func:`arch_names`.
        info: gives input channels, image side (``mlp`` only) and number of classes.

    Returns:
        A module mapping float N×C×H×W batches to N×num_classes logits.

    Raises:
        UserInputError: unknown architecture, one line listing the valid names.
    """
    if arch in _BUILTIN:
        return _BUILTIN[arch](info)
    if arch.startswith(_TORCHVISION_PREFIX):
        return _torchvision_model(arch[len(_TORCHVISION_PREFIX) :], info)
    raise UserInputError(
        f"unknown architecture {arch!r}; choose one of {', '.join(_BUILTIN)}, "
        f"or tv:<name> for a torchvision classification model (names: {_LIST_TORCHVISION})"
    )


def _torchvision_model(name: str, info: DatasetInfo) -> nn.Module:
    """torchvision's ``name`` without weights, its first convolution rebuilt for ``info.channels`` inputs."""
    if name not in _torchvision_names():
        raise UserInputError(f"unknown torchvision classification model {name!r}; list the valid names with {_LIST_TORCHVISION}")
    import torchvision.models  # see _torchvision_names

    model = torchvision.models.get_model(name, weights=None, num_classes=info.num_classes)
    parent, attr, conv = _first_conv(model, name)
    if conv.in_channels != info.channels:
        # The rebuilt layer gets PyTorch's default initialisation, not the model's own scheme.
        replacement = nn.Conv2d(
            info.channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
        )
        setattr(parent, attr, replacement)
    return model


def _first_conv(model: nn.Module, name: str) -> tuple[nn.Module, str, nn.Conv2d]:
    """(parent module, attribute name, layer) of the first ``nn.Conv2d`` in registration order."""
    for qualified, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parent, _, attr = qualified.rpartition(".")
            return model.get_submodule(parent), attr, module
    raise UserInputError(f"torchvision model {name!r} has no Conv2d layer to adapt to other input channels")
