"""Tests of hmir.harness.zoo: shapes, structure, widths and torch.fx traceability."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from hmir.harness import zoo

# Keyword arguments that make every zoo entry accept (2, 3, 32, 32) inputs, kept small.
_KW: dict[str, dict] = {
    "resnet20": {},
    "resnet26": {},
    "resnet50_cifar": {},
    "vgg11": {"width": 0.25},
    "vgg13": {"width": 0.25, "batch_norm": True},
    "vgg16": {"width": 0.25},
    "vgg19": {"width": 0.25, "batch_norm": True},
    "mnist_cnn": {"in_channels": 3},
    "mlp": {"in_features": 3 * 32 * 32, "hidden": (64, 32), "out_features": 10},
}


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_kw_covers_zoo() -> None:
    assert set(_KW) == set(zoo.ZOO)


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_output_shape(name: str) -> None:
    torch.manual_seed(0)
    model = zoo.build(name, **_KW[name]).eval()
    assert model(_x()).shape == (2, 10)


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_num_outputs(name: str) -> None:
    kw = dict(_KW[name])
    kw["out_features" if name == "mlp" else "num_outputs"] = 7
    assert zoo.build(name, **kw).eval()(_x()).shape == (2, 7)


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_symbolic_trace_matches(name: str) -> None:
    torch.manual_seed(0)
    model = zoo.build(name, **_KW[name]).eval()
    traced = fx.symbolic_trace(model)
    x = _x(1)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))


@pytest.mark.parametrize("name,n", [("resnet20", 3), ("resnet26", 4), ("resnet50_cifar", 8)])
def test_blocks_per_stage(name: str, n: int) -> None:
    model = zoo.build(name)
    for stage in (model.layer1, model.layer2, model.layer3):
        assert isinstance(stage, nn.Sequential)
        assert len(stage) == n
        assert all(isinstance(b, zoo.BasicBlock) for b in stage)


def test_resnet_stage_widths_width2() -> None:
    model = zoo.resnet20(width=2)
    assert model.stem[0].out_channels == 32
    for stage, w in ((model.layer1, 32), (model.layer2, 64), (model.layer3, 128)):
        assert all(b.conv1.out_channels == w and b.conv2.out_channels == w for b in stage)
    assert model.fc.in_features == 128


def test_resnet_shortcuts() -> None:
    model = zoo.resnet20()
    assert len(model.layer1[0].shortcut) == 0
    for stage in (model.layer2, model.layer3):
        first = stage[0]
        assert first.conv1.stride == (2, 2)
        conv, bn = first.shortcut
        assert conv.kernel_size == (1, 1) and conv.stride == (2, 2)
        assert isinstance(bn, nn.BatchNorm2d)
        assert all(len(b.shortcut) == 0 for b in list(stage)[1:])


def test_resnet_trace_has_adds() -> None:
    graph = fx.symbolic_trace(zoo.resnet20()).graph
    adds = [n for n in graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == 9


def test_vgg_widths_and_bn() -> None:
    model = zoo.vgg16(width=0.5, batch_norm=True)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13
    assert [c.out_channels for c in convs[:2]] == [32, 32]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.features) == 13
    assert model.classifier.in_features == 256
    assert not any(isinstance(m, nn.BatchNorm2d) for m in zoo.vgg11().modules())


@pytest.mark.parametrize("depth,convs", [(11, 8), (13, 10), (16, 13), (19, 16)])
def test_vgg_depths(depth: int, convs: int) -> None:
    model = zoo.vgg(depth, width=0.125)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == convs
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5


def test_vgg_bad_depth() -> None:
    with pytest.raises(ValueError, match="11, 13, 16, 19"):
        zoo.vgg(12)


def test_build_bad_name() -> None:
    with pytest.raises(ValueError, match="resnet20"):
        zoo.build("resnet21")


def test_mnist_cnn_single_channel() -> None:
    model = zoo.mnist_cnn(width=2, num_outputs=32).eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 32)
    assert model.fc.in_features == 128
