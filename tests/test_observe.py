"""observe: streamed statistics with runs of equal observation points counted once."""
from __future__ import annotations

import pytest
import torch

import hmir.passes.observe as observe_pass
from conftest import randomized
from hmir import DepthOptions, compile_merge
from hmir.harness import zoo
from hmir.passes.observe import SpaceStats, observe


def _reference(points):
    """Mean, covariance and correlation of all points' rows stacked, in float64."""
    x = torch.cat([torch.cat([fa, fb], 1) for fa, fb in points]).double()
    mean, cov = x.mean(0), torch.cov(x.T, correction=0)
    std = cov.diagonal().sqrt()
    return mean, cov, cov / torch.outer(std, std)


def _assert_close(st, points, atol=2e-6):
    mean, cov, corr = _reference(points)
    assert st.count == sum(fa.shape[0] for fa, _ in points)
    assert torch.allclose(st.mean(), mean, rtol=0, atol=atol)
    assert torch.allclose(st.cov(), cov, rtol=0, atol=atol * float(cov.abs().max()))
    assert torch.allclose(st.corr(), corr, rtol=0, atol=atol)


@pytest.mark.parametrize("na,nb", [(3, 5), (300, 600), (513, 257)])
def test_runs_of_equal_points_give_the_per_point_statistics(na, nb):
    g = torch.Generator().manual_seed(na)
    fa, fa2 = torch.randn(40, na, generator=g), torch.randn(40, na, generator=g)
    fb = [torch.randn(40, nb, generator=g) for _ in range(4)]
    pooled = (torch.randn(7, na, generator=g), torch.randn(7, nb, generator=g))   # fewer rows
    runs_a = [(fa, fb[0]), (fa.clone(), fb[1]), (fa, fb[2]), (fa2, fb[3]), pooled]
    runs_b = [(torch.randn(40, na, generator=g), fb[0].clone()) for _ in range(3)]
    st = SpaceStats.empty(na + nb, "cpu")
    st.update_points(runs_a)
    st.update_points(runs_b)
    st.update_points([])
    _assert_close(st, runs_a + runs_b)
    assert st.count == 4 * 40 + 7 + 3 * 40
    # a distorted run (one entry off) must not be merged with its neighbour
    bad = fa.clone()
    bad[3, 1] += 1.0
    st2 = SpaceStats.empty(na + nb, "cpu")
    st2.update_points([(fa, fb[0]), (bad, fb[1])])
    _assert_close(st2, [(fa, fb[0]), (bad, fb[1])])


def test_large_means_do_not_lose_the_variance():
    """Raw float32 second moments of features with mean 1000 and std 0.01 would keep no digit
    of the variance (E[x^2] - E[x]^2); the shifted statistics keep it."""
    g = torch.Generator().manual_seed(0)
    batches = [(1000 + 0.01 * torch.randn(256, 4, generator=g), 5 + torch.randn(256, 3, generator=g))
               for _ in range(4)]
    st = SpaceStats.empty(7, "cpu")
    for fa, fb in batches:
        st.update(fa, fb)
    _assert_close(st, batches, atol=1e-4)
    ref = float(_reference(batches)[1][0, 0])               # about 1e-4
    assert abs(float(st.cov()[0, 0]) / ref - 1) < 1e-3
    raw = SpaceStats.empty(7, "cpu")                        # what no shift would give
    raw.shift = torch.zeros(7)
    for fa, fb in batches:
        raw.update(fa, fb)
    assert abs(float(raw.cov()[0, 0]) / ref - 1) > 1e-2


def test_constant_features_are_dead_and_twins():
    fa = torch.cat([torch.full((64, 1), 3.25), torch.randn(64, 1)], 1)
    fb = torch.cat([torch.full((64, 1), 0.1), fa[:, 1:]], 1)
    st = SpaceStats.empty(4, "cpu")
    st.update(fa, fb)
    st.update(fa, fb)
    c = st.corr()
    assert float(c[0, 2]) == 1.0 and float(c[0, 1]) == 0.0
    assert abs(float(c[1, 3]) - 1) < 1e-6


def test_inflated_models_observe_as_per_point_updates(monkeypatch):
    """resnet20 + resnet26: the zero blocks' outputs repeat their predecessors' values."""
    seen = {}

    def spy(*args, **kw):
        seen["args"] = (args, kw)
        return observe(*args, **kw)

    monkeypatch.setattr(observe_pass, "observe", spy)       # what the observe pass calls
    a, b = randomized(zoo.resnet20()), randomized(zoo.resnet26(), 1)
    data = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    compile_merge(a, b, data, progress=False, depth=DepthOptions("lma", fuse_observe=False))
    args, kw = seen["args"]
    import hmir.passes.observe as obs

    lengths, runs = [], obs._runs
    monkeypatch.setattr(obs, "_runs", lambda feats: lengths.append((len(feats), len(runs(feats))))
                        or runs(feats))
    fast = observe(*args, **kw)
    assert any(r < n for n, r in lengths)          # some zero block repeated its input
    one_by_one = SpaceStats.update_points
    monkeypatch.setattr(SpaceStats, "update_points",
                        lambda self, feats: [one_by_one(self, [p]) for p in feats] and None)
    slow = observe(*args, **kw)
    pairs = args[2]
    assert any(len(p.points) > 1 for p in pairs)
    for f, s in zip(fast, slow):
        assert f.count == s.count
        assert torch.allclose(f.corr(), s.corr(), rtol=0, atol=1e-5)
