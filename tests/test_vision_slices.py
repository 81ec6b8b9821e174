"""Channel slices as sub-spaces and channel shuffle (torch.export frontend).

GhostNet's ``cat([x1, cheap(x1)])[:, :out]`` (a unit dropped when ``out`` is odd, residual
adds of the concatenation to a tensor produced whole), DPN's residual and dense parts of one
conv's output, and ShuffleNet V2's view / transpose / view: lowering, permutation invariance
(norm statistics randomised), merge(A, A) = A, width-heterogeneous merges and the errors.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from hmir import compile_merge
from hmir.errors import LoweringError
from hmir.frontends.export import lower
from hmir.harness.permute import permute_state, random_permutation


class Ghost(nn.Module):
    """GhostNet's module: ``cat(primary, cheap(primary))[:, :out]``."""

    def __init__(self, cin: int, out: int) -> None:
        super().__init__()
        self.out, init = out, math.ceil(out / 2)
        self.primary = nn.Sequential(nn.Conv2d(cin, init, 1, bias=False), nn.BatchNorm2d(init),
                                     nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(init, init, 3, 1, 1, groups=init, bias=False),
                                   nn.BatchNorm2d(init), nn.ReLU())

    def forward(self, x):
        x1 = self.primary(x)
        return torch.cat([x1, self.cheap(x1)], 1)[:, :self.out]


class GhostToy(nn.Module):
    def __init__(self, w: int = 7, c: int = 12) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1), nn.BatchNorm2d(c), nn.ReLU())
        self.g1, self.g2, self.g3, self.g4 = Ghost(c, w), Ghost(w, c), Ghost(c, w), Ghost(w, c)
        self.down = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        x = self.g2(self.g1(x)) + x                 # identity shortcut: the stem's space is cut
        x = self.g4(self.g3(x)) + self.down(x)      # a conv shortcut produced whole: cut
        return self.head(x.mean((2, 3)))


class DualPath(nn.Module):
    """DPN: a conv's output sliced into a residual part and a dense part."""

    def __init__(self, r: int = 8, inc: int = 4, mid: int = 6) -> None:
        super().__init__()
        bac = lambda i, o: nn.Sequential(nn.BatchNorm2d(i), nn.ReLU(), nn.Conv2d(i, o, 1))
        self.r = r
        self.proj, self.a, self.c = bac(3, r + 2 * inc), bac(r + 2 * inc, mid), bac(mid, r + inc)
        self.a2, self.c2 = bac(r + 3 * inc, mid), bac(mid, r + inc)
        self.head = nn.Linear(r + 4 * inc, 5)

    def block(self, x_s, x, a, c):
        y, r = c(a(x)), self.r
        return torch.cat([x_s[:, :r] + y[:, :r], x_s[:, r:], y[:, r:]], 1)

    def forward(self, x):
        x_s = self.proj(x)
        x = self.block(x_s, x_s, self.a, self.c)
        x = self.block(x, x, self.a2, self.c2)      # the concat sliced at its segment bound
        return self.head(x.mean((2, 3)))


