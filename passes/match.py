"""match: per pair of spaces, a merge matrix M (r × (nA+nB)) and unmerge matrix U.

Methods are registered in :data:`METHODS` (``avg``, ``permute``, ``zip``); fixed spaces
(model input/output) are always averaged unaligned. Grouped spaces (group size > 1) are
matched as whole groups first (Hungarian on per-group-pair scores summed over the group
class), then unit by unit within each paired group; the report says so. Group classes
whose group counts or sizes differ go through rectangular group alignment
(:mod:`hmir.algorithms.groups`, zip methods only).

With ``similarity_alpha`` set (MuDSC, :mod:`hmir.algorithms.dual`), ungrouped free spaces are matched
on ``α·activation + (1−α)·weight`` similarity, sweeping over the spaces until no match
changes; ``None`` keeps the activation correlation plus a tiny weight tie-break.

Example::

    >>> matches = match(ir_a, ir_b, pairs, stats, MatchOptions(method="zip", alpha=0.5))
    >>> matches[3].M.shape
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment

from hmir.algorithms.dual import check_similarity_alpha, dual_sweeps
from hmir.errors import MergeError
from hmir.algorithms.groups import match_groups_rect
from hmir.ir import MergeIR, Space
from hmir.algorithms.matching import Match, _build, match_avg, match_keep, match_permute, match_zip
from hmir.ir.pairing import SpacePair
from hmir.passes.observe import SpaceStats
from hmir.algorithms.tiebreak import producer_rows, row_length, similarity, stacked_similarity  # noqa: F401


@dataclass(frozen=True)
class MatchOptions:
    """Options of the match pass: ``method``, ZipIt's ``alpha``/``beta``, the merged ``width``.

    ``similarity_alpha`` (None, or α in [0, 1]) switches on the dual-space similarity
    ``α·S_act + (1−α)·S_weight`` (not ZipIt's ``alpha``, which decays merged features'
    similarity); ``max_sweeps`` caps its sweeps over the spaces. ``tie_break`` weights the
    producer-weight term of the default (``similarity_alpha=None``) similarity.
    """

    method: str = "zip"
    alpha: float = 0.5
    beta: float = 0.5
    tie_break: float = 1e-3
    width: object = "max"
    name: str = "match"
    similarity_alpha: float | None = None
    max_sweeps: int = 8


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


def _default_similarity(sa: Space, sb: Space, ir_a: MergeIR, ir_b: MergeIR, st: SpaceStats,
                        states: tuple[dict, dict], tie: float) -> torch.Tensor:
    """:func:`~hmir.algorithms.tiebreak.similarity`; the producer rows are only built when the tie-break
    can use them, straight into one stacked buffer (:func:`~hmir.algorithms.tiebreak.stacked_similarity`)."""
    corr = st.corr(dtype=torch.float32)
    if tie == 0 or row_length(sa, states[0]) != row_length(sb, states[1]):
        return corr
    return stacked_similarity(corr, (sa, sb), states, tie)


def absent_pair(ir_a: MergeIR, ir_b: MergeIR, p: SpacePair) -> str | None:
    """``"a"``/``"b"`` when that side of the pair is a zero block's inner space (``meta["absent"]``)."""
    if p.a in ir_a.meta.get("absent", ()):
        return "a"
    return "b" if p.b in ir_b.meta.get("absent", ()) else None


