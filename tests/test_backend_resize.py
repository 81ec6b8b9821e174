"""The backend at new widths: A's graph with B's widths computes exactly what B computes."""
from __future__ import annotations

import copy
import functools
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from conftest import randomized, rel_err
from hmir.harness import zoo
from hmir.backend import emit
from hmir.errors import HMIRError, MergeError
from hmir.frontends import lower, register_module, rules, unregister_module
from hmir.ir import Segment
from hmir.backend.resize import (RESIZE_RULES, register_resize, resized_ir, set_tensors,
                         unregister_resize)
from hmir.ir.verify import verify
from test_lowering import GNNet


class ViewNet(nn.Module):
    """Tokens → Linear → LayerNorms (affine, plain) → view/reshape with literal feature sizes."""

    def __init__(self, c: int = 64) -> None:
        super().__init__()
        self.c = c
        self.fc1 = nn.Linear(16, c)
        self.ln = nn.LayerNorm(c)
        self.ln2 = nn.LayerNorm(c, elementwise_affine=False)
        self.fc2 = nn.Linear(8 * c, 10)

    def forward(self, x):
        b = x.size(0)
        h = self.ln(self.fc1(x.view(b, 8, 16)))
        h = self.ln2(torch.relu(h).view(b, 8, self.c))
        return self.fc2(h.reshape((b, 8 * self.c)))


