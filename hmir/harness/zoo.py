"""The model zoo shared by hmir's tests, examples and benchmarks.

Every model is a plain ``nn.Module`` built from standard layers, with residual adds
written as ``+``, so ``torch.fx.symbolic_trace`` traces each of them as is.

Example::

    >>> import torch
    >>> from hmir.harness.zoo import build
    >>> build("resnet20", width=2)(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
import torch.nn as nn


def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    """A bias-free conv followed by its BatchNorm, as a list of modules."""
    pad = kernel // 2
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=pad, bias=False)
    return [conv, nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus a shortcut, then ReLU.

    The shortcut is a 1×1 conv + BN when the stride or width changes; otherwise it is
    an empty ``nn.Sequential`` (the identity, which traces to no graph node).

    Example::

        >>> BasicBlock(16, 32, stride=2)(torch.randn(1, 16, 8, 8)).shape
        torch.Size([1, 32, 4, 4])
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, 3, stride)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = _conv_bn(cout, cout, 3, 1)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(*_conv_bn(cin, cout, 1, stride))
        else:
            self.shortcut = nn.Sequential()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of ZipIt / "Training-free Heterogeneous Model Merging".

    Example::

        >>> CifarResNet((1, 1, 1))(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """

    def __init__(self, blocks: tuple[int, int, int], width: int = 1,
                 in_channels: int = 3, num_outputs: int = 10, base: int = 16) -> None:
        super().__init__()
        if len(blocks) != 3 or min(blocks) < 1:
            raise ValueError(f"blocks must be three positive counts, got {blocks!r}")
        if width < 1 or base < 1:
            raise ValueError(f"width and base must be >= 1, got width={width!r}, base={base!r}")
        w16, w32, w64 = base * width, 2 * base * width, 4 * base * width
        self.stem = nn.Sequential(*_conv_bn(in_channels, w16), nn.ReLU())
        self.layer1 = self._stage(w16, w16, blocks[0], stride=1)
        self.layer2 = self._stage(w16, w32, blocks[1], stride=2)
        self.layer3 = self._stage(w32, w64, blocks[2], stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(w64, num_outputs)

    @staticmethod
    def _stage(cin: int, cout: int, n: int, stride: int) -> nn.Sequential:
        first = BasicBlock(cin, cout, stride)
        return nn.Sequential(first, *(BasicBlock(cout, cout) for _ in range(n - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.flatten(self.pool(x)))


def cifar_resnet(blocks: tuple[int, int, int], width: int = 1, in_channels: int = 3,
                 num_outputs: int = 10, base: int = 16) -> nn.Module:
    """A CIFAR-style ResNet with ``blocks`` BasicBlocks per stage and widths 16w/32w/64w.

    ``base`` (default 16) scales all three stages: widths ``base·w``, ``2·base·w``, ``4·base·w``.

    Example::

        >>> m = cifar_resnet((2, 2, 2), width=2)
        >>> m.fc.in_features
        128
    """
    return CifarResNet(tuple(blocks), width, in_channels, num_outputs, base)


def resnet20(width: int = 1, **kw) -> nn.Module:
    """ResNet-20 for 32×32 inputs: three stages of 3 BasicBlocks.

    Example::

        >>> len(resnet20().layer1)
        3
    """
    return cifar_resnet((3, 3, 3), width=width, **kw)


def resnet26(width: int = 1, **kw) -> nn.Module:
    """ResNet-26 for 32×32 inputs: three stages of 4 BasicBlocks.

    Example::

        >>> len(resnet26().layer2)
        4
    """
    return cifar_resnet((4, 4, 4), width=width, **kw)


def resnet50_cifar(width: int = 1, **kw) -> nn.Module:
    """The paper's CIFAR "ResNet-50": three stages of 8 BasicBlocks (not torchvision's).

    Example::

        >>> len(resnet50_cifar().layer3)
        8
    """
    return cifar_resnet((8, 8, 8), width=width, **kw)


_VGG_CFGS: dict[int, list] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
         512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
         512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """CIFAR-style VGG: ``features`` → ``flatten`` → ``classifier`` (one Linear).

    Example::

        >>> VGG([8, "M"], in_channels=3, num_outputs=2, spatial=16)(
        ...     torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 2])
    """

    def __init__(self, cfg: list, in_channels: int = 3, num_outputs: int = 10,
                 batch_norm: bool = False, spatial: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for c in cfg:
            if c == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers.append(nn.Conv2d(cin, c, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c))
            layers.append(nn.ReLU())
            cin = c
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(cin * spatial * spatial, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


def vgg(depth: int, width: float = 1.0, batch_norm: bool = False, in_channels: int = 3,
        num_outputs: int = 10) -> nn.Module:
    """CIFAR-style VGG-``depth`` (11/13/16/19) with channels scaled by ``width``.

    Example::

        >>> vgg(11, width=0.25).classifier.in_features
        128
    """
    if depth not in _VGG_CFGS:
        raise ValueError(f"vgg depth must be one of {sorted(_VGG_CFGS)}, got {depth!r}")
    if width <= 0:
        raise ValueError(f"width must be positive, got {width!r}")
    cfg = [c if c == "M" else max(1, int(c * width)) for c in _VGG_CFGS[depth]]
    return VGG(cfg, in_channels, num_outputs, batch_norm)


def vgg11(**kw) -> nn.Module:
    """VGG-11 (cfg A). Example: ``vgg11(width=0.5, batch_norm=True)``."""
    return vgg(11, **kw)


def vgg13(**kw) -> nn.Module:
    """VGG-13 (cfg B). Example: ``vgg13(width=0.5)``."""
    return vgg(13, **kw)


def vgg16(**kw) -> nn.Module:
    """VGG-16 (cfg D). Example: ``vgg16(width=0.5)``."""
    return vgg(16, **kw)


def vgg19(**kw) -> nn.Module:
    """VGG-19 (cfg E). Example: ``vgg19(width=0.5)``."""
    return vgg(19, **kw)


def mnist_cnn(width: int = 1, num_outputs: int = 10, in_channels: int = 1) -> nn.Module:
    """A small, fast three-conv CNN for 32×32 single-channel inputs.

    Example::

        >>> mnist_cnn(num_outputs=32)(torch.randn(2, 1, 32, 32)).shape
        torch.Size([2, 32])
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width!r}")
    w16, w32, w64 = 16 * width, 32 * width, 64 * width
    layers = OrderedDict([
        ("conv1", nn.Conv2d(in_channels, w16, 3, padding=1, bias=False)),
        ("bn1", nn.BatchNorm2d(w16)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(w16, w32, 3, padding=1, bias=False)),
        ("bn2", nn.BatchNorm2d(w32)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
        ("conv3", nn.Conv2d(w32, w64, 3, padding=1, bias=False)),
        ("bn3", nn.BatchNorm2d(w64)), ("relu3", nn.ReLU()),
        ("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
        ("fc", nn.Linear(w64, num_outputs)),
    ])
    return nn.Sequential(layers)


def mlp(in_features: int, hidden: tuple[int, ...], out_features: int) -> nn.Module:
    """Flatten, then Linear/ReLU layers of the ``hidden`` widths, then a last Linear.

    Example::

        >>> mlp(784, (64, 32), 10)(torch.randn(3, 1, 28, 28)).shape
        torch.Size([3, 10])
    """
    layers: list[nn.Module] = [nn.Flatten()]
    widths = [in_features, *hidden]
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], out_features))
    return nn.Sequential(*layers)


ZOO: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet26": resnet26,
    "resnet50_cifar": resnet50_cifar,
    "vgg11": vgg11,
    "vgg13": vgg13,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "mnist_cnn": mnist_cnn,
    "mlp": mlp,
}


def build(name: str, **kw) -> nn.Module:
    """Build the zoo model ``name`` with keyword arguments ``kw``.

    Example::

        >>> build("vgg11", width=0.25, num_outputs=5).classifier.out_features
        5
    """
    if name not in ZOO:
        raise ValueError(f"unknown zoo model {name!r}; valid names: {sorted(ZOO)}")
    return ZOO[name](**kw)
