"""Design property 1: permuting every free space of a lowered model leaves it unchanged."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import randomized, rel_err, slow_except, torchvision_model
from hmir.harness import zoo
from hmir.errors import VerificationError
from hmir.frontends import lower
from hmir.ir import Slice
from hmir.harness.permute import permute_state, random_permutation
from hmir.ir.verify import verify


def assert_permutation_invariant(model: nn.Module, x: torch.Tensor, seed: int = 1):
    model = randomized(model)
    ir = lower(model, x[:2], type(model).__name__)
    perms = random_permutation(ir, seed)
    assert perms, "no free space found"
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(permute_state(ir, model.state_dict(), perms))
    changed = [k for k, v in permuted.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert changed, "the permutation changed no parameter"
    with torch.no_grad():
        assert rel_err(model(x), permuted(x)) <= 1e-5
    return ir


TORCHVISION = ["resnet18", "resnet50", "wide_resnet50_2", "vgg11_bn", "vgg16", "mobilenet_v2",
               "densenet121", "resnext50_32x4d", "efficientnet_b0"]


@pytest.mark.parametrize("name", slow_except(TORCHVISION, "resnet18", "mobilenet_v2"))
def test_torchvision_permutation_invariance(name):
    ir = assert_permutation_invariant(torchvision_model(name, num_classes=10),
                                      torch.randn(3, 3, 64, 64))
    assert [s.fixed for s in ir.spaces].count(True) == 2      # input channels and logits


ZOO = [("resnet20", {}), ("resnet26", {"width": 2}), ("resnet50_cifar", {}), ("vgg11", {}),
       ("vgg13", {"batch_norm": True}), ("vgg16", {"width": 0.5}), ("vgg19", {"batch_norm": True}),
       ("mnist_cnn", {"in_channels": 3}), ]


@pytest.mark.parametrize("name,kw", slow_except(ZOO, "resnet20", "resnet26", "vgg11", "vgg13", "vgg16", "vgg19",
                                              "mnist_cnn"))
def test_zoo_permutation_invariance(name, kw):
    assert_permutation_invariant(zoo.build(name, **kw), torch.randn(3, 3, 32, 32))


def test_cifar_resnet_spaces():
    """ResNet-20: one residual space per stage, two block-internal spaces per... one per block."""
    ir = lower(zoo.resnet20(), torch.randn(2, 3, 32, 32))
    residual = [s for s in ir.spaces if s.joins]
    assert len(residual) == 3 and [s.n for s in residual] == [16, 32, 64]
    assert len(ir.free_spaces) == 3 + 9


@pytest.mark.slow
def test_flatten_stride_and_concat():
    """vgg16's classifier reads 512 channels × 49 positions; densenet composes concat spaces."""
    ir = lower(torchvision_model("vgg16", num_classes=10), torch.randn(2, 3, 64, 64))
    fc_in = [sl for s in ir.spaces for sl in s.slices if sl.param == "classifier.0.weight" and sl.role == "in"]
    assert len(fc_in) == 1 and fc_in[0].inner == 49 and ir.space(fc_in[0].space).n == 512
    ir = lower(torchvision_model("densenet121", num_classes=10), torch.randn(2, 3, 64, 64))
    conv = [sl for s in ir.spaces for sl in s.slices if sl.param == "features.denseblock1.denselayer3.conv1.weight" and sl.role == "in"]
    assert [sl.offset for sl in sorted(conv, key=lambda s: s.offset)] == [0, 64, 96]


class GNNet(nn.Module):
    def __init__(self, c=16, groups=4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.gn1 = nn.GroupNorm(groups, c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=groups)
        self.gn2 = nn.GroupNorm(groups, c)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        x = torch.relu(self.gn1(self.conv1(x)))
        x = torch.relu(self.gn2(self.conv2(x))) + x
        return self.fc(x.mean((2, 3)))


def test_group_structure_and_invariance():
    ir = assert_permutation_invariant(GNNet(), torch.randn(3, 3, 8, 8))
    grouped = [s for s in ir.free_spaces if s.group_size > 1]
    assert grouped and all(s.groups == 4 for s in grouped)


def test_verifier_rejects_broken_ir():
    ir = lower(zoo.resnet20(), torch.randn(2, 3, 32, 32))
    verify(ir)
    s = ir.free_spaces[1]
    s.slices.pop(0)
    with pytest.raises(VerificationError, match="covered 0 times|no space.s slice covers"):
        verify(ir)
    s.slices.append(Slice("fc.weight", 1, s.id, "in"))
    with pytest.raises(VerificationError):
        verify(ir)


def test_printer_names_spaces_and_slices():
    ir = lower(zoo.resnet20(), torch.randn(2, 3, 32, 32))
    text = str(ir)
    assert "FIXED (model input)" in text and "FIXED (model output)" in text
    assert "fc.weight[1]" in text and "joins" in text


class MixedOps(nn.Module):
    """Conv1d, BatchNorm1d, view-flatten, LayerNorm, functional activations, SE-style gating."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.dw = nn.Conv1d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm1d(8)
        self.se = nn.Linear(8, 8)
        self.fc1 = nn.Linear(8 * 6, 32)
        self.ln = nn.LayerNorm(32)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(32, 32)
        self.bn2 = nn.BatchNorm1d(32)
        self.out = nn.Linear(32, 3)

    def forward(self, x):
        h = F.gelu(self.bn(self.dw(torch.relu(self.conv(x)))))
        gate = torch.sigmoid(self.se(h.mean(2)))
        h = h * gate.view(h.size(0), 8, 1)
        h = h.view(h.size(0), -1)
        h = self.drop(self.ln(self.fc1(h)))
        h = F.silu(self.bn2(self.fc2(h))) + h
        return self.out(h)


def test_mixed_ops_permutation_invariance():
    ir = assert_permutation_invariant(MixedOps(), torch.randn(5, 4, 6))
    fc1_in = [sl for s in ir.spaces for sl in s.slices if sl.param == "fc1.weight" and sl.role == "in"]
    assert fc1_in[0].inner == 6
    joined = [s for s in ir.spaces if "ln.weight" in {sl.param for sl in s.slices}]
    assert joined and "bn2.weight" in {sl.param for sl in joined[0].slices}


def test_mlp_permutation_invariance():
    assert_permutation_invariant(zoo.mlp(12, (16, 16), 3), torch.randn(4, 12))