class Scale(nn.Module):
    """A per-channel scale no resize rule knows."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x * self.scale[:, None, None]


class ScaleNet(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv, self.scale, self.fc = nn.Conv2d(3, c, 3), Scale(c), nn.Linear(c, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.scale(self.conv(x))).mean((2, 3)))


def _tv(name, **kw):
    tv = pytest.importorskip("torchvision")
    return getattr(tv.models, name)(weights=None, **kw)


def _densenet(growth):
    pytest.importorskip("torchvision")
    from torchvision.models.densenet import DenseNet

    return DenseNet(growth_rate=growth, block_config=(2, 2), num_init_features=16, num_classes=10)


CASES = {
    "resnet20_x1_to_x2": (lambda: zoo.resnet20(1), lambda: zoo.resnet20(2), (4, 3, 32, 32)),
    "vgg11_flatten": (lambda: zoo.vgg11(width=0.25), lambda: zoo.vgg11(width=0.5), (4, 3, 32, 32)),
    "mlp_narrower": (lambda: zoo.mlp(784, (128, 48), 10), lambda: zoo.mlp(784, (64, 32), 10),
                     (4, 1, 28, 28)),
    "groupnorm_grouped_conv": (lambda: GNNet(16, 4), lambda: GNNet(32, 4), (4, 3, 8, 8)),
    "mobilenet_v2_depthwise": (lambda: _tv("mobilenet_v2", width_mult=0.5, num_classes=10),
                               lambda: _tv("mobilenet_v2", width_mult=0.75, num_classes=10),
                               (2, 3, 64, 64)),
    "densenet_concat": (lambda: _densenet(8), lambda: _densenet(12), (2, 3, 32, 32)),
    "layernorm_view_literals": (lambda: ViewNet(64), lambda: ViewNet(128), (4, 128)),
}


def _pair(make_a, make_b, shape, seed=0):
    """Lowered A and B (B randomized), B's widths for A's spaces, and an input batch."""
    torch.manual_seed(seed)
    a, b = randomized(make_a(), seed), randomized(make_b(), seed + 1)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 2))
    ir_a, ir_b = lower(a, x[:2], "model a"), lower(b, x[:2], "model b")
    assert len(ir_a.spaces) == len(ir_b.spaces)
    widths = {sa.id: sb.n for sa, sb in zip(ir_a.spaces, ir_b.spaces)}
    assert any(sa.n != n for sa, n in zip(ir_a.spaces, widths.values()))
    return a, b, ir_a, ir_b, widths, x


@functools.lru_cache(maxsize=None)
def _case(name):
    """:func:`_pair` of a named case, lowered once per session (tests must not mutate it)."""
    return _pair(*CASES[name])


@pytest.mark.parametrize("case", list(CASES))
def test_emit_at_other_widths_computes_the_other_model(case):
    a, b, ir_a, ir_b, widths, x = _case(case)
    gm_a = ir_a.graph_module
    code, shapes = gm_a.code, {k: v.shape for k, v in gm_a.state_dict().items()}
    module = emit(ir_a, b.state_dict(), widths)
    assert not module.training
    with torch.no_grad():
        assert rel_err(b(x), module(x)) <= 1e-5
        assert rel_err(a(x), ir_a.graph_module(x)) <= 1e-6        # A's graph still computes A
    assert ir_a.graph_module.code == code
    assert {k: v.shape for k, v in ir_a.graph_module.state_dict().items()} == shapes
    for m in module.modules():                                       # attributes follow weights
        if isinstance(m, nn.Conv2d):
            assert m.in_channels == m.weight.shape[1] * m.groups
        if isinstance(m, nn.Linear):
            assert (m.out_features, m.in_features) == tuple(m.weight.shape)


@pytest.mark.parametrize("case", ["densenet_concat", "groupnorm_grouped_conv", "resnet20_x1_to_x2"])
def test_resized_ir_equals_the_other_models_ir(case):
    a, b, ir_a, ir_b, widths, x = _case(case)
    before = copy.deepcopy(ir_a.spaces)
    ir = resized_ir(ir_a, widths)
    assert ir_a.spaces == before                                     # input IR untouched
    verify(ir, b.state_dict())
    for s, t in zip(ir.spaces, ir_b.spaces):
        assert (s.n, s.group_size, s.groups) == (t.n, t.group_size, t.groups)
        assert sorted(s.slices, key=repr) == sorted(t.slices, key=repr)   # concat offsets moved
        assert s.points == t.points


def test_depthwise_stays_depthwise_and_groups_are_kept():
    _, b, ir_a, _, widths, x = _case("mobilenet_v2_depthwise")
    module = emit(ir_a, b.state_dict(), widths)
    dw = [m for m in module.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    ref = [m for m in b.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    pairs = [(m.groups, m.in_channels) for m in dw]
    assert dw and pairs == [(m.groups, m.in_channels) for m in ref]
    assert all(m.groups == m.in_channels for m in dw)
    _, g, ir_g, _, w_g, _ = _case("groupnorm_grouped_conv")
    gm = emit(ir_g, g.state_dict(), w_g)
    assert (gm.conv2.groups, gm.conv2.in_channels) == (4, 32)
    assert (gm.gn2.num_groups, gm.gn2.num_channels) == (4, 32)


def test_view_literals_are_rewritten():
    _, b, ir_a, _, widths, x = _case("layernorm_view_literals")
    module = emit(ir_a, b.state_dict(), widths)
    assert "512" in ir_a.graph_module.code and "512" not in module.code
    assert "1024" in module.code and "128" in module.code
    assert module.ln.normalized_shape == (128,) and module.ln2.normalized_shape == (128,)
    with torch.no_grad():
        assert module(x).shape == (4, 10)


def test_literal_that_is_not_the_feature_extent_is_an_error():
    _, b, ir_a, _, widths, _ = _case("layernorm_view_literals")
    node = next(n for n in ir_a.graph_module.graph.nodes if n.meta.get("hmir_shape_args")
                and isinstance(n.args[1], tuple) and 512 in n.args[1])      # reshape((b, 512))
    axes = dict(ir_a.meta["axes"])
    sid = axes[node.name][1][0].space
    axes[node.name] = {1: (Segment(sid, inner=2, outer=8),)}           # extent 1024 ≠ 512
    with pytest.raises(MergeError, match=f"{node.name}.*literal size 512.*\n.*at .*test_backend"):
        emit(replace(ir_a, meta={**ir_a.meta, "axes": axes}), b.state_dict(), widths)


def test_unknown_module_type_needs_a_resize_rule():
    register_module(Scale, rules.Affine(dim=1, params=("scale",)))
    try:
        _, b, ir_a, _, widths, x = _pair(lambda: ScaleNet(8), lambda: ScaleNet(12), (2, 3, 8, 8))
        with pytest.raises(MergeError, match=r"model a: module 'scale' \(Scale\).*"
                                             r"\(8,\)->\(12,\)(.|\n)*register_resize\(Scale"):
            emit(ir_a, b.state_dict(), widths)
        register_resize(Scale, set_tensors)
        with torch.no_grad():
            assert rel_err(b(x), emit(ir_a, b.state_dict(), widths)(x)) <= 1e-5
    finally:
        unregister_module(Scale)
        RESIZE_RULES.pop(Scale, None)


def test_register_resize_rejects_duplicates_unless_override():
    rule = RESIZE_RULES[nn.Linear]
    with pytest.raises(HMIRError, match="override=True"):
        register_resize(nn.Linear, rule)
    register_resize(nn.Linear, rule, override=True)
    assert RESIZE_RULES[nn.Linear] is rule
    with pytest.raises(HMIRError, match="no resize rule"):
        unregister_resize(Scale)


def test_shape_changes_without_widths_and_bad_widths_are_errors():
    a, b, ir_a, _, widths, x = _case("mlp_narrower")
    with pytest.raises(MergeError, match=r"changed shape.*widths="):
        emit(ir_a, b.state_dict())
    fixed = next(s for s in ir_a.spaces if s.fixed)
    with pytest.raises(MergeError, match="fixed"):
        emit(ir_a, b.state_dict(), {**widths, fixed.id: fixed.n + 1})
    with pytest.raises(MergeError, match="unknown space ids"):
        emit(ir_a, b.state_dict(), {len(ir_a.spaces): 3})
    with pytest.raises(HMIRError, match="covered|shorter"):             # state ≠ widths
        emit(ir_a, a.state_dict(), widths)


def test_emit_follows_the_states_dtype_and_keeps_identity_without_widths():
    a, b, ir_a, _, widths, x = _case("resnet20_x1_to_x2")
    state = {k: v.double() if v.is_floating_point() else v for k, v in b.state_dict().items()}
    module = emit(ir_a, state, widths)
    assert all(p.dtype == torch.float64 for p in module.parameters())
    with torch.no_grad():
        assert rel_err(copy.deepcopy(b).double()(x.double()), module(x.double())) <= 1e-12
        assert rel_err(a(x), emit(ir_a, a.state_dict())(x)) == 0