class Shuffle(nn.Module):
    """Two ShuffleNet V2 units: concat, channel shuffle, chunk."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        h = c // 2
        branch = lambda i: nn.Sequential(nn.Conv2d(i, h, 1), nn.BatchNorm2d(h), nn.ReLU(),
                                         nn.Conv2d(h, h, 3, 1, 1, groups=h), nn.BatchNorm2d(h),
                                         nn.Conv2d(h, h, 1), nn.ReLU())
        self.b1, self.b2, self.b3 = branch(3), branch(3), branch(h)
        self.head = nn.Conv2d(c, 5, 1)

    @staticmethod
    def shuffle(x):
        b, c, hh, ww = x.shape
        return x.view(b, 2, c // 2, hh, ww).transpose(1, 2).contiguous().view(b, c, hh, ww)

    def forward(self, x):
        x = self.shuffle(torch.cat([self.b1(x), self.b2(x)], 1))
        x1, x2 = x.chunk(2, dim=1)
        x = self.shuffle(torch.cat([x1, self.b3(x2)], 1))
        return self.head(x).mean((2, 3))


def randomized(m: nn.Module, seed: int = 0) -> nn.Module:
    """Norm statistics and affine parameters away from their init (which hides bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                for t, lo, sc in ((mod.weight, 0.5, 1), (mod.bias, -0.2, 0.4),
                                  (mod.running_mean, -0.2, 0.4), (mod.running_var, 0.5, 1)):
                    t.copy_(lo + sc * torch.rand(t.shape, generator=g))
    return m.eval()


def rel(y, ref) -> float:
    return float((y - ref).abs().max() / ref.abs().max())


def check(m: nn.Module, size: int, merge: bool = True):
    """Lower with torch.export; permutation invariance and merge(A, A) = A."""
    x = torch.randn(2, 3, size, size)
    ir = lower(m, x, type(m).__name__)
    perms = random_permutation(ir, seed=0)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    mp = copy.deepcopy(m)
    mp.load_state_dict(permute_state(ir, m.state_dict(), perms))
    with torch.no_grad():
        y = m(x)
        assert rel(mp(x), y) < 1e-5
    if merge:
        data = [torch.randn(4, 3, size, size) for _ in range(2)]
        res = compile_merge(m, copy.deepcopy(m), data, method="zip", repair=False,
                            progress=False, frontend="export")
        with torch.no_grad():
            assert rel(res.module(x), y) < 1e-5
    return ir


def test_ghost_slices_cut_spaces_and_drop_a_unit():
    ir = check(randomized(GhostToy()), 16)
    dropped = [s for s in ir.spaces if s.n == 1 and not s.fixed]
    assert len(dropped) == 2                          # unit 3 of g1's and g3's primary conv
    assert all(s.points and s.producers() for s in dropped)
    stem = [s for s in ir.spaces if any(sl.param == "stem.0.weight" and sl.dim == 0
                                        for sl in s.slices)]
    assert [sorted(sl.offset for sl in s.slices if sl.param == "stem.0.weight" and sl.dim == 0)
            for s in stem] == [[0, 6]]               # the stem's 12 units: two tied runs of 6


def test_dual_path_slices():
    ir = check(randomized(DualPath()), 8)
    rows = sorted((sl.offset, ir.space(sl.space).n) for s in ir.spaces for sl in s.slices
                  if sl.param == "proj.2.weight" and sl.dim == 0)
    assert rows == [(0, 8), (8, 8)]                   # residual part, dense part


@pytest.mark.parametrize("cls, a, b", [(GhostToy, (7, 12), (9, 16)), (DualPath, (8, 4, 6),
                                                                      (10, 6, 8))])
def test_width_heterogeneous_merge(cls, a, b):
    x = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    res = compile_merge(randomized(cls(*a)), randomized(cls(*b), 1), x, method="zip",
                        repair=False, progress=False, frontend="export")
    with torch.no_grad():
        y = res.module(x[0])
    assert y.shape == (4, 5) and torch.isfinite(y).all()


def test_shuffle_keeps_shuffled_spaces_in_place():
    ir = check(randomized(Shuffle()), 8)
    fixed = [s for s in ir.spaces if s.fixed_reason.startswith("channel shuffle")]
    assert fixed and all("interleaved" in s.fixed_reason for s in fixed)
    free = {sl.param for s in ir.free_spaces for sl in s.slices}
    assert "b1.0.weight" in free and "b3.3.weight" in free       # branch insides still merge
    assert not any(sl.param == "b1.5.weight" and sl.dim == 0 for s in ir.free_spaces
                   for sl in s.slices)                             # shuffled rows stay put


def test_shuffle_width_mismatch_is_a_clear_error():
    x = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    with pytest.raises(Exception, match="does not correspond|channel shuffle|FIXED|fixed"):
        compile_merge(Shuffle(8).eval(), Shuffle(12).eval(), x, method="zip", repair=False,
                      progress=False, frontend="export")


class Strided(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.b(self.a(x)[:, ::2])


def test_strided_channel_slice_is_refused():
    with pytest.raises(LoweringError, match="node 'slice.*with a step"):
        lower(Strided(), torch.randn(2, 3, 4, 4))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ghostnet_100", "dpn68"])
def test_timm(name):
    timm = pytest.importorskip("timm")
    check(randomized(timm.create_model(name, pretrained=False)), 64)


@pytest.mark.slow
def test_shufflenet_v2():
    tv = pytest.importorskip("torchvision")
    m = randomized(tv.models.shufflenet_v2_x0_5(weights=None))
    ir = check(m, 64)
    perms = random_permutation(ir, seed=1)
    ps = permute_state(ir, m.state_dict(), perms)
    sd = m.state_dict()
    w = "stage2.1.branch2.0.weight"               # its rows are a free space, its columns shuffled
    assert not torch.equal(ps[w], sd[w])
    assert torch.equal(ps[w].sort(0).values, sd[w].sort(0).values)      # rows moved, columns not
    assert torch.equal(ps["stage3.0.branch1.0.weight"], sd["stage3.0.branch1.0.weight"])
    last = "stage2.1.branch2.5.weight"            # reads the free space, writes shuffled rows
    assert not torch.equal(ps[last], sd[last])
    assert torch.equal(ps[last].sort(1).values, sd[last].sort(1).values)
