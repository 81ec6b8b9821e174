"""Depth alignment: SMA and LMA against brute force, ties, orientation, uniform, errors."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from hmir.algorithms.alignment import METHODS, Alignment, align, objective, uniform_positions
from hmir.errors import MergeError

SIZES = [(m, n) for m in range(1, 9) for n in range(1, m + 1)]


def all_alignments(m: int, n: int):
    """Every valid G, in lexicographic order."""
    if n == 1:
        yield (0,)
        return
    for mid in itertools.combinations(range(1, m - 1), n - 2):
        yield (0, *mid, m - 1)


def brute_force(D: np.ndarray, method: str) -> tuple[float, tuple[int, ...]]:
    """Best objective and the lexicographically smallest G reaching it (``>`` keeps the first)."""
    best, best_G = -np.inf, None
    for G in all_alignments(*D.shape):
        v = objective(D, G, method)
        if v > best:
            best, best_G = v, G
    return best, best_G


@pytest.mark.parametrize("method", ["sma", "lma"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dp_equals_brute_force_on_random_matrices(method, seed):
    rng = np.random.default_rng(seed)
    for m, n in SIZES:
        D = rng.random((m, n))
        a = align(D, method)
        best, best_G = brute_force(D, method)
        assert abs(a.score - best) <= 1e-9, (m, n)
        assert a.positions == best_G, (m, n)
        assert (a.m, a.n, a.method) == (m, n, method)


@pytest.mark.parametrize("method", ["sma", "lma"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ties_give_lexicographically_smallest(method, seed):
    rng = np.random.default_rng(100 + seed)
    n_ties = 0
    for (m, n), high in itertools.product(SIZES, (2, 3)):
        D = rng.integers(0, high, size=(m, n)).astype(np.float64)
        best, best_G = brute_force(D, method)
        optimal = [G for G in all_alignments(m, n) if objective(D, G, method) == best]
        n_ties += len(optimal) > 1
        a = align(D, method)
        assert a.score == best and a.positions == best_G == min(optimal), (m, n, D)
    assert n_ties >= 10        # the integer matrices really do exercise ties


def test_all_zero_matrix_picks_earliest_positions():
    assert align(np.zeros((6, 3)), "sma").positions == (0, 1, 5)
    assert align(np.zeros((6, 3)), "lma").positions == (0, 1, 5)


@pytest.mark.parametrize("method", METHODS)
def test_orientation_b_deeper_matches_transpose(method):
    C = np.random.default_rng(7).random((3, 7))          # A shallower
    a, t = align(C, method), align(C.T, method)
    assert a.deeper == "b" and t.deeper == "a"
    assert a.positions == t.positions and a.score == pytest.approx(t.score)
    assert (a.m, a.n) == (7, 3)


def test_torch_input_any_float_dtype():
    C = torch.rand(6, 4, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float16, torch.float32, torch.float64):
        a = align(C.to(dtype), "lma")
        assert a.positions == align(C.to(dtype).double().numpy(), "lma").positions


@pytest.mark.parametrize("method", METHODS)
def test_equal_depth_is_identity(method):
    C = np.random.default_rng(3).random((5, 5))
    a = align(C, method)
    assert a.deeper == "equal" and a.positions == (0, 1, 2, 3, 4) and a.inserted() == ()
    assert a.score == pytest.approx(np.trace(C))


def test_uniform_positions_strict_with_endpoints():
    for m in range(1, 60):
        for n in range(1, m + 1):
            G = uniform_positions(m, n)
            assert len(G) == n and G[0] == 0
            assert all(x < y for x, y in zip(G, G[1:])), (m, n, G)
            if n >= 2:
                assert G[-1] == m - 1
                assert max(abs(g - i * (m - 1) / (n - 1)) for i, g in enumerate(G)) <= 0.5
    assert uniform_positions(5, 3) == (0, 2, 4)


def test_uniform_score_is_lma_objective_and_not_above_lma():
    rng = np.random.default_rng(5)
    for m, n in SIZES:
        D = rng.random((m, n))
        u = align(D, "uniform")
        assert u.positions == uniform_positions(m, n)
        assert u.score == pytest.approx(objective(D, u.positions, "lma"))
        assert u.score <= align(D, "lma").score + 1e-12


def test_lma_and_sma_dominate_each_others_choice():
    rng = np.random.default_rng(9)
    for m, n in SIZES:
        D = rng.random((m, n))
        lma, sma = align(D, "lma"), align(D, "sma")
        assert lma.score >= objective(D, sma.positions, "lma") - 1e-12
        assert sma.score >= objective(D, lma.positions, "sma") - 1e-12
        # LMA's objective contains SMA's plus non-negative terms for a non-negative D
        assert objective(D, lma.positions, "lma") >= objective(D, lma.positions, "sma")


def test_lma_prefers_segment_end_that_credits_inserted_units():
    # deep units 1-3 resemble shallow unit 0; SMA only looks at placed cells
    D = np.array([[1.0, 0.0], [0.9, 0.0], [0.9, 0.0], [0.0, 0.5], [0.0, 1.0]])
    assert align(D, "lma").positions == (0, 4)
    assert align(D, "lma").score == pytest.approx(3.8)


def test_inserted_and_source():
    a = Alignment("lma", "a", (0, 3, 4), m=6, n=3, score=0.0)
    assert a.inserted() == (1, 2, 5)
    assert [a.source(j) for j in range(6)] == [0, 0, 0, 1, 2, 2]
    with pytest.raises(MergeError):
        a.source(6)


def test_objective_by_hand():
    D = np.arange(12, dtype=float).reshape(4, 3)     # D[j, i] = 3j + i
    assert objective(D, (0, 2, 3), "sma") == 0 + 7 + 11
    assert objective(D, (0, 2, 3), "lma") == 0 + 3 + 7 + 11
    with pytest.raises(MergeError, match="not an alignment"):
        objective(D, (0, 1, 2), "lma")          # last unit not at the last position
    with pytest.raises(MergeError, match="sma, lma"):
        objective(D, (0, 2, 3), "uniform")


def test_errors():
    with pytest.raises(MergeError, match="valid: sma, lma, uniform"):
        align(np.ones((3, 2)), "dtw")
    for bad in (np.ones(3), np.ones((0, 2)), np.ones((2, 2, 2))):
        with pytest.raises(MergeError, match=r"shape \("):
            align(bad, "sma")
    C = np.ones((3, 2))
    C[1, 0] = np.nan
    with pytest.raises(MergeError, match=r"\(3, 2\)"):
        align(C, "lma")
    with pytest.raises(MergeError):
        uniform_positions(2, 3)
