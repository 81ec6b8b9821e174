"""Design properties 2, 5, 6: merge(A, A) = A, permute recovers perm(A), ONNX parity, inputs unchanged."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import (assert_unchanged, randomized, rel_err, slow_except, state_snapshot,
                      torchvision_model)
from hmir import compile_merge
from hmir.harness import zoo
from hmir.frontends import lower
from hmir.harness.permute import permute_state, random_permutation
from test_lowering import GNNet


def _data(shape, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


MODELS = {
    "resnet18": lambda: torchvision_model("resnet18", num_classes=10),
    "vgg11_bn_cifar": lambda: zoo.vgg11(batch_norm=True, width=0.25),
    "resnet20": lambda: zoo.resnet20(),
}
SHAPES = {"resnet18": (8, 3, 64, 64), "vgg11_bn_cifar": (8, 3, 32, 32), "resnet20": (8, 3, 32, 32)}


@pytest.mark.parametrize("method", ["avg", "permute", "zip"])
@pytest.mark.parametrize("name", slow_except(MODELS, "vgg11_bn_cifar", "resnet20"))
def test_merge_with_itself_is_identity(name, method):
    a = randomized(MODELS[name]())
    data = _data(SHAPES[name])
    result = compile_merge(a, copy.deepcopy(a), data, method=method, repair=False, progress=False)
    x = _data(SHAPES[name], 1, seed=5)[0]
    with torch.no_grad():
        assert rel_err(a(x), result.module(x)) <= 1e-5
    free = [s for s in result.report.spaces if not s.fixed]
    if method != "avg":
        assert all(s.similarity > 0.999 for s in free)


@pytest.mark.parametrize("name", slow_except(["resnet18", "vgg11_bn_cifar"], "vgg11_bn_cifar"))
def test_permute_recovers_hidden_permutation(name):
    a = randomized(MODELS[name]())
    data = _data(SHAPES[name])
    ir = lower(a, data[0][:2])
    b = copy.deepcopy(a)
    b.load_state_dict(permute_state(ir, a.state_dict(), random_permutation(ir, seed=3)))
    x = _data(SHAPES[name], 1, seed=5)[0]
    avg = compile_merge(a, b, data, method="avg", repair=False, progress=False).module
    perm = compile_merge(a, b, data, method="permute", repair=False, progress=False).module
    with torch.no_grad():
        assert rel_err(a(x), perm(x)) <= 1e-5
        assert rel_err(a(x), avg(x)) > 1e-2          # plain averaging of perm(A) is not A


def test_group_alignment_recovers_group_permutation():
    a = randomized(GNNet(c=16, groups=4))
    data = _data((16, 3, 8, 8))
    ir = lower(a, data[0][:2])
    b = copy.deepcopy(a)
    b.load_state_dict(permute_state(ir, a.state_dict(), random_permutation(ir, seed=7)))
    result = compile_merge(a, b, data, method="zip", repair=False, progress=False)
    x = _data((4, 3, 8, 8), 1, seed=5)[0]
    with torch.no_grad():
        assert rel_err(a(x), result.module(x)) <= 1e-5
    assert any("group alignment" in n for n in result.report.notes)


def test_inputs_unchanged_and_repair_changes_only_the_merged_model():
    a, b = zoo.resnet20(), zoo.resnet20()
    a.train()                                   # a mixed state: a in train mode, b in eval
    b.eval()
    snaps = state_snapshot(a), state_snapshot(b)
    result = compile_merge(a, b, _data((8, 3, 32, 32)), method="zip", progress=False)
    assert_unchanged(a, snaps[0])
    assert_unchanged(b, snaps[1])
    assert any("repair" in n for n in result.report.notes)
    assert not result.module.training
    bns = [m for m in result.module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.1 and m.num_batches_tracked > 0 for m in bns)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet20"])
def test_onnx_parity_of_merged_model(name, tmp_path):
    a, b = MODELS[name](), randomized(MODELS[name](), seed=1)
    result = compile_merge(a, b, _data(SHAPES[name]), method="zip", progress=False)
    out = result.to_onnx(tmp_path / "merged.onnx")
    assert out.max_abs_diff <= 1e-4 and out.path.exists()


def test_report_lists_spaces_and_timings():
    a, b = zoo.resnet20(), zoo.resnet20()
    result = compile_merge(a, b, _data((8, 3, 32, 32)), method="zip", progress=False)
    text = str(result.report)
    for key in ("lower", "observe", "match", "fuse"):         # the passes that ran, timed
        assert key in result.report.timings
    assert "layer1" in text and "fixed" in text and 0 < result.report.mean_similarity <= 1


def test_depth_hetero_inputs_unchanged():
    """Crossed depths (each model is the shallower one somewhere): both are inflated, and the
    inflated copies share the inputs' parameters, so nothing may write to them."""
    a, b = randomized(zoo.cifar_resnet((2, 3, 1))), randomized(zoo.cifar_resnet((3, 1, 2)), 1)
    a.train()
    b.eval()
    snaps = state_snapshot(a), state_snapshot(b)
    result = compile_merge(a, b, _data((8, 3, 32, 32)), method="zip", progress=False)
    assert_unchanged(a, snaps[0])
    assert_unchanged(b, snaps[1])
    inserted = [n for n in result.report.notes if n.startswith("insert (") and "block" in n]
    assert any("model a" in n for n in inserted) and any("model b" in n for n in inserted)
    shared = {id(p) for p in a.parameters()} & {id(p) for p in result.ir_a.graph_module.parameters()}
    assert shared                                   # the inflated copy really shares them
    assert not shared & {id(p) for p in result.module.parameters()}
