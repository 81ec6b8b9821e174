"""The default similarity of the match pass: activation correlation plus a tiny weight tie-break.

``similarity = corr + tie · cos(w_p, w_q)``, where ``w_p`` is unit p's producer entries (every
"out" slice of its space: conv/linear rows, biases, norm parameters and statistics), each slice
sorted so that the descriptor does not depend on how the unit's *input* space is ordered, then
centred and normalised. It separates units the calibration data cannot tell apart (dead units
have correlation 0 with every unit, even their twin).

*Twins* — a unit of A and a unit of B whose sorted producer entries are equal byte for byte
(a unit and its copy in a permuted or identical model) — get a further ``tie`` on top. With
few calibration samples and many features, many pairs have correlation 1 up to rounding, and
sorted random-init rows are nearly all alike (cosine ≈ 1), so only exact identity tells a
twin from a look-alike: this is what makes merge(A, A) = A whatever the data. The rows of A and B are written into one
stacked buffer and ``w·wᵀ`` is formed from the blocks on and above the diagonal; the values are
the same, bit for bit, as stacking, centring and multiplying the plain way.

Example::

    >>> corr = torch.eye(4)
    >>> wa, wb = torch.tensor([[1.0, 2.0], [3.0, 1.0]]), torch.tensor([[3.0, 1.0], [1.0, 2.0]])
    >>> S = similarity(corr, wa, wb, 1e-3)
    >>> bool(S[0, 3] > S[0, 2]), round(float(S[0, 3]), 6)      # cosine 1, and twins: 2 x tie
    (True, 0.002)
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from hmir.ir import MergeIR, Space
from hmir.ir.slicing import slice_index

__all__ = ["producer_rows", "row_length", "similarity", "stacked_similarity", "twin_pairs"]


def _unit_rows(sl, n: int, t: torch.Tensor) -> torch.Tensor:
    """The slice's entries of ``t`` (already moved so ``sl.dim`` is dim 0), one row per unit."""
    if sl.outer == 1 and sl.inner == 1:                  # a contiguous run of units: no gather
        return t.narrow(0, sl.offset, n).reshape(n, -1)
    idx = slice_index(sl, n).permute(1, 0, 2).reshape(-1)     # unit-major (n, outer, inner)
    return t.index_select(0, idx.to(t.device)).reshape(n, -1)


