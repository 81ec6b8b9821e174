"""match: per pair of spaces, a merge matrix M (r × (nA+nB)) and unmerge matrix U.

Methods come from the registry :mod:`hmir.pipeline.methods` (``avg``, ``permute``, ``zip``
and any a user registers: each has a ``solve`` for one free space); fixed spaces
(model input/output) are always averaged unaligned. Grouped spaces (group size > 1) are
matched as whole groups first (Hungarian on per-group-pair scores summed over the group
class), then unit by unit within each paired group, keeping pinned (rotary) units in place
and following views (grouped-query heads); the report says so. Group classes whose group
counts or sizes differ go through rectangular group alignment (:mod:`hmir.algorithms.groups`,
zip methods only); classes with pinned units keep their head size and zip whole heads.

With ``similarity_alpha`` set (MuDSC, :mod:`hmir.algorithms.dual`), ungrouped free spaces are matched
on ``α·activation + (1−α)·weight`` similarity, sweeping over the spaces until no match
changes; ``None`` keeps the activation correlation plus a tiny weight tie-break.

Example::

    >>> import torch
    >>> from hmir.harness import zoo
    >>> from hmir.frontends import lower
    >>> from hmir.ir.pairing import pair_spaces
    >>> from hmir.passes.observe import observe
    >>> a, b, x = zoo.resnet20(), zoo.resnet20(), torch.randn(8, 3, 32, 32)
    >>> ir_a, ir_b = lower(a, x, "a"), lower(b, x, "b")
    >>> pairs = pair_spaces(ir_a, ir_b)
    >>> todo = [p for p in pairs if p.points]
    >>> stats = dict(zip(todo, observe(ir_a, ir_b, todo, [x], progress=False)))
    >>> matches, notes = match(ir_a, ir_b, pairs, [stats.get(p) for p in pairs],
    ...                        MatchOptions(method="zip", alpha=0.5), a.state_dict(), b.state_dict())
    >>> m = matches[1]; (m.r, tuple(m.M.shape))
    (16, (16, 32))
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hmir.algorithms.dual import check_similarity_alpha, dual_sweeps
from hmir.errors import MergeError
from hmir.algorithms.groups import match_group_class, match_groups_keep, match_groups_rect
from hmir.ir.parts import keeps_group_size
from hmir.ir import MergeIR, Space
from hmir.algorithms.matching import Match, match_avg, match_keep
from hmir.ir.pairing import SpacePair, absent_pair  # noqa: F401  (absent_pair lived here)
from hmir.passes.observe import SpaceStats
from hmir.pipeline.manager import Out, Pass, register_pass
from hmir.pipeline.methods import get_method
from hmir.pipeline.report import SpaceReport
from hmir.pipeline.state import NO_ABSENT
from hmir.algorithms.tiebreak import producer_rows, row_length, similarity, stacked_similarity  # noqa: F401


@dataclass(frozen=True)
class MatchOptions:
    """Options of the match pass: ``method``, ZipIt's ``alpha``/``beta``, the merged ``width``.

    ``similarity_alpha`` (None, or α in [0, 1]) switches on the dual-space similarity
    ``α·S_act + (1−α)·S_weight`` (not ZipIt's ``alpha``, which decays merged features'
    similarity); ``max_sweeps`` caps its sweeps over the spaces. ``tie_break`` weights the
    producer-weight term of the default (``similarity_alpha=None``) similarity. ``params``: further
    parameters of a registered method's ``solve`` (``alpha``/``beta`` are passed too).
    """

    method: str = "zip"
    alpha: float = 0.5
    beta: float = 0.5
    tie_break: float = 1e-3
    width: object = "max"
    name: str = "match"
    similarity_alpha: float | None = None
    max_sweeps: int = 8
    params: dict = field(default_factory=dict)

    def solve_params(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, **self.params}


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


def __getattr__(name: str):
    """Deprecated: ``METHODS`` (name → solve) and ``ELASTIC`` are views of the method registry."""
    if name in ("METHODS", "ELASTIC"):
        import warnings

        from hmir.pipeline.methods import METHODS as registry

        warnings.warn(f"hmir.passes.match.{name} is deprecated: use hmir.pipeline.methods "
                      f"(get_method, register_method)", DeprecationWarning, stacklevel=2)
        if name == "ELASTIC":
            return {n for n, m in registry.items() if m.elastic}
        return {n: (lambda corr, nA, nB, o, r, m=m: m.solve(corr, nA, nB, o.solve_params(), r))
                for n, m in registry.items() if m.solve is not None}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_method(method: str) -> None:
    """Raise MergeError listing the valid methods when ``method`` is unknown or does not match
    spaces (runs no ``match`` pass)."""
    if get_method(method).solve is None:
        raise MergeError(f"method {method!r} does not match spaces (its passes: "
                         f"{list(get_method(method).passes)})")


def _default_similarity(sa: Space, sb: Space, ir_a: MergeIR, ir_b: MergeIR, st: SpaceStats,
                        states: tuple[dict, dict], tie: float) -> torch.Tensor:
    """:func:`~hmir.algorithms.tiebreak.similarity`; the producer rows are only built when the tie-break
    can use them, straight into one stacked buffer (:func:`~hmir.algorithms.tiebreak.stacked_similarity`)."""
    corr = st.corr(dtype=torch.float32)
    if tie == 0 or row_length(sa, states[0]) != row_length(sb, states[1]):
        return corr
    return stacked_similarity(corr, (sa, sb), states, tie)


def match(ir_a: MergeIR, ir_b: MergeIR, pairs: list[SpacePair], stats: list[SpaceStats | None],
          opts: MatchOptions, state_a: dict, state_b: dict,
          absent: tuple[frozenset, frozenset] = NO_ABSENT) -> tuple[list[Match], list[str]]:
    """Match every pair; returns the matches (in pair order) and notes for the report.

    A pair whose one side is absent (``absent``: per model, the ids of an inserted zero
    block's inner spaces) keeps the other side's features unchanged
    (:func:`~hmir.algorithms.matching.match_keep`).
    """
    check_method(opts.method)
    check_similarity_alpha(opts.similarity_alpha, opts.method)
    out: list[Match | None] = [None] * len(pairs)
    notes: list[str] = []
    grouped: dict[int, list[int]] = {}
    todo: list[int] = []
    kept = 0
    grouped_classes = {s.group_class for s in ir_a.spaces if s.group_size > 1}
    for k, p in enumerate(pairs):
        sa, sb = ir_a.space(p.a), ir_b.space(p.b)
        side = absent_pair(p, absent)
        if sa.fixed:                      # fuse moves the matrices to each tensor's device
            out[k] = match_avg(sa.n, sb.n)
        elif side is not None:
            out[k], kept = match_keep(sa.n, sb.n, "b" if side == "a" else "a"), kept + 1
        elif sa.group_class in grouped_classes and get_method(opts.method).group_align:
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

    method, params = get_method(opts.method), opts.solve_params()

    def solve(k: int, sim: torch.Tensor) -> Match:
        return method.solve(sim, spaces[k][0].n, spaces[k][1].n, params, widths[k])

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
    corrs = [stats[k].corr(dtype=torch.float32).cpu() for k in ks]
    if all(sa.n == sb.n and sa.group_size == sb.group_size for sa, sb in zip(sas, sbs)):
        for k, m in zip(ks, match_group_class(corrs, sas)):
            out[k] = m
        return (f"grouped spaces [{names}]: group alignment then within-group permutation "
                f"(method {opts.method!r} applies to ungrouped spaces)")
    shape = f"{sas[0].groups} groups in {ir_a.name}, {sbs[0].groups} in {ir_b.name}"
    if not get_method(opts.method).elastic:
        raise MergeError(f"grouped space '{sas[0].name}' has {sas[0].groups}×{sas[0].group_size} "
                         f"units in {ir_a.name} and {sbs[0].groups}×{sbs[0].group_size} in "
                         f"{ir_b.name}; method {opts.method!r} pairs units one to one: use "
                         f"method='zip' (rectangular group alignment)")
    widths = [target_width(opts.width, sa.n, sb.n, sa.name) for sa, sb in zip(sas, sbs)]
    if any(s.view is not None for s in sas + sbs):
        raise MergeError(f"grouped space '{sas[0].name}' ({shape}) shares its heads with a view "
                         f"(grouped-query attention: kv heads serve several query heads, or a fused "
                         f"q|k|v head); hmir merges such attention only with equal head counts and "
                         f"head sizes in both models: merge models with the same heads and kv "
                         f"heads, or use method='mal' (keeps A's heads)")
    if keeps_group_size(ir_a, sas[0]) or keeps_group_size(ir_b, sbs[0]):
        ms = match_groups_keep(corrs, sas, sbs, widths, alpha=opts.alpha, beta=opts.beta)
        for k, m in zip(ks, ms):
            out[k] = m
        return (f"grouped spaces [{names}] ({shape}, pinned rotary units): whole heads zipped "
                f"to {widths[0] // sas[0].group_size} heads of {sas[0].group_size} units")
    ms, assign = match_groups_rect(corrs, sas, sbs, widths, alpha=opts.alpha, beta=opts.beta)
    for k, m in zip(ks, ms):
        out[k] = m
    return (f"grouped spaces [{names}] ({shape}): rectangular group alignment, B groups per A "
            f"group {assign}, then zip within each merged group")


def _width(opts: MatchOptions, sa: Space, sb: Space, ir_a: MergeIR, ir_b: MergeIR) -> int:
    r = target_width(opts.width, sa.n, sb.n, sa.name)
    if not get_method(opts.method).elastic and (sa.n != sb.n or r != sa.n):
        raise MergeError(
            f"space '{sa.name}' has width {sa.n} in {ir_a.name} and {sb.n} in {ir_b.name} (merged "
            f"width {r} asked); method {opts.method!r} pairs units one to one and needs equal "
            f"widths: use method='zip' (elastic zipping to any width)")
    return r


class MatchPass(Pass):
    """Merge and unmerge matrices of every pair, and the merged widths that changed.
    Options: :class:`MatchOptions`."""

    name = "match"
    requires = ("irs", "pairs", "stats", "absent")
    provides = ("matches", "widths")
    options = MatchOptions

    def run(self, state, options: MatchOptions) -> Out:
        ir_a, ir_b = state.irs
        matches, notes = match(ir_a, ir_b, state.pairs, [state.stats.get(p) for p in state.pairs],
                               options, ir_a.graph_module.state_dict(),
                               ir_b.graph_module.state_dict(), state.absent)
        for p, m in zip(state.pairs, matches):
            sa, sb = ir_a.space(p.a), ir_b.space(p.b)
            state.report.spaces.append(SpaceReport(sa.name, sa.n, sb.n, m.r, m.score, sa.fixed))
        widths = {p.a: m.r for p, m in zip(state.pairs, matches) if m.r != ir_a.space(p.a).n}
        return Out({"matches": matches, "widths": widths}, notes)


register_pass(MatchPass())
