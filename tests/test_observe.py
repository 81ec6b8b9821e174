"""observe: streamed statistics with runs of equal observation points counted once."""
from __future__ import annotations

import pytest
import torch

import hmir.api as api
from conftest import randomized
from hmir import compile_merge, zoo
from hmir.passes.observe import SpaceStats, observe


def _reference(points, n):
    ref = SpaceStats.empty(n, "cpu")
    for fa, fb in points:
        ref.update(fa, fb)
    return ref


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
    ref = _reference(runs_a + runs_b, na + nb)
    assert st.count == ref.count == 4 * 40 + 7 + 3 * 40
    assert torch.allclose(st.mean(), ref.mean(), rtol=0, atol=1e-14)
    assert torch.allclose(st.cov(), ref.cov(), rtol=0, atol=1e-12)
    assert torch.allclose(st.corr(), ref.corr(), rtol=0, atol=1e-12)
    # a distorted run (one entry off) must not be merged with its neighbour
    bad = fa.clone()
    bad[3, 1] += 1.0
    st2 = SpaceStats.empty(na + nb, "cpu")
    st2.update_points([(fa, fb[0]), (bad, fb[1])])
    ref2 = _reference([(fa, fb[0]), (bad, fb[1])], na + nb)
    assert torch.allclose(st2.cov(), ref2.cov(), rtol=0, atol=1e-12)


def test_inflated_models_observe_as_per_point_updates(monkeypatch):
    """resnet20 + resnet26: the zero blocks' outputs repeat their predecessors' values."""
    seen = {}

    def spy(*args, **kw):
        seen["args"] = (args, kw)
        return observe(*args, **kw)

    monkeypatch.setattr(api, "observe", spy)
    a, b = randomized(zoo.resnet20()), randomized(zoo.resnet26(), 1)
    data = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    compile_merge(a, b, data, progress=False)
    args, kw = seen["args"]
    import hmir.passes.observe as obs

    lengths, runs = [], obs._runs
    monkeypatch.setattr(obs, "_runs", lambda feats: lengths.append((len(feats), len(runs(feats))))
                        or runs(feats))
    fast = observe(*args, **kw)
    assert any(r < n for n, r in lengths)          # some zero block repeated its input
    monkeypatch.setattr(SpaceStats, "update_points",
                        lambda self, feats: [self.update(fa, fb) for fa, fb in feats] and None)
    slow = observe(*args, **kw)
    pairs = args[2]
    assert any(len(p.points) > 1 for p in pairs)
    for f, s in zip(fast, slow):
        assert f.count == s.count
        assert torch.allclose(f.corr(), s.corr(), rtol=0, atol=1e-10)
