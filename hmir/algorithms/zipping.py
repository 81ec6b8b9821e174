"""The state machines behind :func:`hmir.algorithms.matching.zip_reference` and :func:`hmir.algorithms.matching.match_zip`.

Both zip the stacked features greedily (ZipIt): merge the most similar allowed pair of alive
features (ties: the smallest ``(i, j)``), give the merged feature the similarity
``alpha * min(S[i, k], S[j, k])`` to every ``k``, and allow model m at most
``floor(beta * n_m)`` merges within itself. :class:`ZipState` keeps the book (groups, kinds,
budgets); :class:`FastZip` adds what makes each step cheap: ``S`` holds ``-inf`` on its
diagonal and on merged-away features, so a row's best partner is a plain ``max`` over the row,
cached per row and recomputed only for the rows a merge touches.

Example::

    >>> c = torch.eye(4); c[0, 3] = c[3, 0] = c[1, 2] = c[2, 1] = 0.9
    >>> st = FastZip(c, 2, 2, alpha=0.5, beta=0.5)
    >>> st.best()
    (0, 3)
    >>> st.step(0, 3); st.best()
    (1, 2)
"""
from __future__ import annotations

import math

import numpy as np
import torch

_BLOCK = 512        # tile edge of the cache-friendly transpose in :func:`symmetric`


def symmetric(corr: torch.Tensor) -> torch.Tensor:
    """``0.5 * (corr + corr.T)`` (bit for bit), tile by tile on CPU: the plain transposed add
    reads one operand column-wise and is about twice slower at n = 4096.

    Example::

        >>> symmetric(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
        tensor([[1., 1.],
                [1., 1.]])
    """
    corr = corr.detach()
    n = corr.shape[0]
    if corr.device.type != "cpu" or n <= _BLOCK:
        return 0.5 * (corr + corr.T)
    out = torch.empty_like(corr)
    for i in range(0, n, _BLOCK):
        for j in range(0, n, _BLOCK):
            torch.add(corr[i:i + _BLOCK, j:j + _BLOCK], corr[j:j + _BLOCK, i:i + _BLOCK].T,
                      out=out[i:i + _BLOCK, j:j + _BLOCK])
    return out.mul_(0.5)


def _book(st, i: int, j: int) -> int | None:
    """Groups, kinds and budgets after merging j into i (any of the zip states); returns the
    model whose within-model budget just ran out, if any."""
    st.members[i], st.members[j] = st.members[i] + st.members[j], []
    ki, kj = st.kinds[i], st.kinds[j]
    st.kinds[i] = st.kind[i] = ki if ki == kj else 2
    if ki == kj != 2:
        st.used[ki] += 1
        if st.used[ki] >= st.caps[ki]:
            st.exhausted[ki], st.spent[ki] = True, True
            return ki
    return None


class ZipState:
    """Book-keeping shared by both zip implementations: similarities, groups, budgets."""

    def __init__(self, corr: torch.Tensor, nA: int, nB: int, alpha: float, beta: float):
        dev = corr.device
        self.n, self.alpha, self.S = nA + nB, alpha, symmetric(corr)
        self.alive = torch.ones(self.n, dtype=torch.bool, device=dev)
        self.cols = torch.arange(self.n, device=dev)
        self.kinds = [0] * nA + [1] * nB  # 0: only A, 1: only B, 2: mixed
        self.kind = torch.tensor(self.kinds, dtype=torch.long, device=dev)
        self.members, self.used = [[k] for k in range(self.n)], [0, 0]
        self.caps = [math.floor(beta * nA + 1e-9), math.floor(beta * nB + 1e-9)]
        self.spent = [c == 0 for c in self.caps]
        self.exhausted = torch.tensor(self.spent + [False], device=dev)

    def blocked(self, rows: torch.Tensor) -> torch.Tensor:
        """(len(rows), n) mask of pairs that are within-model for an exhausted model."""
        kr = self.kind[rows]
        return (kr[:, None] == self.kind[None, :]) & self.exhausted[kr][:, None]

    def write(self, i: int, j: int, row: torch.Tensor) -> None:
        """Store the merged feature's similarities (j has just died)."""
        self.S[i], self.S[:, i] = row, row  # S stays symmetric

    def merge(self, i: int, j: int) -> int | None:
        """Merge j into i (i < j); returns the model whose budget just ran out, if any."""
        self.alive[j] = False
        self.write(i, j, self.alpha * torch.minimum(self.S[i], self.S[j]))
        return _book(self, i, j)

    def stuck(self, done: int, needed: int) -> str:
        """The message for a run that cannot make the merges it needs."""
        return (f"zip: only {done} of {needed} merges possible under the within-model budget "
                f"{self.caps} (raise beta or r)")

    def groups(self) -> list[tuple[int, ...]]:
        """The current groups, ordered by their smallest member."""
        return [tuple(sorted(m)) for m in self.members if m]


