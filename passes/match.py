"""match: per pair of spaces, a merge matrix M (r × (nA+nB)) and unmerge matrix U.

Methods are registered in :data:`METHODS` (``avg``, ``permute``, ``zip``); fixed spaces
(model input/output) are always averaged unaligned. Grouped spaces (group size > 1) are
matched as whole groups first (Hungarian on per-group-pair scores summed over the group
class), then unit by unit within each paired group; the report says so.

Example::

    >>> matches = match(ir_a, ir_b, pairs, stats, MatchOptions(method="zip", alpha=0.5))
    >>> matches[3].M.shape
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment

from hmir.errors import MergeError
from hmir.ir import MergeIR, Space
from hmir.matching import Match, _build, match_avg, match_keep, match_permute, match_zip
from hmir.passes.observe import SpacePair, SpaceStats
from hmir.slicing import slice_index


@dataclass(frozen=True)
class MatchOptions:
    """Options of the match pass: ``method`` and ZipIt's ``alpha``/``beta``."""

    method: str = "zip"
    alpha: float = 0.5
    beta: float = 0.5
    tie_break: float = 1e-3
    width: object = "max"
    name: str = "match"


def target_width(spec, nA: int, nB: int, space: str = "") -> int:
    """The merged width r of a space: ``"max"``, ``"min"``, an int, a ratio of max(nA, nB)
    (a float), or a dict ``{space name: spec, "default": spec}``.

    Example::

        >>> target_width("max", 16, 32), target_width(0.75, 16, 32), target_width(20, 16, 32)
        (32, 24, 20)
    """
    if isinstance(spec, dict):
        spec = spec.get(space, spec.get("default", "max"))
    if spec == "max":
        r = max(nA, nB)
    elif spec == "min":
        r = min(nA, nB)
    elif isinstance(spec, bool) or not isinstance(spec, (int, float)):
        raise MergeError(f"width must be 'max', 'min', an int, a float ratio or a dict of those; "
                         f"got {spec!r}")
    else:
        r = int(spec) if isinstance(spec, int) else int(round(spec * max(nA, nB)))
    if not 1 <= r <= nA + nB:
        raise MergeError(f"space '{space}': merged width {r} (width={spec!r}) is outside "
                         f"1..{nA + nB} (widths {nA} and {nB})")
    return r


METHODS = {
    "avg": lambda corr, nA, nB, o, r: match_avg(nA, nB, corr=corr),
    "permute": lambda corr, nA, nB, o, r: match_permute(corr, nA, nB),
    "zip": lambda corr, nA, nB, o, r: match_zip(corr, nA, nB, r, alpha=o.alpha, beta=o.beta),
}
ELASTIC = {"zip"}           # methods that merge spaces of different widths to any width r


def check_method(method: str) -> None:
    """Raise MergeError listing the valid methods when ``method`` is unknown."""
    if method not in METHODS:
        raise MergeError(f"unknown matching method {method!r}; valid methods: {sorted(METHODS)}")


