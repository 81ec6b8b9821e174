"""Feature matching: turn the correlation of two models' features into merge/unmerge maps.

For one feature space, model A has ``nA`` features and model B ``nB``; ``corr`` is the
``(nA+nB, nA+nB)`` correlation of the stacked features ``[A's; B's]``. A matcher groups
features; merged features are ``M @ [fA; fB]`` (group averages) and ``U @ merged`` copies
each merged feature back to every member.

Example::

    >>> import torch
    >>> x = torch.randn(100, 4, dtype=torch.float64)
    >>> xx = torch.cat([x, x], 1)
    >>> match_zip(correlation(xx.mean(0), xx.T.cov()), 4, 4).groups
    [(0, 4), (1, 5), (2, 6), (3, 7)]
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment

from hmir.errors import MergeError
from hmir.algorithms.zipping import FastZip, NumpyZip, ZipState

__all__ = ["Match", "MatchingError", "correlation", "correlation_rows", "match_avg", "match_keep", "match_permute",
           "match_zip", "zip_reference"]


class MatchingError(MergeError, ValueError):
    """Bad arguments to a matcher, or no matching possible under the constraints."""


@dataclass(frozen=True)
class Match:
    """A grouping of the stacked features: ``M`` (r × n) averages, ``U`` (n × r) copies back.

    Example::

        >>> match_avg(2, 2).M
        tensor([[0.5000, 0.0000, 0.5000, 0.0000],
                [0.0000, 0.5000, 0.0000, 0.5000]])
    """

    M: torch.Tensor
    U: torch.Tensor
    groups: list[tuple[int, ...]]
    score: float

    @property
    def r(self) -> int:
        """Number of merged features, e.g. ``match_avg(3, 3).r == 3``."""
        return len(self.groups)


def correlation(mean: torch.Tensor, cov: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``cov_ij / sqrt(var_i var_j)``; features with variance ≤ eps correlate 0 (1 with itself).

    Example::

        >>> correlation(torch.zeros(2), torch.tensor([[4.0, 2.0], [2.0, 0.0]]))
        tensor([[1., 0.],
                [0., 1.]])
    """
    n = cov.shape[0]
    if cov.dim() != 2 or cov.shape != (n, n) or mean.shape != (n,):
        raise MatchingError(f"need mean (n,), cov (n, n): got {mean.shape}, {cov.shape}")
    var = torch.diagonal(cov)
    live = var > eps
    return correlation_rows(cov, 0, torch.where(live, var, torch.ones_like(var)).sqrt(), live)


def correlation_rows(cov_rows: torch.Tensor, lo: int, std: torch.Tensor,
                     live: torch.Tensor) -> torch.Tensor:
    """Rows ``lo : lo + len(cov_rows)`` of :func:`correlation`, from those rows of ``cov``, every
    feature's ``std`` (1 where not ``live``) and ``live`` (variance > eps): so a big matrix can be
    made a few rows at a time, with the same values.

    Example::

        >>> correlation_rows(torch.tensor([[2.0, 0.0]]), 1, torch.tensor([2.0, 1.0]),
        ...                  torch.tensor([True, False]))
        tensor([[0., 1.]])
    """
    hi = lo + cov_rows.shape[0]
    corr = (cov_rows / std[lo:hi, None] / std[None, :]).clamp(-1.0, 1.0)
    corr = corr * (live[lo:hi, None] & live[None, :])
    k = torch.arange(hi - lo, device=corr.device)
    corr[k, k + lo] = 1.0
    return corr


def _check_corr(corr: torch.Tensor, nA: int, nB: int) -> torch.Tensor:
    """Validate ``corr`` against the sizes; returns it unchanged."""
    if nA < 0 or nB < 0:
        raise MatchingError(f"sizes must be non-negative, got nA={nA}, nB={nB}")
    n = nA + nB
    if not isinstance(corr, torch.Tensor) or tuple(corr.shape) != (n, n):
        raise MatchingError(f"corr must be a ({n}, {n}) tensor for nA={nA}, nB={nB}")
    # a finite sum rules out inf and NaN; only an overflowing sum needs the full check
    if not corr.is_floating_point() or not (bool(torch.isfinite(corr.sum()))
                                            or bool(torch.isfinite(corr).all())):
        raise MatchingError("corr must be a finite floating-point tensor")
    return corr


