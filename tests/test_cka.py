"""Streamed unbiased linear CKA: reference agreement, invariances, streaming, errors, plotting."""
from __future__ import annotations

import math

import pytest
import torch

from hmir.algorithms.alignment import align
from hmir.algorithms.cka import StreamingCKA, linear_cka, plot_cka
from hmir.errors import CalibrationError, MergeError


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def naive_hsic1(K: torch.Tensor, L: torch.Tensor) -> float:
    """The unbiased estimator entry by entry, in plain python (uncentred Grams)."""
    b = K.shape[0]
    Kt = [[0.0 if p == q else float(K[p, q]) for q in range(b)] for p in range(b)]
    Lt = [[0.0 if p == q else float(L[p, q]) for q in range(b)] for p in range(b)]
    tr = sum(Kt[p][q] * Lt[q][p] for p in range(b) for q in range(b))
    sk, sl = sum(map(sum, Kt)), sum(map(sum, Lt))
    kl1 = sum(sum(Kt[p]) * sum(Lt[p]) for p in range(b))        # 1ᵀ K̃ L̃ 1, K̃ symmetric
    return (tr + sk * sl / ((b - 1) * (b - 2)) - 2 / (b - 2) * kl1) / (b * (b - 3))


def gram(x):
    x = x.reshape(x.shape[0], -1)
    return x @ x.T


def test_single_batch_equals_linear_cka():
    x, y = randn(40, 7, seed=1), randn(40, 5, seed=2)
    y = y + 0.5 * x[:, :5] + 3.0                       # correlated, with a large mean
    s = StreamingCKA(2, 2)
    s.update([x, y], [y, x])
    M = s.matrix()
    assert M.dtype == torch.float64 and M.device.type == "cpu" and M.shape == (2, 2)
    assert M[0, 0].item() == pytest.approx(linear_cka(x, y), abs=1e-10)
    assert M[1, 1].item() == pytest.approx(linear_cka(y, x), abs=1e-10)
    assert M[0, 1].item() == pytest.approx(1.0, abs=1e-12)
    assert 0.2 < M[0, 0].item() < 0.99


def test_orthogonal_and_scale_invariance():
    x = randn(200, 12, seed=3)
    Q, _ = torch.linalg.qr(randn(12, 12, seed=4))
    assert linear_cka(x, 5.0 * x @ Q) == pytest.approx(1.0, abs=1e-9)
    s = StreamingCKA(1, 1)
    for k in range(3):
        xb = randn(32, 12, seed=10 + k)
        s.update([xb], [0.01 * xb @ Q])
    assert s.matrix()[0, 0].item() == pytest.approx(1.0, abs=1e-9)


def test_feature_permutation_invariance():
    x, y = randn(64, 9, seed=5), randn(64, 6, seed=6)
    y = y + x[:, :6]
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    assert linear_cka(x[:, perm], y) == pytest.approx(linear_cka(x, y), abs=1e-12)
    assert linear_cka(x, y, unbiased=False) == pytest.approx(
        linear_cka(x[:, perm], y, unbiased=False), abs=1e-12)


def test_independent_features_near_zero():
    s = StreamingCKA(1, 1)
    for k in range(20):
        s.update([randn(128, 16, seed=100 + k)], [randn(128, 16, seed=200 + k)])
    assert abs(s.matrix()[0, 0].item()) < 0.1
    # the biased estimator of a single small batch is far from 0 (why the unbiased one is used)
    assert linear_cka(randn(32, 64, seed=1), randn(32, 64, seed=2), unbiased=False) > 0.3


def test_streamed_equals_naive_mean_of_hsics():
    xs = [[randn(6, 3, seed=10 * k + u) for u in range(2)] for k in range(4)]
    ys = [[randn(6, 2, 2, seed=10 * k + u + 5) + xs[k][0][:, :1, None] for u in range(3)]
          for k in range(4)]
    s = StreamingCKA(2, 3)
    for fa, fb in zip(xs, ys):
        s.update(fa, fb)
    assert s.batches == 4
    mean = lambda f: sum(f(k) for k in range(4)) / 4          # noqa: E731
    for a in range(2):
        for b in range(3):
            kl = mean(lambda k: naive_hsic1(gram(xs[k][a]), gram(ys[k][b])))
            kk = mean(lambda k: naive_hsic1(gram(xs[k][a]), gram(xs[k][a])))
            ll = mean(lambda k: naive_hsic1(gram(ys[k][b]), gram(ys[k][b])))
            assert s.matrix()[a, b].item() == pytest.approx(kl / math.sqrt(kk * ll), abs=1e-9)


