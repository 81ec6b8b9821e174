"""Depth-heterogeneous merging (issue 3): stages, exact inflation, merges of real pairs, errors."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from conftest import randomized, rel_err, slow_except, torchvision_model
from hmir import compile_merge, depth_plan, inflate
from hmir.harness import zoo
from hmir.errors import IncompatibleModelsError
from hmir.frontends import lower
from hmir.ir.units import find_stages
from test_lowering import assert_permutation_invariant


def _data(shape, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _inflated_matches(a, b, shape, side="a"):
    """Inflate the shallower side; return (rel. error on fresh input, Inflation)."""
    data = _data(shape)
    plan = depth_plan(a, b, data, progress=False)
    model = a if side == "a" else b
    infl = inflate(model, plan, side, data[0])
    x = _data(shape, 1, seed=9)[0]
    with torch.no_grad():
        return rel_err(model(x), infl.module(x)), infl


def test_stages_of_cifar_resnets_and_vggs():
    st = find_stages(lower(zoo.resnet26(), torch.randn(2, 3, 32, 32)))
    assert [(s.kind, len(s.pieces)) for s in st[:3]] == [("residual", 5), ("residual", 4), ("residual", 4)]
    st = find_stages(lower(zoo.vgg19(width=0.25), torch.randn(2, 3, 32, 32)))
    assert [len(s.pieces) for s in st if s.kind == "plain"] == [2, 2, 4, 4, 5]


def test_zero_block_inflation_is_exact():
    err, infl = _inflated_matches(randomized(zoo.resnet20()), randomized(zoo.resnet26(), 1), (8, 3, 32, 32))
    assert err <= 1e-5 and infl.deviation <= 1e-5
    assert len(infl.inserted) == 3 and infl.zero_params            # one zero block per stage
    assert len(find_stages(lower(infl.module, torch.randn(2, 3, 32, 32)))[0].pieces) == 5


@pytest.mark.parametrize("bn", [False, True], ids=["relu", "bn-relu"])
def test_identity_layer_inflation_is_exact(bn):
    a = randomized(zoo.vgg13(width=0.25, batch_norm=bn))
    b = randomized(zoo.vgg19(width=0.25, batch_norm=bn), 1)
    err, infl = _inflated_matches(a, b, (8, 3, 32, 32))
    assert err <= 1e-5 and not infl.zero_params
    assert sum(int(s.split(":")[1].split()[0]) for s in infl.inserted) == 6   # 19 - 13 layers


def _tanh_mlp(hidden: int) -> nn.Module:
    layers = [nn.Linear(8, 16), nn.Tanh()]
    for _ in range(hidden):
        layers += [nn.Linear(16, 16), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(16, 4))


def test_non_idempotent_activation_reports_its_deviation():
    torch.manual_seed(0)
    a, b = _tanh_mlp(1), _tanh_mlp(3)
    err, infl = _inflated_matches(a, b, (16, 8))
    assert infl.deviation > 1e-3 and err > 1e-3              # tanh(tanh(x)) != tanh(x): measured
    result = compile_merge(a, b, _data((16, 8)), progress=False)
    note = [n for n in result.report.notes if "deviates" in n]
    assert note and float(note[0].split("by ")[1].split()[0]) > 1e-3


def test_merge_with_own_inflation_reproduces_a():
    """merge(A, inflate(A)) = A: LMA finds where the zero blocks sit (their CKA ties are exact)."""
    a = randomized(zoo.resnet20())
    b_deep = zoo.resnet26()
    data = _data((16, 3, 32, 32), 3)
    plan = depth_plan(a, b_deep, data, progress=False)
    a_deep = inflate(a, plan, "a", data[0]).module
    result = compile_merge(a, a_deep, data, method="zip", depth="lma", repair=False, progress=False)
    x = _data((4, 3, 32, 32), 1, seed=5)[0]
    with torch.no_grad():
        assert rel_err(a(x), result.module(x)) <= 1e-5


PAIRS = {
    "resnet20+resnet26": (lambda: zoo.resnet20(), lambda: zoo.resnet26(), (8, 3, 32, 32)),
    "resnet26+resnet50": (lambda: zoo.resnet26(), lambda: zoo.resnet50_cifar(), (8, 3, 32, 32)),
    "resnet50+resnet20": (lambda: zoo.resnet50_cifar(), lambda: zoo.resnet20(), (8, 3, 32, 32)),
    "vgg13+vgg19": (lambda: zoo.vgg13(width=0.25), lambda: zoo.vgg19(width=0.25), (8, 3, 32, 32)),
    "tv_resnet18+resnet34": (lambda: torchvision_model("resnet18", num_classes=10),
                             lambda: torchvision_model("resnet34", num_classes=10), (4, 3, 64, 64)),
    "tv_vgg11_bn+vgg16_bn": (lambda: torchvision_model("vgg11_bn", num_classes=10),
                             lambda: torchvision_model("vgg16_bn", num_classes=10), (4, 3, 32, 32)),
    "crossed_depths": (lambda: zoo.cifar_resnet((2, 4, 2)), lambda: zoo.cifar_resnet((4, 2, 3)),
                       (8, 3, 32, 32)),
}


@pytest.mark.parametrize("name", slow_except(PAIRS, "vgg13+vgg19"))
def test_depth_hetero_pairs_merge_run_and_export(name, tmp_path):
    make_a, make_b, shape = PAIRS[name]
    a, b = randomized(make_a()), randomized(make_b(), 1)
    snaps = copy.deepcopy(a.state_dict()), copy.deepcopy(b.state_dict())
    result = compile_merge(a, b, _data(shape), method="zip", depth="lma", progress=False)
    assert any(n.startswith("depth:") for n in result.report.notes)
    assert any("inflated model deviates" in n for n in result.report.notes)
    x = _data(shape, 1, seed=3)[0][:2]
    assert result.module(x).shape == a(x).shape
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in snaps[0].items())
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in snaps[1].items())
    assert_permutation_invariant(result.module, x)
    assert result.to_onnx(tmp_path / "merged.onnx").max_abs_diff <= 1e-4


def test_crossed_depths_inflate_both_models():
    a, b = zoo.cifar_resnet((2, 4, 2)), zoo.cifar_resnet((4, 2, 3))
    result = compile_merge(a, b, _data((8, 3, 32, 32)), method="zip", progress=False)
    inserted = [n for n in result.report.notes if n.startswith("insert (") and "block" in n]
    assert any("model a" in n for n in inserted) and any("model b" in n for n in inserted)
    plan = result.report.depth
    assert [al.deeper for al in plan.alignments[:3]] == ["b", "a", "b"]


@pytest.mark.parametrize("depth", slow_except(["sma", "lma", "uniform"], "lma"))
def test_every_depth_method_with_every_matcher(depth):
    a, b = randomized(zoo.resnet20()), randomized(zoo.resnet26(), 1)
    x = _data((4, 3, 32, 32), 1, seed=3)[0]
    outs = {}
    for method in ("avg", "permute", "zip"):
        m = compile_merge(a, b, _data((8, 3, 32, 32)), method=method, depth=depth, progress=False).module
        outs[method] = m(x)
        assert torch.isfinite(outs[method]).all()
    assert not torch.allclose(outs["avg"], outs["zip"])


def test_cka_heatmap_is_written(tmp_path):
    result = compile_merge(zoo.resnet20(), zoo.resnet26(), _data((8, 3, 32, 32)), progress=False)
    plan = result.report.depth
    assert plan.cka.shape == (10, 13) and float(plan.cka.max()) <= 1 + 1e-6
    png = result.report.plot_cka(tmp_path / "cka.png")
    assert png.stat().st_size > 1000


def test_unalignable_stages_are_a_clear_error():
    with pytest.raises(IncompatibleModelsError, match=r"(?s)stages.*model a:.*stage 0.*model b:.*what to do"):
        compile_merge(zoo.resnet20(), zoo.vgg13(width=0.25), _data((8, 3, 32, 32)), progress=False)


def test_unknown_depth_method_lists_valid_names():
    with pytest.raises(Exception, match="lma"):
        compile_merge(zoo.resnet20(), zoo.resnet26(), _data((8, 3, 32, 32)), depth="lmb", progress=False)


def test_cka_is_measured_only_where_the_alignment_has_a_choice():
    """Blocks (3,1,3) vs (4,4,4) give stages of 4/1/3 vs 5/4/4 pieces (entry + blocks): stages
    0 and 2 have a choice, stage 1 (one piece) has a single alignment, so it gets no CKA."""
    a, b = randomized(zoo.cifar_resnet((3, 1, 3))), randomized(zoo.cifar_resnet((4, 4, 4)), 1)
    data = _data((8, 3, 32, 32))
    needed = compile_merge(a, b, data, progress=False).report.depth
    full = depth_plan(a, b, data, progress=False)            # cka="all"
    assert needed.measured == (0, 2) and full.measured == (0, 1, 2)
    pos = [[getattr(al, "positions", None) for al in plan.alignments] for plan in (needed, full)]
    assert pos[0] == pos[1] and pos[0][:3] == [pos[0][0], (0,), pos[0][2]]
    assert needed.alignments[1].positions == (0,) and torch.isnan(torch.tensor(needed.alignments[1].score))
    # the measured blocks are the same CKA values as in the full matrix (stage 1 rows/cols removed)
    rows = [i for i, n in enumerate(full.labels_a) if n in needed.labels_a]
    cols = [j for j, n in enumerate(full.labels_b) if n in needed.labels_b]
    assert torch.allclose(needed.cka, full.cka[rows][:, cols], atol=1e-12)
    assert needed.cka.shape == (7, 9)


def test_forced_alignments_measure_no_cka_and_uniform_never_does():
    a, b = randomized(zoo.cifar_resnet((1, 1, 1))), randomized(zoo.cifar_resnet((3, 2, 4)), 1)
    data = _data((8, 3, 32, 32))
    res = compile_merge(a, b, data, progress=False)
    plan = res.report.depth
    assert plan.measured == () and plan.cka.numel() == 0
    assert [al.positions for al in plan.alignments[:3]] == [(0, 3), (0,), (0,)]
    assert any("the only alignment" in n for n in res.report.notes)
    with pytest.raises(Exception, match="measured no CKA"):
        res.report.plot_cka("/tmp/never.png")
    uni = depth_plan(zoo.resnet20(), zoo.resnet26(), data, depth="uniform", progress=False, cka="needed")
    assert uni.measured == () and uni.alignments[0].positions == (0, 1, 3, 4)


def test_truncated_graph_returns_the_watched_values_and_stops():
    from hmir.passes.depth import truncated

    ir = lower(randomized(zoo.resnet20()), torch.randn(2, 3, 32, 32))
    gm, st = ir.graph_module, find_stages(ir)
    watch = st[0].outputs
    cut = truncated(gm, watch)
    names = {n.name for n in cut.graph.nodes}
    convs = [n for n in gm.graph.nodes if n.op == "call_module" and "conv" in n.target]
    assert 0 < sum(n.name in names for n in convs) < len(convs) / 2
    assert st[1].outputs[-1] not in names               # nothing after the last watched node
    x = torch.randn(4, 3, 32, 32)
    seen = {}

    class Keep(torch.fx.Interpreter):
        def run_node(self, n):
            v = super().run_node(n)
            if n.name in watch:
                seen[n.name] = v.clone()
            return v

    with torch.no_grad():
        gm.eval()
        Keep(gm).run(x)
        outs = cut(x)
    assert len(outs) == len(watch)
    for name, v in zip(watch, outs):
        assert torch.equal(v, seen[name])


FUSED_PAIRS = {
    "resnet20+resnet26": lambda: (zoo.resnet20(), zoo.resnet26()),
    "crossed": lambda: (zoo.cifar_resnet((2, 3, 1)), zoo.cifar_resnet((3, 1, 4))),
    "resnet26+resnet50": lambda: (zoo.resnet26(), zoo.resnet50_cifar()),
}


@pytest.mark.parametrize("name", slow_except(sorted(FUSED_PAIRS), "crossed"))
def test_statistics_from_the_depth_forward_equal_a_second_forward(name):
    """The default takes observe's statistics from the CKA forward of the original models
    (hmir.passes.observe_depth); the merge must be the one the two-forward path makes."""
    from hmir import DepthOptions

    a, b = FUSED_PAIRS[name]()
    a, b = randomized(a), randomized(b, 1)
    data = _data((8, 3, 32, 32), 3)
    plain = compile_merge(a, b, data, progress=False, depth=DepthOptions("lma", fuse_observe=False))
    fused = compile_merge(a, b, data, progress=False)
    assert any("taken from the depth pass's forward" in n for n in fused.report.notes)
    assert not any("taken from the depth pass's forward" in n for n in plain.report.notes)
    assert [al and al.positions for al in plain.report.depth.alignments] == \
        [al and al.positions for al in fused.report.depth.alignments]
    for x, y in zip(plain.report.spaces, fused.report.spaces):
        assert (x.width, x.fixed) == (y.width, y.fixed)
        assert x.fixed or math.isnan(x.similarity) == math.isnan(y.similarity)
        assert x.fixed or math.isnan(x.similarity) or abs(x.similarity - y.similarity) < 1e-5
    sp, sf = plain.module.state_dict(), fused.module.state_dict()
    assert sp.keys() == sf.keys()
    for k in sp:
        assert torch.allclose(sp[k].float(), sf[k].float(), rtol=1e-5, atol=1e-6), k
    assert "observe" in fused.report.timings and fused.report.timings.get("depth", 0) < \
        plain.report.timings["depth"]


def test_inexact_insertions_fall_back_to_a_second_forward():
    """An identity layer before tanh does not carry its input exactly: the statistics of the
    inflated model are then observed on it, as before."""
    a, b = _tanh_mlp(3), _tanh_mlp(5)
    data = _data((16, 8), 3)
    res = compile_merge(a, b, data, progress=False)
    assert res.report.depth.measured                    # a stage with a choice of alignment
    assert any("not taken from the depth pass's forward" in n for n in res.report.notes)
    assert not any("taken from the depth pass's forward (the" in n for n in res.report.notes)


def test_truncated_clones_only_values_written_later():
    """A watched value that a later op writes in place (directly, through a view, or through
    the tensor an in-place op aliased) is returned as it was when computed."""
    from hmir.passes.depth import may_mutate, truncated

    class M(nn.Module):
        def forward(self, x):
            a = x * 2
            b = torch.relu_(a)          # b aliases a
            c = b + 1                   # pure read
            a.add_(5)                   # writes b too
            d = c.view(-1)
            d.mul_(3)                   # writes c through a view
            e = c * 1                   # c is not written after this
            return b, c, e

    gm = torch.fx.symbolic_trace(M())
    flags = {n.name: may_mutate(gm, n) for n in gm.graph.nodes}
    assert flags["relu_"] and flags["add"] and not flags["mul_1"]
    x = torch.randn(5)
    outs = truncated(gm, ["relu_", "add", "mul_1"])(x)
    ref_b = torch.relu(x * 2)
    assert torch.equal(outs[0], ref_b) and torch.equal(outs[1], ref_b + 1)
    assert torch.equal(outs[2], (ref_b + 1) * 3)