def _sort_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row sorted ascending; on CPU by numpy (SIMD sort, about 4x torch's), same values.
    An all-zero slice (an inserted zero block's weights) is already sorted."""
    if x.numel() and not bool(x.reshape(-1)[0]) and not bool(x.any()):
        return x
    if x.device.type != "cpu":
        return x.sort(dim=1).values
    return torch.from_numpy(np.sort(x.numpy(), axis=1))


def _fill_rows(s: Space, state: dict[str, torch.Tensor], out: torch.Tensor,
               digests: list | None = None) -> None:
    """Write :func:`producer_rows` of ``s`` into ``out`` (n × D, float32), slice by slice;
    with ``digests`` (one hash object per unit), feed each unit's sorted row to its hash."""
    col = 0
    for sl in s.producers():
        t = state[sl.param].float().movedim(sl.dim, 0)
        rows = _sort_rows(_unit_rows(sl, s.n, t).to(out.device))
        _digest(rows, digests)
        out[:, col:col + rows.shape[1]] = rows
        col += rows.shape[1]


def _digest(rows: torch.Tensor, digests: list | None) -> None:
    """Feed row i's bytes to ``digests[i]`` (no-op without digests)."""
    if digests is None:
        return
    arr = rows.detach().cpu().contiguous().numpy()
    for h, row in zip(digests, arr):
        h.update(row.tobytes())


def _new_digests(n: int) -> list:
    return [hashlib.blake2b(digest_size=16) for _ in range(n)]


def twin_pairs(da: list, db: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs ``(p, q)`` where unit p of A and unit q of B have equal digests.

    >>> import hashlib
    >>> h = lambda b: hashlib.blake2b(b, digest_size=16)
    >>> twin_pairs([h(b"x"), h(b"y")], [h(b"y"), h(b"z"), h(b"y")])
    (tensor([1, 1]), tensor([0, 2]))
    """
    where: dict[bytes, list[int]] = {}
    for q, h in enumerate(db):
        where.setdefault(h.digest(), []).append(q)
    pairs = [(p, q) for p, h in enumerate(da) for q in where.get(h.digest(), ())]
    if not pairs:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    p, q = torch.tensor(pairs, dtype=torch.long).T
    return p, q


def _add_twins(S: torch.Tensor, da: list, db: list, tie: float) -> torch.Tensor:
    """``S`` (over the stacked units of A then B) with ``tie`` added to every twin pair."""
    p, q = twin_pairs(da, db)
    if len(p):
        q = q + len(da)
        S[p, q] += tie
        S[q, p] += tie
    return S


def producer_rows(ir: MergeIR, s: Space, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each unit's producer entries (every "out" slice), sorted per slice: (n, D). (``ir``, the
    space's model, is not needed; it stays for callers of the earlier signature.)

    Sorting makes the descriptor independent of how the unit's *input* space is ordered,
    so a unit and its twin in a permuted copy get identical rows.
    """
    some = state[s.producers()[0].param]
    out = torch.empty(s.n, row_length(s, state), dtype=torch.float32, device=some.device)
    _fill_rows(s, state, out)
    return out


def similarity(corr: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, tie: float) -> torch.Tensor:
    """Activation correlation plus ``tie`` × producer-weight cosine similarity.

    The weight term breaks ties between units the calibration data cannot tell apart
    (dead units have zero variance, hence correlation 0 with every unit, even their twin).
    """
    if tie == 0 or wa.shape[1] != wb.shape[1]:
        return corr
    da, db = _new_digests(len(wa)), _new_digests(len(wb))
    _digest(wa.float(), da)
    _digest(wb.float(), db)
    return _add_twins(_add_cosine(corr, torch.cat([wa, wb]).to(corr), tie), da, db, tie)


def _add_cosine(corr: torch.Tensor, w: torch.Tensor, tie: float) -> torch.Tensor:
    """``corr + tie * cos(w_p, w_q)`` of the centred rows of ``w`` (overwritten), a new tensor."""
    w -= w.mean(1, keepdim=True)
    w /= w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return _gram(w).mul_(tie).add_(corr)


def _gram(w: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """``w @ w.T``; on CPU from the blocks on and above the diagonal only (up to 8 × 8 blocks
    of >= ``rows`` rows), mirroring the rest: ~35 % fewer flops for wide spaces. Each entry is
    still one dot product over the same ``D`` entries (bit-identical to ``w @ w.T`` with the
    BLAS measured here)."""
    n, nb = w.shape[0], min(8, w.shape[0] // rows)
    if w.device.type != "cpu" or nb < 2:
        return w @ w.T
    out = torch.empty(n, n, dtype=w.dtype)
    edges = [k * n // nb for k in range(nb + 1)]
    for a in range(nb):
        ra = slice(edges[a], edges[a + 1])
        for b in range(a, nb):
            rb = slice(edges[b], edges[b + 1])
            torch.mm(w[ra], w[rb].T, out=out[ra, rb])
            if b != a:
                out[rb, ra] = out[ra, rb].T
    return out


def row_length(s: Space, state: dict[str, torch.Tensor]) -> int:
    """Entries per unit of :func:`producer_rows`, from shapes alone."""
    return sum(_slice_lengths(s, state))


QUANTILES = 64     # sorted entries kept per slice and unit by :func:`stacked_similarity`


def _sample_index(length: int, q: int) -> torch.Tensor | None:
    """Midpoints of ``q`` equal bins of a sorted row of ``length`` entries (None: keep all)."""
    if length <= q:
        return None
    return (torch.arange(q) * 2 + 1) * length // (2 * q)


def _fill_sampled(s: Space, state: dict[str, torch.Tensor], out: torch.Tensor, q: int,
                  weight: torch.Tensor, digests: list) -> torch.Tensor:
    """Each slice's sorted rows sampled at ``q`` quantiles into ``out`` (``weight``: how many
    entries each sampled column stands for); returns each unit's sum over its full row. Each
    unit's full sorted rows go into its digest."""
    col, sums = 0, torch.zeros(s.n, dtype=out.dtype, device=out.device)
    for sl in s.producers():
        t = state[sl.param].float().movedim(sl.dim, 0)
        rows = _unit_rows(sl, s.n, t).to(out.device)
        sums += rows.sum(1)
        idx = _sample_index(rows.shape[1], q)
        rows = _sort_rows(rows)
        _digest(rows, digests)
        if idx is not None:
            weight[col:col + len(idx)] = rows.shape[1] / q
            rows = rows.index_select(1, idx.to(rows.device))
        out[:, col:col + rows.shape[1]] = rows
        col += rows.shape[1]
    return sums


def stacked_similarity(corr: torch.Tensor, spaces: tuple[Space, Space], states: tuple[dict, dict],
                       tie: float, quantiles: int | None = QUANTILES) -> torch.Tensor:
    """:func:`similarity` of the paired spaces ``(sa, sb)`` of A and B (rows of equal length).

    ``quantiles=None`` uses the full sorted rows, written straight into one stacked float32
    buffer. With ``quantiles=q`` (the default, 64) each slice's sorted row longer than q is
    sampled at the midpoints of q equal bins and weighted by the entries each sample stands
    for: the cosine of two sorted rows is an integral of the product of two quantile
    functions, and q samples per slice approximate it (centred on the full row's mean) at a
    fraction of the cost: the Gram of a 1024-unit space over 14k-entry rows becomes one over
    ~700 columns. Identical units still get identical descriptors (cosine 1), and twins (equal
    full sorted rows) get ``tie`` more.

    The sampled positions of a 10-entry sorted row at q = 4: ``_sample_index(10, 4)`` is
    ``tensor([1, 3, 6, 8])``, each standing for 2.5 entries.
    """
    sa, sb = spaces
    da, db = _new_digests(sa.n), _new_digests(sb.n)
    if quantiles is None:
        w = torch.empty(sa.n + sb.n, row_length(sa, states[0]), dtype=corr.dtype, device=corr.device)
        _fill_rows(sa, states[0], w[:sa.n], da)
        _fill_rows(sb, states[1], w[sa.n:], db)
        return _add_twins(_add_cosine(corr, w, tie), da, db, tie)
    cols = sum(min(state_len, quantiles) for state_len in _slice_lengths(sa, states[0]))
    w = torch.empty(sa.n + sb.n, cols, dtype=corr.dtype, device=corr.device)
    weight = torch.ones(cols, dtype=corr.dtype, device=corr.device)
    sums = torch.cat([_fill_sampled(sa, states[0], w[:sa.n], quantiles, weight, da),
                      _fill_sampled(sb, states[1], w[sa.n:], quantiles, weight, db)])
    w -= (sums / row_length(sa, states[0]))[:, None]
    w *= weight.sqrt()[None, :]
    w /= w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return _add_twins(_gram(w).mul_(tie).add_(corr), da, db, tie)


def _slice_lengths(s: Space, state: dict[str, torch.Tensor]) -> list[int]:
    """Entries per unit of each producer slice of ``s``."""
    return [state[sl.param].numel() // state[sl.param].shape[sl.dim] * sl.outer * sl.inner
            for sl in s.producers()]