def producer_rows(ir: MergeIR, s: Space, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each unit's producer entries (every "out" slice), sorted per slice: (n, D).

    Sorting makes the descriptor independent of how the unit's *input* space is ordered,
    so a unit and its twin in a permuted copy get identical rows.
    """
    rows = []
    for sl in s.producers():
        idx = slice_index(sl, s.n)                                    # (outer, n, inner)
        t = state[sl.param].float().movedim(sl.dim, 0)
        rows.append(t[idx.permute(1, 0, 2).reshape(-1)].reshape(s.n, -1).sort(dim=1).values)
    return torch.cat(rows, 1)


def similarity(corr: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, tie: float) -> torch.Tensor:
    """Activation correlation plus ``tie`` × producer-weight cosine similarity.

    The weight term breaks ties between units the calibration data cannot tell apart
    (dead units have zero variance, hence correlation 0 with every unit, even their twin).
    """
    if tie == 0 or wa.shape[1] != wb.shape[1]:
        return corr
    w = torch.cat([wa, wb]).to(corr)
    w = w - w.mean(1, keepdim=True)
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return corr + tie * (w @ w.T)


def absent_pair(ir_a: MergeIR, ir_b: MergeIR, p: SpacePair) -> str | None:
    """``"a"``/``"b"`` when that side of the pair is a zero block's inner space (``meta["absent"]``)."""
    if p.a in ir_a.meta.get("absent", ()):
        return "a"
    return "b" if p.b in ir_b.meta.get("absent", ()) else None


def match(ir_a: MergeIR, ir_b: MergeIR, pairs: list[SpacePair], stats: list[SpaceStats | None],
          opts: MatchOptions, state_a: dict, state_b: dict) -> tuple[list[Match], list[str]]:
    """Match every pair; returns the matches (in pair order) and notes for the report.

    A pair whose one side is absent (an inserted zero block's inner features) keeps the
    other side's features unchanged (:func:`~hmir.matching.match_keep`).
    """
    check_method(opts.method)
    out: list[Match | None] = [None] * len(pairs)
    notes: list[str] = []
    grouped: dict[int, list[int]] = {}
    kept = 0
    for k, (p, st) in enumerate(zip(pairs, stats)):
        sa, sb = ir_a.space(p.a), ir_b.space(p.b)
        side = absent_pair(ir_a, ir_b, p)
        if sa.fixed:                      # fuse moves the matrices to each tensor's device
            out[k] = match_avg(sa.n, sb.n)
        elif side is not None:
            out[k], kept = match_keep(sa.n, sb.n, "b" if side == "a" else "a"), kept + 1
        elif sa.group_size > 1 and opts.method != "avg":
            if sa.n != sb.n or sa.group_size != sb.group_size:
                raise MergeError(f"grouped space '{sa.name}' has {sa.groups}×{sa.group_size} units in "
                                 f"{ir_a.name} and {sb.groups}×{sb.group_size} in {ir_b.name}: group "
                                 f"alignment of different group counts or sizes is not supported yet")
            grouped.setdefault(sa.group_class, []).append(k)
        else:
            r = _width(opts, sa, sb, ir_a, ir_b)
            sim = similarity(st.corr().float(), producer_rows(ir_a, sa, state_a),
                             producer_rows(ir_b, sb, state_b), opts.tie_break)
            out[k] = METHODS[opts.method](sim, sa.n, sb.n, opts, r)
    for cls, ks in grouped.items():
        for k, m in zip(ks, _match_group_class([stats[k] for k in ks],
                                               [ir_a.space(pairs[k].a) for k in ks])):
            out[k] = m
        names = ", ".join(ir_a.space(pairs[k].a).name for k in ks)
        notes.append(f"grouped spaces [{names}]: group alignment then within-group permutation "
                     f"(method {opts.method!r} applies to ungrouped spaces)")
    if kept:
        notes.append(f"{kept} inner space(s) of inserted zero blocks: kept the other model's "
                     f"features as they are (zero-block features are absent)")
    return out, notes


def _width(opts: MatchOptions, sa: Space, sb: Space, ir_a: MergeIR, ir_b: MergeIR) -> int:
    r = target_width(opts.width, sa.n, sb.n, sa.name)
    if opts.method not in ELASTIC and (sa.n != sb.n or r != sa.n):
        raise MergeError(
            f"space '{sa.name}' has width {sa.n} in {ir_a.name} and {sb.n} in {ir_b.name} (merged "
            f"width {r} asked); method {opts.method!r} pairs units one to one and needs equal "
            f"widths: use method='zip' (elastic zipping to any width)")
    return r


def _hungarian(score: torch.Tensor) -> torch.Tensor:
    rows, cols = linear_sum_assignment(score.detach().cpu().double().numpy(), maximize=True)
    return torch.as_tensor(cols)[torch.as_tensor(rows).argsort()]


def _match_group_class(stats: list[SpaceStats], spaces: list[Space]) -> list[Match]:
    """Group alignment for spaces sharing one group permutation (design.md, MuDSC)."""
    G = spaces[0].groups
    total = torch.zeros(G, G, dtype=torch.float64)
    blocks, corrs = [], [st.corr().float() for st in stats]
    for corr, s in zip(corrs, spaces):
        n, k = s.n, s.group_size
        cross = corr[:n, n:].cpu().reshape(G, k, G, k).permute(0, 2, 1, 3)
        within = {}
        for g in range(G):
            for h in range(G):
                perm = _hungarian(cross[g, h])
                within[g, h] = perm
                total[g, h] += cross[g, h][torch.arange(k), perm].mean()
        blocks.append(within)
    sigma = _hungarian(total)
    out = []
    for corr, s, within in zip(corrs, spaces, blocks):
        n, k = s.n, s.group_size
        groups = [(g * k + j, n + int(sigma[g]) * k + int(within[g, int(sigma[g])][j]))
                  for g in range(G) for j in range(k)]
        out.append(_build(groups, 2 * n, corr, corr.device, torch.float32))
    return out