def _score(corr: torch.Tensor | None, label: torch.Tensor, sizes: torch.Tensor) -> float:
    """Mean over groups g of size ≥ 2 (``label[p]`` = p's group) of mean corr[p, q], p ≠ q."""
    big = sizes >= 2
    if corr is None or not bool(big.any()):
        return math.nan if corr is None else 0.0
    n, chunk = corr.shape[0], max(1, (1 << 22) // max(corr.shape[0], 1))
    own = torch.cat([torch.where(label[lo:lo + chunk, None] == label[None, :],
                                 corr[lo:lo + chunk], 0).sum(1) for lo in range(0, n, chunk)])
    own = (own - torch.diagonal(corr)).double()
    per = torch.zeros(len(sizes), dtype=torch.float64, device=corr.device)
    per.index_add_(0, label, own)
    return float((per[big] / (sizes[big] * (sizes[big] - 1))).mean())


def _build(groups: list[tuple[int, ...]], n: int, corr: torch.Tensor | None,
           device: torch.device | str | None, dtype: torch.dtype) -> Match:
    """Assemble the ``Match`` (M, U, score) from groups ordered by their smallest member."""
    rows = torch.tensor([g for g, grp in enumerate(groups) for _ in grp], dtype=torch.long)
    cols = torch.tensor([m for grp in groups for m in grp], dtype=torch.long)
    sizes = torch.tensor([len(grp) for grp in groups], dtype=torch.float64)
    M, U = torch.zeros(len(groups), n, dtype=dtype), torch.zeros(n, len(groups), dtype=dtype)
    M[rows, cols] = (1.0 / sizes).to(dtype)[rows]
    U[cols, rows] = 1.0
    label = torch.empty(n, dtype=torch.long).index_put_((cols,), rows)
    dev = corr.device if corr is not None else "cpu"
    return Match(M.to(device), U.to(device), groups, _score(corr, label.to(dev), sizes.to(dev)))


def match_avg(nA: int, nB: int, *, corr: torch.Tensor | None = None,
              device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> Match:
    """Pair feature i of A with feature i of B (plain weight averaging).

    ``score`` is NaN unless ``corr`` is given (then device/dtype follow ``corr``).

    Example::

        >>> match_avg(2, 2).groups
        [(0, 2), (1, 3)]
    """
    if nA != nB:
        raise MatchingError(f"match_avg needs nA == nB, got {nA} and {nB}")
    if corr is not None:
        device, dtype = _check_corr(corr, nA, nB).device, corr.dtype
    return _build([(i, nA + i) for i in range(nA)], nA + nB, corr, device, dtype)


def match_keep(nA: int, nB: int, keep: str, *, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> Match:
    """Keep one model's features as they are and drop the other's (which carry no signal).

    Used for the inner features of an inserted zero block: ``keep="a"`` gives r = nA, M and U
    identity on A's features and zero on B's (design.md: such features are treated as absent).

    Example::

        >>> match_keep(2, 3, "a").groups
        [(0,), (1,)]
    """
    if keep not in ("a", "b"):
        raise MatchingError(f"keep must be 'a' or 'b', got {keep!r}")
    groups = [(i,) for i in range(nA)] if keep == "a" else [(nA + j,) for j in range(nB)]
    return _build(groups, nA + nB, None, device, dtype)


def match_permute(corr: torch.Tensor, nA: int, nB: int) -> Match:
    """Pair A and B one-to-one maximising total cross correlation (Hungarian).

    Example::

        >>> c = torch.eye(4); c[0, 3] = c[3, 0] = c[1, 2] = c[2, 1] = 0.9
        >>> match_permute(c, 2, 2).groups
        [(0, 3), (1, 2)]
    """
    _check_corr(corr, nA, nB)
    if nA != nB:
        raise MatchingError(f"match_permute needs nA == nB, got {nA} and {nB}")
    cross = corr[:nA, nA:].detach().to("cpu", torch.float64).numpy()
    rows, cols = linear_sum_assignment(cross, maximize=True)
    groups = [(int(i), nA + int(j)) for i, j in sorted(zip(rows, cols))]
    return _build(groups, nA + nB, corr, corr.device, corr.dtype)


def _zip_args(corr: torch.Tensor, nA: int, nB: int, r: int | None,
              alpha: float, beta: float) -> int:
    """Validate zip arguments; returns r."""
    _check_corr(corr, nA, nB)
    r = max(nA, nB) if r is None else r
    if not 1 <= r <= nA + nB:
        raise MatchingError(f"zip: need 1 <= r <= {nA + nB}, got r={r}")
    if not (alpha >= 0 and beta >= 0 and math.isfinite(alpha) and math.isfinite(beta)):
        raise MatchingError(f"zip: alpha and beta must be finite and >= 0, got {alpha}, {beta}")
    return r


def zip_reference(corr: torch.Tensor, nA: int, nB: int, r: int | None = None, *,
                  alpha: float = 0.5, beta: float = 0.5) -> Match:
    """Plain ZipIt loop: each step an argmax over the whole masked matrix (slow, for tests).

    Example::

        >>> c = torch.eye(4); c[0, 3] = c[3, 0] = c[1, 2] = c[2, 1] = 0.9
        >>> zip_reference(c, 2, 2).groups
        [(0, 3), (1, 2)]
    """
    r = _zip_args(corr, nA, nB, r, alpha, beta)
    st, n = ZipState(corr, nA, nB, alpha, beta), nA + nB
    upper = torch.ones(n, n, dtype=torch.bool, device=corr.device).triu(1)
    for step in range(n - r):
        valid = upper & st.alive[:, None] & st.alive[None, :] & ~st.blocked(st.cols)
        masked = st.S.masked_fill(~valid, -math.inf)
        i, j = divmod(int(torch.argmax(masked)), n)
        if not bool(valid[i, j]):
            raise MatchingError(st.stuck(step, n - r))
        st.merge(i, j)
    return _build(st.groups(), n, corr, corr.device, corr.dtype)


def match_zip(corr: torch.Tensor, nA: int, nB: int, r: int | None = None, *,
              alpha: float = 0.5, beta: float = 0.5) -> Match:
    """ZipIt greedy zipping to r features; same result as ``zip_reference``, much faster.

    Merges the most similar allowed alive pair (ties: smallest (i, j)); a merged feature's
    similarity to k becomes ``alpha * min(S[i,k], S[j,k])``; model m may merge within
    itself at most ``floor(beta * n_m)`` times. Caches each row's best partner and
    recomputes only the rows a merge affects (:class:`hmir.algorithms.zipping.FastZip`; on CPU its numpy
    twin :class:`hmir.algorithms.zipping.NumpyZip`, whose small per-step operations cost less).

    Example::

        >>> c = torch.eye(4); c[0, 3] = c[3, 0] = c[1, 2] = c[2, 1] = 0.9
        >>> match_zip(c, 2, 2, r=3).groups
        [(0, 3), (1,), (2,)]
    """
    r = _zip_args(corr, nA, nB, r, alpha, beta)
    threads = torch.get_num_threads()
    if corr.device.type == "cpu":  # tiny ops per step: more threads only stall a busy CPU
        torch.set_num_threads(1)
    try:
        st = (NumpyZip if corr.device.type == "cpu" else FastZip)(corr, nA, nB, alpha, beta)
        for step in range(st.n - r):
            pair = st.best()
            if pair is None:
                raise MatchingError(st.stuck(step, st.n - r))
            st.step(*pair)
        return _build(st.groups(), st.n, corr, corr.device, corr.dtype)
    finally:
        torch.set_num_threads(threads)
