"""Tests of hmir.algorithms.matching: avg / permute / zip matchers and the correlation helper."""
from __future__ import annotations

import random

import pytest
import torch

from hmir.algorithms.matching import (Match, MatchingError, correlation, match_avg, match_permute,
                           match_zip, zip_reference)


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensor ops: one thread avoids OpenMP stalls when the CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _corr_of(data: torch.Tensor) -> torch.Tensor:
    """Correlation of the columns of ``data`` (samples, n)."""
    return correlation(data.mean(0), data.T.cov())


def _twin(n: int, samples: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random data X (samples, n) and the correlation of the stacked features [X; X]."""
    x = torch.randn(samples, n, generator=torch.Generator().manual_seed(seed))
    return x, _corr_of(torch.cat([x, x], 1))


def _random_corr(n: int, gen: torch.Generator, decimals: int | None = None) -> torch.Tensor:
    """A random symmetric matrix with entries in [-1, 1] and unit diagonal."""
    c = torch.rand(n, n, generator=gen) * 2 - 1
    c = (c + c.T) / 2
    if decimals is not None:
        c = torch.round(c, decimals=decimals)
    return c.fill_diagonal_(1.0)


def _check_maps(m: Match, n: int) -> None:
    """M rows sum to 1, U rows hold exactly one 1, and M @ U is the identity."""
    assert m.M.shape == (m.r, n) and m.U.shape == (n, m.r)
    torch.testing.assert_close(m.M.sum(1), torch.ones(m.r, dtype=m.M.dtype))
    assert bool(((m.U == 1).sum(1) == 1).all()) and bool(((m.U == 0) | (m.U == 1)).all())
    torch.testing.assert_close(m.M @ m.U, torch.eye(m.r, dtype=m.M.dtype))
    assert sorted(k for g in m.groups for k in g) == list(range(n))
    assert [g[0] for g in m.groups] == sorted(g[0] for g in m.groups)


@pytest.mark.parametrize("matcher", ["avg", "permute", "zip", "zip_ref"])
def test_identical_features_pair_up(matcher: str) -> None:
    n = 16
    x, corr = _twin(n)
    m = {"avg": lambda: match_avg(n, n, corr=corr),
         "permute": lambda: match_permute(corr, n, n),
         "zip": lambda: match_zip(corr, n, n),
         "zip_ref": lambda: zip_reference(corr, n, n)}[matcher]()
    assert m.groups == [(i, n + i) for i in range(n)]
    _check_maps(m, 2 * n)
    assert torch.equal(m.M @ torch.cat([x.T, x.T]), x.T)
    assert m.score == pytest.approx(1.0, abs=1e-5)


def test_avg_without_corr_and_errors() -> None:
    m = match_avg(3, 3, dtype=torch.float64)
    assert m.M.dtype == torch.float64 and m.groups == [(0, 3), (1, 4), (2, 5)]
    assert m.score != m.score  # NaN: no correlation given
    with pytest.raises(ValueError):
        match_avg(2, 3)
    with pytest.raises(ValueError):
        match_permute(torch.eye(5), 2, 3)
    with pytest.raises(ValueError):
        match_zip(torch.eye(4), 2, 3)


def test_permute_recovers_hidden_permutation() -> None:
    n, gen = 24, torch.Generator().manual_seed(1)
    a = torch.randn(500, n, generator=gen)
    perm = torch.randperm(n, generator=gen)
    b = a[:, perm] + 0.05 * torch.randn(500, n, generator=gen)  # B_j = A_perm[j]
    m = match_permute(_corr_of(torch.cat([a, b], 1)), n, n)
    inv = torch.argsort(perm)
    assert m.groups == [(i, n + int(inv[i])) for i in range(n)]
    assert m.score > 0.99


def _assert_same(corr: torch.Tensor, nA: int, nB: int, r: int, alpha: float,
                 beta: float) -> None:
    fast = match_zip(corr, nA, nB, r, alpha=alpha, beta=beta)
    ref = zip_reference(corr, nA, nB, r, alpha=alpha, beta=beta)
    assert fast.groups == ref.groups, (nA, nB, r, alpha, beta)
    assert torch.equal(fast.M, ref.M) and torch.equal(fast.U, ref.U)
    assert fast.score == ref.score


def test_zip_fast_equals_reference_random() -> None:
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    for case in range(120):
        nA, nB = rng.randint(1, 20), rng.randint(1, 20)
        n = nA + nB
        if case % 3 == 0:
            corr = _corr_of(torch.randn(rng.choice([3, 30]), n, generator=gen))
        else:
            corr = _random_corr(n, gen, decimals=1 if case % 3 == 1 else None)
        if case % 5 == 0:
            corr = corr.double()
        r = rng.randint(max(1, min(nA, nB)), n)
        _assert_same(corr, nA, nB, r, rng.choice([0.0, 0.3, 0.5, 1.0]),
                     rng.choice([0.0, 0.25, 0.5, 1.0]))


def test_zip_fast_equals_reference_ties() -> None:
    gen = torch.Generator().manual_seed(3)
    for nA, nB, r in [(10, 10, 1), (12, 7, 5), (20, 20, 20), (6, 15, 2)]:
        c = torch.randint(-1, 2, (nA + nB, nA + nB), generator=gen).float()
        c = torch.maximum(c, c.T).fill_diagonal_(1.0)  # only -1, 0, 1: ties everywhere
        for alpha in (0.0, 0.5, 1.0):
            for beta in (0.0, 0.25, 1.0):
                _assert_same(c, nA, nB, r, alpha, beta)
    _assert_same(torch.zeros(30, 30), 15, 15, 3, 0.5, 0.5)


@pytest.mark.slow
def test_zip_fast_equals_reference_large() -> None:
    gen = torch.Generator().manual_seed(4)
    n = 512
    corr = _corr_of(torch.randn(64, 2 * n, generator=gen))
    _assert_same(corr, n, n, 2 * n - 150, 0.5, 0.5)  # the reference is slow: few merges
    _assert_same(torch.round(corr, decimals=1), n, n, 2 * n - 150, 0.3, 0.05)  # budgets run out


def test_zip_alpha_zero_and_beta_zero() -> None:
    gen = torch.Generator().manual_seed(5)
    corr = _random_corr(30, gen)
    m = match_zip(corr, 14, 16, r=16, alpha=0.0, beta=1.0)
    assert max(len(g) for g in m.groups) <= 2
    m = match_zip(corr, 14, 16, r=8, alpha=1.0, beta=0.0)
    assert all(min(g) < 14 <= max(g) for g in m.groups if len(g) >= 2)
    assert m.r == 8


def test_zip_extreme_r() -> None:
    gen = torch.Generator().manual_seed(6)
    corr = _random_corr(12, gen)
    m = match_zip(corr, 5, 7, r=12)
    assert torch.equal(m.M, torch.eye(12)) and torch.equal(m.U, torch.eye(12))
    assert m.score == 0.0
    m = match_zip(corr, 5, 7, r=1, alpha=1.0, beta=1.0)
    assert m.groups == [tuple(range(12))]
    _check_maps(m, 12)
    for bad in (0, 13):
        with pytest.raises(ValueError):
            match_zip(corr, 5, 7, r=bad)


def test_zip_budget_stuck_raises() -> None:
    with pytest.raises(ValueError, match="merges possible"):
        match_zip(torch.eye(4), 4, 0, r=1, beta=0.5)
    with pytest.raises(ValueError, match="merges possible"):
        zip_reference(torch.eye(4), 4, 0, r=1, beta=0.5)


def test_zip_elastic_sizes() -> None:
    gen = torch.Generator().manual_seed(7)
    corr = _corr_of(torch.randn(100, 20, generator=gen, dtype=torch.float64))
    m = match_zip(corr, 8, 12, r=10)
    assert m.r == 10 and m.M.dtype == torch.float64
    _check_maps(m, 20)
    naive = [float(corr[list(g)][:, list(g)].triu(1).sum()) / (len(g) * (len(g) - 1) / 2)
             for g in m.groups if len(g) >= 2]
    assert m.score == pytest.approx(sum(naive) / len(naive), abs=1e-12)


def test_correlation_zero_variance() -> None:
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(50, 4, generator=gen)
    x[:, 2] = 3.0  # constant feature
    c = _corr_of(x)
    assert torch.equal(c[2], torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert torch.equal(c[:, 2], c[2])
    torch.testing.assert_close(torch.diagonal(c), torch.ones(4))
    assert bool((c.abs() <= 1).all())
    torch.testing.assert_close(c[0, 1], torch.corrcoef(x.T)[0, 1])
    with pytest.raises(ValueError):
        correlation(torch.zeros(3), torch.eye(4))


def test_zip_restores_thread_count() -> None:
    torch.set_num_threads(2)
    match_zip(_random_corr(12, torch.Generator().manual_seed(9)), 6, 6)
    with pytest.raises(ValueError):
        match_zip(torch.eye(4), 4, 0, r=1)
    assert torch.get_num_threads() == 2


def test_zip_torch_and_numpy_state_machines_agree() -> None:
    """match_zip runs :class:`NumpyZip` on the CPU and :class:`FastZip` (torch) elsewhere;
    both must make the same merges step by step, ties and spent budgets included."""
    from hmir.algorithms.zipping import FastZip, NumpyZip

    gen = torch.Generator().manual_seed(11)
    for case, (nA, nB) in enumerate([(3, 5), (17, 9), (40, 40), (64, 100)]):
        x = torch.randn(200, nA + nB, generator=gen)
        corr = _corr_of(x) if case % 2 else torch.round(_corr_of(x) * 4) / 4
        for alpha, beta in [(0.5, 0.5), (0.0, 0.5), (0.3, 0.1), (0.9, 0.0)]:
            fast, npz = FastZip(corr, nA, nB, alpha, beta), NumpyZip(corr, nA, nB, alpha, beta)
            for _ in range(nA + nB - max(nA, nB)):
                pair = fast.best()
                assert npz.best() == pair
                if pair is None:
                    break
                fast.step(*pair)
                npz.step(*pair)
            assert fast.groups() == npz.groups()


def test_sampled_tie_break_approximates_the_full_one() -> None:
    """The default tie-break samples each sorted producer slice at 64 quantiles: its cosines
    stay within 0.01 of the full sorted rows' on resnet20 + a permuted copy, and every unit
    still has cosine 1 with its twin, plus the twin bonus (``tie``, here 1)."""
    import copy

    from hmir.frontends import lower
    from hmir.harness.permute import permute_state, random_permutation
    from hmir.algorithms.tiebreak import row_length, stacked_similarity
    from hmir.harness import zoo

    a = zoo.resnet20(width=2)
    ir = lower(a, torch.randn(2, 3, 32, 32))
    perms = random_permutation(ir, seed=3)
    sa, sb = a.state_dict(), permute_state(ir, a.state_dict(), perms)
    checked = 0
    for s in ir.free_spaces:
        if row_length(s, sa) <= 64:
            continue
        corr = torch.zeros(2 * s.n, 2 * s.n)
        full = stacked_similarity(corr, (s, s), (sa, sb), 1.0, quantiles=None)
        samp = stacked_similarity(corr, (s, s), (sa, sb), 1.0)
        assert (full - samp).abs().max() < 0.01
        p = torch.as_tensor(perms[s.id])
        assert not torch.equal(p, torch.arange(s.n))
        twin = samp[torch.arange(s.n), s.n + torch.argsort(p)]
        assert torch.allclose(twin, torch.full((s.n,), 2.0), atol=1e-5), s.name
        checked += 1
    assert checked >= 5