class FastZip(ZipState):
    """:class:`ZipState` with each row's best allowed partner cached (``rowmax``, ``rowarg``).

    Invariant: row k of ``S`` is ``-inf`` at ``c == k``, everywhere if k is dead, and at every
    c that was dead when the row was last written; elsewhere it holds the true similarity
    (blocked pairs included: merges still need their values). Rows read for the caches are
    masked with ``dead`` (cheaper than writing dead columns, which are strided). And
    ``rowmax[k]``/``rowarg[k]`` are the max and first argmax of row k over its allowed alive
    partners (``(-inf, n)`` when it has none). As S is symmetric on alive pairs, the first row holding the
    global max and that row's first argmax are the smallest ``(i, j)``, i < j, of the reference.
    """

    def __init__(self, corr: torch.Tensor, nA: int, nB: int, alpha: float, beta: float):
        super().__init__(corr, nA, nB, alpha, beta)
        self.dead = ~self.alive
        self.S.fill_diagonal_(-math.inf)
        self.rowmax = torch.full((self.n,), -math.inf, dtype=self.S.dtype, device=self.S.device)
        self.rowarg = torch.full((self.n,), self.n, dtype=torch.long, device=self.S.device)
        self.refresh(self.cols)

    def best(self) -> tuple[int, int] | None:
        """The pair to merge next, or None when no allowed pair is left."""
        i = int(torch.argmax(self.rowmax))
        j = int(self.rowarg[i])
        return None if j >= self.n else (i, j)

    def write(self, i: int, j: int, row: torch.Tensor) -> None:
        self.dead[j] = True
        row.masked_fill_(self.dead, -math.inf)      # also clears 0 · -inf = NaN when alpha = 0
        row[i] = -math.inf
        self.S[i], self.S[:, i] = row, row
        self.S[j] = -math.inf

    def step(self, i: int, j: int) -> None:
        """Merge j into i and bring the row caches up to date."""
        ran_out = self.merge(i, j)
        rows = self._patch(i, j)
        if ran_out is not None:       # rows of that model may point at a now-blocked partner
            rows = torch.unique(torch.cat([rows, torch.nonzero(self.alive & (self.kind == ran_out))
                                           .squeeze(1)]))
        self.refresh(rows)

    def _patch(self, i: int, j: int) -> torch.Tensor:
        """Update the caches for column i's new values; returns the rows to recompute."""
        self.rowmax[j], self.rowarg[j] = -math.inf, self.n
        v, k = self.S[i], self.kinds[i]
        if k < 2 and self.spent[k]:
            v = v.masked_fill(self.kind == k, -math.inf)
        rowmax, rowarg = self.rowmax, self.rowarg
        redo = ((rowarg == i) & (v < rowmax)) | (rowarg == j)
        better = (v > rowmax) | ((v == rowmax) & (rowarg > i) & (v > -math.inf))
        self.rowmax = torch.where(better, v, rowmax)
        rowarg.masked_fill_(better, i)
        redo[i] = True
        return redo.nonzero().squeeze(1)

    def refresh(self, rows: torch.Tensor) -> None:
        """Recompute the caches of ``rows`` from S (masking blocked pairs once a budget is spent)."""
        chunk = max(1, (1 << 21) // max(self.n, 1))
        for lo in range(0, rows.numel(), chunk):
            rr = rows[lo:lo + chunk]
            sub = self.S.index_select(0, rr).masked_fill_(self.dead, -math.inf)
            if any(self.spent):
                sub.masked_fill_(self.blocked(rr), -math.inf)
            best, arg = sub.max(dim=1)                # first argmax (documented)
            self.rowmax[rr] = best
            self.rowarg[rr] = arg.masked_fill_(best == -math.inf, self.n)


class NumpyZip:
    """:class:`FastZip` on numpy arrays, for the CPU: the same steps and the same groups.

    A zip step is about fifteen operations on rows of at most n entries; numpy runs each in a
    microsecond or two where torch's dispatch alone takes several, so on the CPU this is
    ~3x faster for the widths of real networks (n ≤ 4096). The state lives in numpy views of
    the float32 similarity (no copy of ``S`` beyond :func:`symmetric`).

    Example::

        >>> c = torch.eye(4); c[0, 3] = c[3, 0] = c[1, 2] = c[2, 1] = 0.9
        >>> st = NumpyZip(c, 2, 2, alpha=0.5, beta=0.5)
        >>> st.best()
        (0, 3)
        >>> st.step(0, 3); st.best(), st.groups()
        ((1, 2), [(0, 3), (1,), (2,)])
    """

    def __init__(self, corr: torch.Tensor, nA: int, nB: int, alpha: float, beta: float):
        S = symmetric(corr).numpy()
        self.n, self.S = nA + nB, S
        self.alpha = S.dtype.type(alpha)        # torch multiplies by the scalar in S's dtype
        self.dead = np.zeros(self.n, dtype=bool)
        self.kinds = [0] * nA + [1] * nB        # 0: only A, 1: only B, 2: mixed
        self.kind = np.array(self.kinds, dtype=np.int64)
        self.members, self.used = [[k] for k in range(self.n)], [0, 0]
        self.caps = [math.floor(beta * nA + 1e-9), math.floor(beta * nB + 1e-9)]
        self.spent = [c == 0 for c in self.caps]
        self.exhausted = np.array(self.spent + [False])
        np.fill_diagonal(S, -np.inf)
        self.rowmax = np.full(self.n, -np.inf, dtype=S.dtype)
        self.rowarg = np.full(self.n, self.n, dtype=np.int64)
        self.refresh(np.arange(self.n))

    def best(self) -> tuple[int, int] | None:
        """The pair to merge next, or None when no allowed pair is left."""
        i = int(np.argmax(self.rowmax))
        j = int(self.rowarg[i])
        return None if j >= self.n else (i, j)

    def step(self, i: int, j: int) -> None:
        """Merge j into i and bring the row caches up to date."""
        ran_out = self._merge(i, j)
        rows = self._patch(i, j)
        if ran_out is not None:       # rows of that model may point at a now-blocked partner
            rows = np.union1d(rows, np.flatnonzero(~self.dead & (self.kind == ran_out)))
        self.refresh(rows)

    def _merge(self, i: int, j: int) -> int | None:
        S, dead = self.S, self.dead
        with np.errstate(invalid="ignore"):     # 0 · -inf when alpha = 0, masked below
            row = self.alpha * np.minimum(S[i], S[j])
        dead[j] = True
        row[dead] = -np.inf                     # also clears 0 · -inf = NaN when alpha = 0
        row[i] = -np.inf
        S[i], S[:, i], S[j] = row, row, -np.inf
        return _book(self, i, j)

    def _patch(self, i: int, j: int) -> np.ndarray:
        """Update the caches for column i's new values; returns the rows to recompute."""
        self.rowmax[j], self.rowarg[j] = -np.inf, self.n
        v, k = self.S[i], self.kinds[i]
        if k < 2 and self.spent[k]:
            v = np.where(self.kind == k, -np.inf, v).astype(self.S.dtype)
        rowmax, rowarg = self.rowmax, self.rowarg
        redo = ((rowarg == i) & (v < rowmax)) | (rowarg == j)
        better = (v > rowmax) | ((v == rowmax) & (rowarg > i) & (v > -np.inf))
        np.copyto(rowmax, v, where=better)
        rowarg[better] = i
        redo[i] = True
        return np.flatnonzero(redo)

    def refresh(self, rows: np.ndarray) -> None:
        """Recompute the caches of ``rows`` from S (masking blocked pairs once a budget is spent)."""
        chunk = max(1, (1 << 21) // max(self.n, 1))
        for lo in range(0, len(rows), chunk):
            rr = rows[lo:lo + chunk]
            sub = self.S[rr]
            sub[:, self.dead] = -np.inf
            if any(self.spent):
                kr = self.kind[rr]
                sub[(kr[:, None] == self.kind[None, :]) & self.exhausted[kr][:, None]] = -np.inf
            arg = sub.argmax(axis=1)
            best = sub[np.arange(len(rr)), arg]
            arg[best == -np.inf] = self.n
            self.rowmax[rr], self.rowarg[rr] = best, arg

    def stuck(self, done: int, needed: int) -> str:
        """The message for a run that cannot make the merges it needs."""
        return (f"zip: only {done} of {needed} merges possible under the within-model budget "
                f"{self.caps} (raise beta or r)")

    def groups(self) -> list[tuple[int, ...]]:
        """The current groups, ordered by their smallest member."""
        return [tuple(sorted(m)) for m in self.members if m]