def test_conv_shaped_inputs_are_flattened():
    x = randn(16, 3, 4, 4, seed=7)
    y = randn(16, 5, 2, 2, seed=8) + x[:, :1, :2, :2]
    s = StreamingCKA(1, 1)
    s.update([x], [y])
    flat = linear_cka(x.reshape(16, -1), y.reshape(16, -1))
    assert s.matrix()[0, 0].item() == pytest.approx(flat, abs=1e-10)
    assert linear_cka(x, y) == pytest.approx(flat, abs=1e-12)


def test_a_vs_a_diagonal_is_one_and_float32_ok():
    feats = [randn(20, 4, seed=s).float() for s in range(3)]
    s = StreamingCKA(3, 3)
    s.update(feats, feats)
    M = s.matrix()
    assert torch.allclose(M.diagonal(), torch.ones(3, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(M, M.T, atol=1e-12)


def test_constant_and_zero_units_get_zero():
    x = randn(16, 5, seed=9)
    const = torch.full((16, 5), 3.0, dtype=torch.float64)
    s = StreamingCKA(3, 2)
    s.update([x, const, torch.zeros(16, 2)], [x, const])
    M = s.matrix()
    assert not torch.isnan(M).any()
    assert M[0, 0].item() == pytest.approx(1.0)
    assert M[1:].abs().max() == 0 and M[:, 1].abs().max() == 0
    assert linear_cka(const, x) == 0.0


def test_errors():
    s = StreamingCKA(1, 2)
    with pytest.raises(CalibrationError, match="before any update"):
        s.matrix()
    with pytest.raises(CalibrationError, match=r"batch size 3 .*>= 4"):
        s.update([randn(3, 2)], [randn(3, 2), randn(3, 2)])
    with pytest.raises(CalibrationError, match="expected 1 unit outputs of A and 2 of B"):
        s.update([randn(8, 2)], [randn(8, 2)])
    with pytest.raises(CalibrationError, match=r"sizes \[8, 9\]"):
        s.update([randn(8, 2)], [randn(8, 2), randn(9, 2)])
    with pytest.raises(CalibrationError, match="batch size 3"):
        linear_cka(randn(3, 2), randn(3, 2))
    with pytest.raises(CalibrationError):
        linear_cka(randn(8, 2), randn(9, 2))
    assert s.batches == 0


def test_plot_cka_writes_png(tmp_path):
    C = torch.rand(5, 3, generator=torch.Generator().manual_seed(0))
    out = plot_cka(C, tmp_path / "cka.png", labels_a=[f"a{j}" for j in range(5)],
                   alignment=align(C, "lma"), title="stage 1")
    assert out == tmp_path / "cka.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000
    # B deeper: the alignment is drawn transposed
    out2 = plot_cka(C.T.numpy(), str(tmp_path / "t.png"), alignment=align(C.T, "sma"))
    assert out2.stat().st_size > 1000
    with pytest.raises(MergeError, match="does not fit"):
        plot_cka(C, tmp_path / "bad.png", alignment=align(C.T, "sma"))


def test_plot_cka_marks_per_stage_blocks(tmp_path):
    """Stages stacked in one matrix: each block's alignment is drawn at its offsets."""
    g = torch.Generator().manual_seed(1)
    C1, C2 = torch.rand(3, 5, generator=g), torch.rand(4, 2, generator=g)
    C = torch.zeros(7, 7)
    C[:3, :5], C[3:, 5:] = C1, C2
    blocks = [(align(C1, "lma"), 0, 0), (align(C2, "sma"), 3, 5)]
    assert plot_cka(C, tmp_path / "stages.png", alignment=blocks).stat().st_size > 1000
    with pytest.raises(MergeError, match=r"at \(4, 5\) does not fit"):
        plot_cka(C, tmp_path / "bad.png", alignment=[(align(C2, "sma"), 4, 5)])
