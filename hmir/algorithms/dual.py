"""Dual-space similarity (MuDSC): match each space on ``α·S_act + (1−α)·S_weight``.

``S_act`` is the activation correlation of the stacked features ``[A's; B's]`` (from
:class:`~hmir.passes.observe.SpaceStats`). ``S_weight`` compares each unit's *weight
vector*: the rows of every producer ("out") slice of the space (conv/linear rows, biases,
norm parameters and statistics) after every other feature dim of those tensors has been
mapped into the merged basis by the current match of its space (``W_side · U_side``, as
the fuse pass does). So a row of A's unit and a row of B's unit have equal length and
comparable entries even when the widths differ; within-model blocks (A vs A, B vs B) come
from the same stacked rows, so zip gets the full ``(nA+nB)²`` similarity.

Matching a space changes the basis of the spaces that read it, so the match pass sweeps
over the spaces in order until no match changes (at most ``max_sweeps``). In the first
sweep a dim whose space is not matched yet is made order-free instead: its entries are
sorted (and linearly resampled to A's width when the widths differ).

``similarity_alpha`` is not ZipIt's ``alpha`` (the decay of a merged feature's
similarity); it is the share of the activation term: 1 = activations only, 0 = weights only.

Example::

    >>> from hmir.algorithms.matching import match_avg, match_permute
    >>> from hmir.frontends import lower
    >>> from hmir.harness import zoo
    >>> from hmir.ir.pairing import pair_spaces
    >>> _ = torch.manual_seed(0)
    >>> a, b = zoo.mlp(4, (6,), 2), zoo.mlp(4, (6,), 2)
    >>> perm = [2, 0, 5, 1, 4, 3]                    # B's hidden unit j is A's unit perm[j]
    >>> b.load_state_dict({"1.weight": a[1].weight[perm], "1.bias": a[1].bias[perm],
    ...                    "3.weight": a[3].weight[:, perm], "3.bias": a[3].bias})
    <All keys matched successfully>
    >>> irs = lower(a, torch.randn(2, 4)), lower(b, torch.randn(2, 4))
    >>> pairs = pair_spaces(*irs)                    # input, hidden, output
    >>> matches = [match_avg(4, 4), None, match_avg(2, 2)]       # the fixed spaces: identity
    >>> run = dual_sweeps(irs, pairs, lambda k: torch.eye(12), [1], matches,
    ...                   lambda k, sim: match_permute(sim, 6, 6),
    ...                   (a.state_dict(), b.state_dict()), alpha=0.0)   # weights only
    >>> run.sweeps, run.converged
    (2, True)
    >>> [j - 6 for _, j in matches[1].groups]       # A's unit i has found B's unit perm⁻¹[i]
    [1, 3, 0, 5, 4, 2]
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from hmir.errors import MergeError
from hmir.ir import MergeIR, Slice, Space
from hmir.algorithms.matching import Match
from hmir.ir.slicing import apply_units, expand_grouped, slice_extent, slice_index
from hmir.ir.ties import tensor_slices

__all__ = ["check_similarity_alpha", "WeightBasis", "weight_similarity", "dual_sweeps", "Sweeps"]


def check_similarity_alpha(alpha, method: str) -> None:
    """``None`` or a float in [0, 1], and a method that uses similarities.

    Example::

        >>> check_similarity_alpha(0.5, "zip")
        >>> check_similarity_alpha(1.5, "zip")   # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        hmir.errors.MergeError: similarity_alpha must be None or a number in [0, 1], got 1.5 ...
    """
    if alpha is None:
        return
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise MergeError(f"similarity_alpha must be None or a number in [0, 1], got {alpha!r} "
                         f"(the activation share of the dual-space similarity; ZipIt's decay is "
                         f"'alpha')")
    if method == "avg":
        raise MergeError("similarity_alpha has no effect with method='avg' (no matching): use "
                         "method='permute' or 'zip'")


def _resample(part: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """Linearly resample ``part`` along ``dim`` to ``length`` entries (order-free summaries)."""
    if part.shape[dim] == length:
        return part
    x = part.movedim(dim, -1)
    flat = x.reshape(-1, 1, x.shape[-1])
    out = F.interpolate(flat, size=length, mode="linear", align_corners=True)
    return out.reshape(*x.shape[:-1], length).movedim(-1, dim)


class WeightBasis:
    """The current matches of all pairs, and each model's tensors mapped into the merged basis.

    ``matches[k]`` is None while pair k is unmatched (its dims are then sorted).
    """

    def __init__(self, irs: tuple[MergeIR, MergeIR], pairs, matches: list[Match | None],
                 states: tuple[dict, dict]) -> None:
        self.irs, self.pairs, self.matches, self.states = irs, pairs, matches, states
        self.pair_of = ({p.a: k for k, p in enumerate(pairs)}, {p.b: k for k, p in enumerate(pairs)})
        self.n_a = [irs[0].space(p.a).n for p in pairs]
        # one slice per region of each tensor (a tied tensor as one of its readers reads it)
        self.slices: tuple[dict, dict] = (tensor_slices(irs[0]), tensor_slices(irs[1]))

    def _map_dim(self, side: int, t: torch.Tensor, slices: list[Slice]) -> torch.Tensor:
        """Every slice of one dim into the merged basis (or sorted, while unmatched)."""
        parts = []
        for sl in sorted(slices, key=lambda x: x.offset):
            ir = self.irs[side]
            k, n = self.pair_of[side][sl.space], ir.space(sl.space).n
            m = self.matches[k]
            if m is None:
                part = t.narrow(sl.dim, sl.offset, slice_extent(sl, n)).sort(dim=sl.dim).values
                parts.append(_resample(part, sl.dim, slice_extent(sl, self.n_a[k])))
                continue
            cols = slice(0, self.n_a[k]) if side == 0 else slice(self.n_a[k], None)
            mat = m.M[:, cols] if sl.role == "out" else m.U[cols, :].T
            parts.append(apply_units(t, replace(sl, grouped=False), n, mat.to(t)))
        return torch.cat(parts, slices[0].dim) if len(parts) > 1 else parts[0]

    def rows(self, side: int, sl: Slice, n: int) -> torch.Tensor:
        """Unit rows (n, D) of one producer slice, its other feature dims in the merged basis."""
        t = self.states[side][sl.param].detach().float()
        own = self.slices[side][sl.param]
        grouped = [x for x in own if x.grouped]
        if grouped:

            g = self.irs[side].space(grouped[0].space)
            t = expand_grouped(t, grouped[0], g.n, g.group_size)
        for dim in sorted({x.dim for x in own} - {sl.dim}):
            t = self._map_dim(side, t, [x for x in own if x.dim == dim])
        idx = slice_index(sl, n).permute(1, 0, 2).reshape(-1).to(t.device)
        return t.movedim(sl.dim, 0)[idx].reshape(n, -1)


def _standardize(block: torch.Tensor) -> torch.Tensor:
    """z-score a block as a whole, so that norm statistics near 1 do not dominate conv rows."""
    block = block - block.mean()
    std = block.std() if block.numel() > 1 else block.new_tensor(0.0)
    return block / std if std > 1e-12 else block


def weight_similarity(basis: WeightBasis, k: int) -> torch.Tensor:
    """``(nA+nB, nA+nB)`` cosine similarity of the stacked producer rows of pair ``k``.

    Each producer slice is one block of the row, z-scored over both models' units together.

    Example::

        >>> from hmir.algorithms.matching import match_avg
        >>> from hmir.frontends import lower
        >>> from hmir.harness import zoo
        >>> from hmir.ir.pairing import pair_spaces
        >>> a = zoo.mlp(4, (6,), 2)
        >>> ir = lower(a, torch.randn(2, 4))
        >>> states = a.state_dict(), a.state_dict()                  # A merged with itself
        >>> matches = [match_avg(4, 4), None, match_avg(2, 2)]
        >>> S = weight_similarity(WeightBasis((ir, ir), pair_spaces(ir, ir), matches, states), 1)
        >>> S.shape, torch.allclose(S[:6, 6:].diagonal(), torch.ones(6))
        (torch.Size([12, 12]), True)
    """
    sa, sb = basis.irs[0].space(basis.pairs[k].a), basis.irs[1].space(basis.pairs[k].b)
    blocks = []
    for xa, xb in zip(_producers(sa), _producers(sb)):
        ra = basis.rows(0, xa, sa.n)
        rb = basis.rows(1, xb, sb.n).to(ra.device)
        if ra.shape[1] != rb.shape[1]:
            raise MergeError(
                f"dual-space similarity of space '{sa.name}': the rows of '{xa.param}' have "
                f"{ra.shape[1]} entries per unit in {basis.irs[0].name} but {rb.shape[1]} in "
                f"{basis.irs[1].name} after mapping their other feature dims into the merged basis "
                f"(a dim that is not a feature dim, e.g. a kernel size, or the spatial block of a "
                f"flatten, differs): use similarity_alpha=None or 1.0 (activations only)")
        blocks.append(_standardize(torch.cat([ra, rb])))
    if not blocks:
        raise MergeError(f"dual-space similarity: space '{sa.name}' has no producer slices")
    rows = torch.cat(blocks, 1)
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (rows @ rows.T).clamp(-1.0, 1.0).fill_diagonal_(1.0)


def _producers(s: Space) -> list[Slice]:
    return [sl for sl in s.slices if sl.role == "out"]


@dataclass(frozen=True)
class Sweeps:
    """How the dual-space sweeps ended: ``sweeps`` run, ``converged`` (the last sweep changed
    no match: a fixed point), else the matches of sweep ``kept`` (best mean match score)."""

    sweeps: int
    converged: bool
    kept: int
    score: float

    def note(self, alpha: float, spaces: int) -> str:
        """One line for the report, e.g. ``...: 3 sweep(s), converged``."""
        head = (f"dual-space similarity {alpha:g}·activation + {1 - alpha:g}·weight on "
                f"{spaces} spaces: {self.sweeps} sweep(s)")
        if self.converged:
            return f"{head}, converged (the last sweep changed no match)"
        return (f"{head}, no fixed point: kept the matches of sweep {self.kept} (best mean "
                f"match score {self.score:.4f})")


def _mean_score(matches: list[Match | None], todo: list[int]) -> float:
    vals = [matches[k].score for k in todo if not math.isnan(matches[k].score)]
    return sum(vals) / len(vals) if vals else 0.0


def dual_sweeps(irs: tuple[MergeIR, MergeIR], pairs, corrs: Callable[[int], torch.Tensor],
                todo: list[int], matches: list[Match | None],
                solve: Callable[[int, torch.Tensor], Match], states: tuple[dict, dict], *,
                alpha: float, max_sweeps: int = 8, patience: int = 3) -> Sweeps:
    """Match the pairs ``todo`` (in order) on the dual similarity, sweeping until stable.

    ``matches`` holds the fixed/absent/grouped matches already made (None for ``todo``) and is
    filled in place. ``corrs(k)`` gives pair k's activation correlation; ``solve(k, sim)`` the
    match. Sweeps stop at a fixed point (no match changed), after ``patience`` sweeps without
    a better mean match score, or after ``max_sweeps``; short of a fixed point the best
    sweep's matches are kept (as MuDSC does). Sweep 1 competes only when it is the last: its
    order-free (sorted) rows inflate the similarities, so its scores are not comparable.
    """
    if max_sweeps < 1 or patience < 1:
        raise MergeError(f"max_sweeps and patience must be >= 1, got {max_sweeps}, {patience}")
    basis = WeightBasis(irs, pairs, matches, states)
    best, stale, sweep = (0, -math.inf, None), 0, 0
    while sweep < max_sweeps and stale < patience:
        sweep, changed = sweep + 1, 0
        for k in todo:
            corr = corrs(k)
            sim = alpha * corr + (1.0 - alpha) * weight_similarity(basis, k).to(corr)
            new = solve(k, sim)
            changed += matches[k] is None or new.groups != matches[k].groups
            matches[k] = new
        score = _mean_score(matches, todo)
        if not changed:
            return Sweeps(sweep, True, sweep, score)
        if sweep == 1 and max_sweeps > 1:
            continue
        best, stale = ((sweep, score, list(matches)), 0) if score > best[1] else (best, stale + 1)
    for k in todo:
        matches[k] = best[2][k]
    return Sweeps(sweep, False, best[0], best[1])
