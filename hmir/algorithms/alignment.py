"""Depth alignment of one stage: where each unit of the shallower model sits in the deeper one.

``C`` is the ``(mA × mB)`` similarity of the stage's units, ``C[j, i] = CKA(A unit j, B unit i)``.
The deeper model has ``m`` units, the shallower ``n ≤ m``; ``D`` is ``C`` oriented deeper ×
shallower. An alignment ``G`` is strictly increasing with ``G[0] = 0`` and ``G[n-1] = m-1``
(``G = (0,)`` when ``n == 1``). Deep positions not in ``G`` get an inserted identity/zero unit that
carries the output of shallow unit ``i(j) = max{i : G[i] < j}``.

* ``sma`` maximises ``Σ_i D[G[i], i]``;
* ``lma`` maximises ``Σ_i D[G[i], i] + Σ_{j∉G} D[j, i(j)]``;
* ``uniform`` spaces ``G`` evenly.

Among equally good alignments the lexicographically smallest ``G`` is returned.

Example::

    >>> import numpy as np
    >>> align(np.array([[1., 0.], [0.9, 0.], [0., 1.]]), "lma").positions
    (0, 2)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hmir.errors import MergeError

__all__ = ["METHODS", "Alignment", "align", "objective", "uniform_positions"]

METHODS = ("sma", "lma", "uniform")


@dataclass(frozen=True)
class Alignment:
    """The depth alignment of one stage (see the module docstring).

    Example::

        >>> a = Alignment("lma", "a", (0, 2), m=3, n=2, score=2.9)
        >>> a.inserted(), a.source(1)
        ((1,), 0)
    """

    method: str
    deeper: str
    positions: tuple[int, ...]
    m: int
    n: int
    score: float

    def inserted(self) -> tuple[int, ...]:
        """Deep positions not in ``G``, e.g. ``(1, 2)`` for ``G = (0, 3)``, ``m = 4``."""
        placed = set(self.positions)
        return tuple(j for j in range(self.m) if j not in placed)

    def source(self, j: int) -> int:
        """The shallow unit whose output is present at deep position ``j`` (``i`` for ``G[i]``).

        Example::

            >>> Alignment("sma", "b", (0, 3), m=4, n=2, score=0.0).source(2)
            0
        """
        if not 0 <= j < self.m:
            raise MergeError(f"deep position {j} is outside 0..{self.m - 1}")
        return max(i for i, g in enumerate(self.positions) if g <= j)


def _as_matrix(C) -> np.ndarray:
    """``C`` as a finite, non-empty 2-D float64 numpy array, or a MergeError."""
    if hasattr(C, "detach"):
        C = C.detach().cpu().double().numpy()
    try:
        arr = np.asarray(C, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise MergeError(f"similarity matrix is not numeric: {e}") from e
    if arr.ndim != 2 or arr.size == 0:
        raise MergeError(f"similarity matrix must be non-empty 2-D (mA × mB), "
                         f"got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise MergeError(f"similarity matrix of shape {arr.shape} has non-finite entries")
    return arr


def _check_method(method: str, allowed=METHODS) -> None:
    if method not in allowed:
        raise MergeError(f"unknown depth alignment method {method!r}; valid: {', '.join(allowed)}")


def _check_positions(G, m: int, n: int) -> None:
    ok = len(G) == n and G[0] == 0 and all(a < b for a, b in zip(G, G[1:]))
    if ok and n >= 2:
        ok = G[-1] == m - 1
    if not ok:
        raise MergeError(f"{tuple(G)} is not an alignment of {n} units into {m} positions")


def objective(D, G, method: str) -> float:
    """The SMA or LMA objective of alignment ``G`` on ``D`` (deeper × shallower).

    Example::

        >>> D = np.array([[1., 0.], [0.5, 0.2], [0., 1.]])
        >>> objective(D, (0, 2), "sma"), objective(D, (0, 2), "lma")
        (2.0, 2.5)
    """
    _check_method(method, ("sma", "lma"))
    D = _as_matrix(D)
    m, n = D.shape
    G = tuple(int(g) for g in G)
    _check_positions(G, m, n)
    total = sum(float(D[g, i]) for i, g in enumerate(G))
    if method == "lma":
        placed, i = set(G), 0
        for j in range(m):
            if j in placed:
                i = G.index(j)
            else:
                total += float(D[j, i])
    return total


def uniform_positions(m: int, n: int) -> tuple[int, ...]:
    """Evenly spaced ``G[i] = floor(i·(m-1)/(n-1) + 1/2)`` in exact integer arithmetic.

    Strictly increasing since the step ``(m-1)/(n-1) ≥ 1`` when ``m ≥ n``.

    Example::

        >>> uniform_positions(7, 3), uniform_positions(5, 1)
        ((0, 3, 6), (0,))
    """
    if not 1 <= n <= m:
        raise MergeError(f"cannot place {n} units into {m} positions")
    if n == 1:
        return (0,)
    return tuple((2 * i * (m - 1) + (n - 1)) // (2 * (n - 1)) for i in range(n))


def _dp_positions(D: np.ndarray, method: str) -> tuple[int, ...]:
    """Lexicographically smallest optimal ``G`` by a suffix DP over ``c(j)``.

    ``c(j)`` is the shallow unit whose output is present at deep position ``j``: ``c(0) = 0``,
    each step stays or advances by one, and ``G[i]`` is where ``c`` first equals ``i``.
    ``V[j, i]`` is the best value of positions ``j+1 .. m-1`` given ``c(j) = i``. A forward pass
    that prefers advancing on exact ties yields the largest ``c``, i.e. the smallest ``G``.
    """
    m, n = D.shape
    stay_gain = D if method == "lma" else np.zeros_like(D)
    V = np.full((m, n), -np.inf)
    V[m - 1, n - 1] = 0.0
    advance = np.zeros((m, n), dtype=bool)
    for j in range(m - 2, -1, -1):
        stay = stay_gain[j + 1] + V[j + 1]
        if n >= 2:
            stay[n - 1] = -np.inf          # the last shallow unit sits at the last position
        adv = np.full(n, -np.inf)
        adv[:-1] = D[j + 1, 1:] + V[j + 1, 1:]
        advance[j] = adv >= stay
        V[j] = np.where(advance[j], adv, stay)
    G, i = [0], 0
    for j in range(m - 1):
        if advance[j, i]:
            i += 1
            G.append(j + 1)
    return tuple(G)


def align(C, method: str) -> Alignment:
    """Align the units of one stage; ``C`` is ``(mA × mB)``, either model may be deeper.

    Example::

        >>> C = np.array([[1., 0.1, 0.], [0., 0.2, 1.]])      # A has 2 units, B has 3
        >>> a = align(C, "sma")
        >>> a.deeper, a.positions, a.inserted(), a.score
        ('b', (0, 2), (1,), 2.0)
    """
    _check_method(method)
    C = _as_matrix(C)
    mA, mB = C.shape
    deeper = "a" if mA > mB else "b" if mA < mB else "equal"
    D = C.T if deeper == "b" else C
    m, n = D.shape
    if m == n:
        G = tuple(range(n))
    elif method == "uniform":
        G = uniform_positions(m, n)
    else:
        G = _dp_positions(D, method)
    score = objective(D, G, "sma" if method == "sma" else "lma")
    return Alignment(method, deeper, G, m=m, n=n, score=score)
