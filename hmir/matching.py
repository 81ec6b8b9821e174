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

__all__ = ["Match", "MatchingError", "correlation", "match_avg", "match_keep", "match_permute",
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
    std = torch.where(live, var, torch.ones_like(var)).sqrt()
    corr = (cov / std[:, None] / std[None, :]).clamp(-1.0, 1.0)
    return (corr * (live[:, None] & live[None, :])).fill_diagonal_(1.0)


def _check_corr(corr: torch.Tensor, nA: int, nB: int) -> torch.Tensor:
    """Validate ``corr`` against the sizes; returns it unchanged."""
    if nA < 0 or nB < 0:
        raise MatchingError(f"sizes must be non-negative, got nA={nA}, nB={nB}")
    n = nA + nB
    if not isinstance(corr, torch.Tensor) or tuple(corr.shape) != (n, n):
        raise MatchingError(f"corr must be a ({n}, {n}) tensor for nA={nA}, nB={nB}")
    if not corr.is_floating_point() or not bool(torch.isfinite(corr).all()):
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


class _ZipState:
    """Book-keeping shared by both zip implementations: similarities, groups, budgets."""

    def __init__(self, corr: torch.Tensor, nA: int, nB: int, alpha: float, beta: float):
        dev = corr.device
        self.n, self.alpha, self.S = nA + nB, alpha, 0.5 * (corr + corr.T).detach()
        self.alive = torch.ones(self.n, dtype=torch.bool, device=dev)
        self.cols = torch.arange(self.n, device=dev)
        self.kinds = [0] * nA + [1] * nB  # 0: only A, 1: only B, 2: mixed
        self.kind = torch.tensor(self.kinds, dtype=torch.long, device=dev)
        self.members, self.used = [[k] for k in range(self.n)], [0, 0]
        self.caps = [math.floor(beta * nA + 1e-9), math.floor(beta * nB + 1e-9)]
        self.exhausted = torch.tensor([c == 0 for c in self.caps] + [False], device=dev)

    def blocked(self, rows: torch.Tensor) -> torch.Tensor:
        """(len(rows), n) mask of pairs that are within-model for an exhausted model."""
        kr = self.kind[rows]
        return (kr[:, None] == self.kind[None, :]) & self.exhausted[kr][:, None]

    def merge(self, i: int, j: int) -> int | None:
        """Merge j into i (i < j); returns the model whose budget just ran out, if any."""
        row = self.alpha * torch.minimum(self.S[i], self.S[j])
        self.S[i], self.S[:, i] = row, row  # S stays symmetric
        self.alive[j] = False
        self.members[i], self.members[j] = self.members[i] + self.members[j], []
        ki, kj = self.kinds[i], self.kinds[j]
        self.kinds[i] = ki if ki == kj else 2
        self.kind[i] = self.kinds[i]
        if ki == kj != 2:
            self.used[ki] += 1
            if self.used[ki] >= self.caps[ki]:
                self.exhausted[ki] = True
                return ki
        return None

    def stuck(self, done: int, needed: int) -> MatchingError:
        """The error for a run that cannot make the merges it needs."""
        return MatchingError(f"zip: only {done} of {needed} merges possible under the "
                             f"within-model budget {self.caps} (raise beta or r)")

    def result(self, corr: torch.Tensor) -> Match:
        """The Match of the current groups, ordered by their smallest member."""
        groups = [tuple(sorted(m)) for m in self.members if m]
        return _build(groups, self.n, corr, corr.device, corr.dtype)


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
    st, n = _ZipState(corr, nA, nB, alpha, beta), nA + nB
    upper = torch.ones(n, n, dtype=torch.bool, device=corr.device).triu(1)
    for step in range(n - r):
        valid = upper & st.alive[:, None] & st.alive[None, :] & ~st.blocked(st.cols)
        masked = st.S.masked_fill(~valid, -math.inf)
        i, j = divmod(int(torch.argmax(masked)), n)
        if not bool(valid[i, j]):
            raise st.stuck(step, n - r)
        st.merge(i, j)
    return st.result(corr)


def _refresh(st: _ZipState, rows: torch.Tensor, rowmax: torch.Tensor,
             rowarg: torch.Tensor) -> None:
    """Recompute max / first argmax over allowed alive columns c > row, for ``rows``."""
    cols, chunk = st.cols, max(1, (1 << 21) // max(st.n, 1))
    for lo in range(0, rows.numel(), chunk):
        rr = rows[lo:lo + chunk]
        ok = st.alive[None, :] & (cols[None, :] > rr[:, None]) & ~st.blocked(rr)
        sub = st.S[rr].masked_fill(~ok, -math.inf)
        best = sub.amax(dim=1)
        arg = torch.where(sub == best[:, None], cols, st.n).amin(dim=1)
        rowmax[rr] = best
        rowarg[rr] = arg.masked_fill(best == -math.inf, st.n)


def _after_merge(st: _ZipState, i: int, j: int, rowmax: torch.Tensor,
                 rowarg: torch.Tensor) -> torch.Tensor:
    """Patch the row caches for column i's new values; returns the rows to recompute."""
    rowmax[j], rowarg[j] = -math.inf, st.n
    lower = st.alive & (st.cols < i)
    shut = (st.kind == st.kind[i]) & st.exhausted[st.kind[i]]
    v = st.S[i].masked_fill(~lower | shut, -math.inf)
    # Only rows k < i can point at i; dead rows hold (-inf, n), so neither term needs a mask.
    redo = ((rowarg == i) & (v < rowmax)) | (rowarg == j)
    better = (v > -math.inf) & ((v > rowmax) | ((v == rowmax) & (rowarg > i)))
    rowmax.copy_(torch.where(better, v, rowmax))
    rowarg.masked_fill_(better, i)
    redo[i] = True
    return redo.nonzero().squeeze(1)


def match_zip(corr: torch.Tensor, nA: int, nB: int, r: int | None = None, *,
              alpha: float = 0.5, beta: float = 0.5) -> Match:
    """ZipIt greedy zipping to r features; same result as ``zip_reference``, much faster.

    Merges the most similar allowed alive pair (ties: smallest (i, j)); a merged feature's
    similarity to k becomes ``alpha * min(S[i,k], S[j,k])``; model m may merge within
    itself at most ``floor(beta * n_m)`` times. Caches each row's max over columns c > row
    and recomputes only the rows a merge affects; on CPU the loop runs on one thread.

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
        st = _ZipState(corr, nA, nB, alpha, beta)
        rowmax = torch.full((st.n,), -math.inf, dtype=corr.dtype, device=corr.device)
        rowarg = torch.full((st.n,), st.n, dtype=torch.long, device=corr.device)
        _refresh(st, st.cols, rowmax, rowarg)
        for step in range(st.n - r):
            i = int(torch.argmax(rowmax))
            j = int(rowarg[i])
            if j >= st.n:
                raise st.stuck(step, st.n - r)
            ran_out = st.merge(i, j)
            rows = _after_merge(st, i, j, rowmax, rowarg)
            if ran_out is not None:
                block = torch.nonzero(st.alive & (st.kind == ran_out)).squeeze(1)
                rows = torch.unique(torch.cat([rows, block]))
            _refresh(st, rows, rowmax, rowarg)
        return st.result(corr)
    finally:
        torch.set_num_threads(threads)