def match(ir_a: MergeIR, ir_b: MergeIR, pairs: list[SpacePair], stats: list[SpaceStats | None],
          opts: MatchOptions, state_a: dict, state_b: dict) -> tuple[list[Match], list[str]]:
    """Match every pair; returns the matches (in pair order) and notes for the report.

    A pair whose one side is absent (an inserted zero block's inner features) keeps the
    other side's features unchanged (:func:`~hmir.algorithms.matching.match_keep`).
    """
    check_method(opts.method)
    check_similarity_alpha(opts.similarity_alpha, opts.method)
    out: list[Match | None] = [None] * len(pairs)
    notes: list[str] = []
    grouped: dict[int, list[int]] = {}
    todo: list[int] = []
    kept = 0
    for k, p in enumerate(pairs):
        sa, sb = ir_a.space(p.a), ir_b.space(p.b)
        side = absent_pair(ir_a, ir_b, p)
        if sa.fixed:                      # fuse moves the matrices to each tensor's device
            out[k] = match_avg(sa.n, sb.n)
        elif side is not None:
            out[k], kept = match_keep(sa.n, sb.n, "b" if side == "a" else "a"), kept + 1
        elif sa.group_size > 1 and opts.method != "avg":
            grouped.setdefault(sa.group_class, []).append(k)
        else:
            todo.append(k)
    for cls, ks in grouped.items():
        notes.append(_match_grouped(ir_a, ir_b, pairs, stats, opts, ks, out))
    notes += _match_free(ir_a, ir_b, pairs, stats, opts, todo, out, (state_a, state_b))
    if kept:
        notes.append(f"{kept} inner space(s) of inserted zero blocks: kept the other model's "
                     f"features as they are (zero-block features are absent)")
    return out, notes


def _match_free(ir_a, ir_b, pairs, stats, opts: MatchOptions, todo: list[int],
                out: list, states: tuple[dict, dict]) -> list[str]:
    """Match the ungrouped free pairs ``todo`` into ``out``; returns report notes."""
    spaces = {k: (ir_a.space(pairs[k].a), ir_b.space(pairs[k].b)) for k in todo}
    widths = {k: _width(opts, *spaces[k], ir_a, ir_b) for k in todo}

    def solve(k: int, sim: torch.Tensor) -> Match:
        return METHODS[opts.method](sim, spaces[k][0].n, spaces[k][1].n, opts, widths[k])

    if opts.similarity_alpha is None:
        for k in todo:
            out[k] = solve(k, _default_similarity(*spaces[k], ir_a, ir_b, stats[k], states,
                                                  opts.tie_break))
        return []
    a = float(opts.similarity_alpha)
    run = dual_sweeps((ir_a, ir_b), pairs, lambda k: stats[k].corr(dtype=torch.float32), todo, out, solve,
                      states, alpha=a, max_sweeps=opts.max_sweeps)
    return [run.note(a, len(todo))]


def _match_grouped(ir_a, ir_b, pairs, stats, opts: MatchOptions, ks: list[int], out: list) -> str:
    """Match the pairs ``ks`` of one group class into ``out``; returns the report note."""
    sas, sbs = [ir_a.space(pairs[k].a) for k in ks], [ir_b.space(pairs[k].b) for k in ks]
    names = ", ".join(s.name for s in sas)
    if all(sa.n == sb.n and sa.group_size == sb.group_size for sa, sb in zip(sas, sbs)):
        for k, m in zip(ks, _match_group_class([stats[k] for k in ks], sas)):
            out[k] = m
        return (f"grouped spaces [{names}]: group alignment then within-group permutation "
                f"(method {opts.method!r} applies to ungrouped spaces)")
    shape = f"{sas[0].groups} groups in {ir_a.name}, {sbs[0].groups} in {ir_b.name}"
    if opts.method not in ELASTIC:
        raise MergeError(f"grouped space '{sas[0].name}' has {sas[0].groups}×{sas[0].group_size} "
                         f"units in {ir_a.name} and {sbs[0].groups}×{sbs[0].group_size} in "
                         f"{ir_b.name}; method {opts.method!r} pairs units one to one: use "
                         f"method='zip' (rectangular group alignment)")
    widths = [target_width(opts.width, sa.n, sb.n, sa.name) for sa, sb in zip(sas, sbs)]
    ms, assign = match_groups_rect([stats[k].corr(dtype=torch.float32) for k in ks], sas, sbs, widths,
                                   alpha=opts.alpha, beta=opts.beta)
    for k, m in zip(ks, ms):
        out[k] = m
    return (f"grouped spaces [{names}] ({shape}): rectangular group alignment, B groups per A "
            f"group {assign}, then zip within each merged group")


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
    blocks, corrs = [], [st.corr(dtype=torch.float32) for st in stats]
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
