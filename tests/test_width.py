"""Width-heterogeneous merging: design property 4 (zip undoes a function-preserving widening),
width pairs of real architectures with ONNX parity, and grouped spaces of different shapes."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from conftest import randomized, rel_err, torchvision_model
from hmir import compile_merge
from hmir.harness import zoo
from hmir.backend import emit
from hmir.errors import MergeError
from hmir.frontends import lower
from hmir.ir import MergeIR, Slice
from hmir.ir.slicing import slice_index


def _data(shape, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def calibrated(model: nn.Module, data, seed: int = 0) -> nn.Module:
    """A copy whose BatchNorm statistics are those of ``data`` and whose affine params are random.

    Random-init deep nets collapse on noise inputs (many ReLU units constant, hence
    indistinguishable by activations); standardising every norm keeps every unit alive.
    """
    m = copy.deepcopy(model)
    bns = [x for x in m.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    m.train()
    with torch.no_grad():
        for x in data:
            m(x)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=g) * 0.1)
    return m.eval()


def _widen_dim(t: torch.Tensor, dim: int, slices: list[Slice], ir: MergeIR, dups: dict) -> torch.Tensor:
    """Append copies of the duplicated units along ``dim``; halve "in" entries of each twin pair."""
    src, scale = [], []
    for sl in sorted(slices, key=lambda s: s.offset):
        n, d = ir.space(sl.space).n, dups.get(sl.space, torch.empty(0, dtype=torch.long))
        idx = slice_index(sl, n)
        w = torch.ones(n + len(d))
        if sl.role == "in":
            w[d], w[n:] = 0.5, 0.5
        src.append(torch.cat([idx, idx[:, d, :]], 1).flatten())
        scale.append(w.view(1, -1, 1).expand(sl.outer, -1, sl.inner).flatten())
    shape = [1] * t.dim()
    shape[dim] = -1
    return t.index_select(dim, torch.cat(src)) * torch.cat(scale).view(shape).to(t.dtype)


def widen(model: nn.Module, x: torch.Tensor, extra: float = 0.25, seed: int = 0):
    """A function-preserving widening of ``model`` through its IR (Net2WiderNet).

    In every free space, ``extra`` of the units get a twin: producer slices ("out": rows,
    biases, norm params and statistics) are copied, consumer slices ("in") of the unit and
    its twin are halved, so the next layer sums the two halves back. Returns the wide
    module (A's graph emitted at the new widths), A's IR and ``{space id: duplicated units}``.

    Example::

        >>> wide, ir, dups = widen(zoo.mlp(8, (6,), 2), torch.randn(2, 8))   # doctest: +SKIP
        >>> wide[1].out_features                                             # doctest: +SKIP
        7
    """
    ir = lower(model, x)
    g = torch.Generator().manual_seed(seed)
    dups = {s.id: torch.randperm(s.n, generator=g)[:max(1, int(s.n * extra))] for s in ir.free_spaces}
    state = {}
    for name, t in ir.graph_module.state_dict().items():
        slices = ir.slices_of(name)
        for dim in sorted({sl.dim for sl in slices}):
            t = _widen_dim(t, dim, [sl for sl in slices if sl.dim == dim], ir, dups)
        state[name] = t
    return emit(ir, state, {sid: ir.space(sid).n + len(d) for sid, d in dups.items()}), ir, dups


WIDEN = {
    "mlp": (lambda: zoo.mlp(64, (48, 32), 10), (64, 64)),
    "resnet20": (zoo.resnet20, (8, 3, 32, 32)),
    "vgg11_bn": (lambda: zoo.vgg11(width=0.25, batch_norm=True), (8, 3, 32, 32)),
}


def _widened(name):
    make, shape = WIDEN[name]
    torch.manual_seed(0)
    data = _data(shape)
    a = calibrated(make(), data)
    wide, ir, dups = widen(a, data[0][:2])
    return a, wide, ir, dups, data, _data(shape, 1, seed=7)[0]


@pytest.mark.parametrize("name", list(WIDEN))
def test_zip_undoes_a_function_preserving_widening(name):
    """Property 4. Each unit of A, its copy in the wide model and that copy's twin correlate ≈1,
    so zip must merge them three by three (the twin merges within the wide model: beta must
    allow ``len(dups)`` within-model merges). ZipIt's decay ``alpha=1`` keeps a merged pair's
    similarity to the third member at ≈1; with the default 0.5 it drops to 0.5, below
    unrelated within-model pairs, and zip may merge those first."""
    a, wide, ir, dups, data, x = _widened(name)
    with torch.no_grad():
        assert rel_err(a(x), wide(x)) <= 1e-5                           # function preserving
    result = compile_merge(a, wide, data, method="zip", width="min", alpha=1.0, repair=False,
                           progress=False)
    assert [(s.width_a, s.width_b - s.width_a, s.width) for s in result.report.spaces] == \
        [(s.n, len(dups.get(s.id, ())), s.n) for s in ir.spaces]
    with torch.no_grad():
        assert rel_err(a(x), result.module(x)) <= 1e-5


def test_weight_only_zip_undoes_widening_even_with_dead_units():
    """Dual-space similarity with α = 0 (weights only, elastic: B's rows mapped into the merged
    basis) pairs twins exactly even where random-init VGG units are dead on the data."""
    torch.manual_seed(0)
    data = _data((8, 3, 32, 32))
    a = randomized(zoo.vgg11(width=0.25, batch_norm=True))
    wide, ir, dups = widen(a, data[0][:2])
    result = compile_merge(a, wide, data, method="zip", width="min", alpha=1.0, repair=False,
                           similarity_alpha=0.0, progress=False)
    x = _data((4, 3, 32, 32), 1, seed=7)[0]
    with torch.no_grad():
        assert rel_err(a(x), result.module(x)) <= 1e-5
    assert any("converged" in n for n in result.report.notes)


def _widths(result):
    return [s.width for s in result.report.spaces if not s.fixed]


@pytest.mark.slow
def test_resnet20_x1_and_x2_merge_at_every_width_spec(tmp_path):
    a, b = randomized(zoo.resnet20(1)), randomized(zoo.resnet20(2), seed=1)
    data = _data((8, 3, 32, 32), 2)
    big = compile_merge(a, b, data, method="zip", progress=False)
    assert set(_widths(big)) == {32, 64, 128}                       # width="max" by default
    assert big.to_onnx(tmp_path / "m.onnx").max_abs_diff <= 1e-4
    wb = [s.width_b for s in big.report.spaces if not s.fixed]
    for spec, want in (("min", [w // 2 for w in wb]), (24, [24] * len(wb)),
                       (0.75, [3 * w // 4 for w in wb])):
        r = compile_merge(a, b, data, method="zip", width=spec, progress=False)
        assert _widths(r) == want, spec
    with torch.no_grad():
        assert r.module(data[0]).shape == (8, 10)


@pytest.mark.slow
def test_depth_and_width_at_once_resnet26x2_resnet50x4(tmp_path):
    a, b = zoo.resnet26(width=2), zoo.resnet50_cifar(width=4)
    result = compile_merge(a, b, _data((8, 3, 32, 32), 2), method="zip", progress=False)
    assert result.report.depth is not None                             # aligned 4 → 8 blocks
    assert set(_widths(result)) == {64, 128, 256}
    assert result.to_onnx(tmp_path / "m.onnx").max_abs_diff <= 1e-4


@pytest.mark.slow
def test_torchvision_resnet50_with_wide_resnet50_2(tmp_path):
    """Bottleneck inner widths differ (×2); residual widths agree. ``repair=False``: repaired
    BatchNorms of two unrelated random nets get variances down to ~0.02, which amplify float32
    rounding until onnxruntime and torch differ by ~2e-4 (torch float32 vs float64: 1e-5)."""
    a = torchvision_model("resnet50", num_classes=10)
    b = torchvision_model("wide_resnet50_2", num_classes=10)
    result = compile_merge(a, b, _data((4, 3, 64, 64), 2), method="zip", width="min",
                           repair=False, progress=False)
    inner = [s for s in result.report.spaces if not s.fixed and s.width_a != s.width_b]
    assert inner and all(s.width_b == 2 * s.width_a and s.width == s.width_a for s in inner)
    assert result.to_onnx(tmp_path / "m.onnx").max_abs_diff <= 1e-4


class GNChain(nn.Module):
    """conv → GroupNorm → ReLU, twice, then a pooled linear head."""

    def __init__(self, c: int = 16, groups: int = 4) -> None:
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(3, c, 3, padding=1), nn.GroupNorm(groups, c)
        self.conv2, self.gn2 = nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(groups, c)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        x = torch.relu(self.gn1(self.conv1(x)))
        return self.fc(torch.relu(self.gn2(self.conv2(x))).mean((2, 3)))


def doubled(a: GNChain) -> GNChain:
    """Every unit twice, as a group of its own: B's group G+g copies A's group g, so each of
    B's 2G GroupNorm groups has the statistics of one of A's: the same function."""
    two = lambda t, dim=0: torch.cat([t, t], dim)          # noqa: E731
    sd = a.state_dict()
    new = {k: two(v) for k, v in sd.items() if k.startswith(("conv1", "gn")) or k == "conv2.bias"}
    new["conv2.weight"] = two(two(sd["conv2.weight"]) / 2, 1)
    new["fc.weight"], new["fc.bias"] = two(sd["fc.weight"] / 2, 1), sd["fc.bias"]
    b = GNChain(2 * a.fc.in_features, 2 * a.gn1.num_groups)
    b.load_state_dict(new)
    return b.eval()


def test_rectangular_group_alignment_of_different_group_counts_is_exact():
    """4 groups of 4 vs 8 groups of 4: each A group takes B's copy groups g and 4+g; zipped to
    A's width the merge is A; the other way round (8 groups kept, 4 paired) it is B."""
    data, x = _data((8, 3, 8, 8)), _data((4, 3, 8, 8), 1, seed=5)[0]
    torch.manual_seed(0)
    a = randomized(GNChain(16, 4))
    b = doubled(a)
    down = compile_merge(a, b, data, width="min", alpha=1.0, progress=False)
    up = compile_merge(b, a, data, alpha=1.0, progress=False)
    with torch.no_grad():
        assert rel_err(a(x), b(x)) <= 1e-5
        assert rel_err(a(x), down.module(x)) <= 1e-5 and rel_err(a(x), up.module(x)) <= 1e-5
    assert (down.module.gn1.num_groups, up.module.gn2.num_groups) == (4, 8)
    assert "B groups per A group [[0, 4], [1, 5], [2, 6], [3, 7]]" in " ".join(down.report.notes)
    assert [s.width for s in up.report.spaces] == [3, 32, 32, 5]


@pytest.mark.slow
def test_grouped_conv_of_other_width_merges_and_other_counts_are_clear_errors(tmp_path):
    from test_lowering import GNNet

    data = _data((8, 3, 8, 8))
    a = randomized(GNNet(16, 4))
    result = compile_merge(a, randomized(GNNet(32, 4), seed=1), data, progress=False)
    assert (result.module.conv2.groups, result.module.gn2.num_groups) == (4, 4)
    assert [s.width for s in result.report.spaces if not s.fixed] == [32]
    assert result.to_onnx(tmp_path / "m.onnx").max_abs_diff <= 1e-4
    with pytest.raises(MergeError, match="grouped convolution with 4 groups in one model and 2"):
        compile_merge(a, randomized(GNNet(16, 2), seed=1), data, progress=False)
    wider = randomized(GNChain(32, 2), seed=1)
    with pytest.raises(MergeError, match=r"merged group \d needs 8 units.*width='min'"):
        compile_merge(randomized(GNChain(16, 4)), wider, data, progress=False)
    with pytest.raises(MergeError, match="method 'permute' pairs units one to one"):
        compile_merge(randomized(GNChain(16, 4)), randomized(GNChain(16, 2)), data,
                      method="permute", progress=False)
