"""Rules of aten graphs that select or join parts of a dim: select, slice, cat, and splits of
the units of attention heads (fused q|k|v heads, ``rotate_half``, partial rotary).

A run of a head's units is a :class:`~hmir.frontends.aten_rules.Head` with ``lo``/``hi``;
slicing one cuts the head there, and joining runs out of order pins them
(:mod:`hmir.ir.parts`).

Example::

    >>> SliceRule().name, ACat().name
    ('slice', 'cat')
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from hmir.frontends.aten_rules import ACtx, Head, _carries, heads_of
from hmir.frontends.subspaces import cut_at
from hmir.ir import Segment


@dataclass(frozen=True)
class Select:
    """aten.select(x, dim, i): drops a featureless dim, or picks one chunk of a fused projection.

    Selecting along a head dim (``linear(x, in_proj).unflatten(-1, (3, E))[..., i, :]``)
    splits the fused space into one space per chunk (q, k, v of ``nn.MultiheadAttention``).
    """

    name: str = "select"

    def apply(self, ctx: ACtx):
        x, b = ctx.first(), ctx.b
        dim = ctx.arg(1, "dim") % x.ndim
        i = int(ctx.arg(2, "index"))
        if dim in x.axes or any(hd.d == dim for hd in heads_of(x).values()):
            b.fail(f"selects one entry of feature dim {dim}; only whole features can be merged")
        down = lambda d: d - (d > dim)
        axes = {down(d): a for d, a in x.axes.items()}
        heads = {down(h): replace(hd, d=None if hd.d is None else down(hd.d))
                 for h, hd in heads_of(x).items() if h != dim}
        if dim in heads_of(x):
            hd = x.heads[dim]
            if hd.d is None or hd.merged:
                b.fail("selects one attention head; hmir cannot merge a single head")
            axes[down(hd.d)] = (Segment(b.chunks(hd.space)[i]),)
        return ctx.emit(axes, raw=x.raw, sources=(x,), heads=heads)


@dataclass(frozen=True)
class SliceRule:
    """aten.slice(x, dim, start, end): a featureless dim, a run of a feature dim, or a run of
    the units of every head (cuts the heads there: units never move across the cut).

    A run of a feature dim cuts the spaces it starts or ends inside into sub-spaces
    (:func:`~hmir.frontends.subspaces.refine`); units left out are observed here (they are
    produced but never read); ``start``/``end`` are rewritten when widths change.
    """

    name: str = "slice"

    def apply(self, ctx: ACtx):
        x = ctx.first()
        dim = ctx.arg(1, "dim", 0) % x.ndim
        heads = dict(heads_of(x))
        n, m = x.shape[dim], ctx.out_shape()[dim]
        unit_of = {hd.d: h for h, hd in heads.items()}
        start = ctx.arg(2, "start", 0) or 0
        start = max(0, min(n, start + n if start < 0 else start))
        if (dim in unit_of or dim in x.axes) and m != n and ctx.arg(4, "step", 1) != 1:
            ctx.b.fail(f"slices feature dim {dim} with a step; only runs of units can be merged")
        if dim in unit_of and m != n:
            h = unit_of[dim]
            lo, _ = heads[h].units(x.shape)
            heads[h] = replace(heads[h], lo=lo + start, hi=lo + start + m)
            ctx.b.cut(heads[h].space, lo + start, lo + start + m)
        elif dim in x.axes:
            return ctx.emit({**x.axes, dim: feature_run(ctx, x, dim, start, start + m)},
                            raw=x.raw, sources=(x,), heads=heads)
        elif _carries(x, dim) and m != n:
            ctx.b.fail(f"slices part of the attention heads at dim {dim}; only whole heads can be "
                       f"merged")
        return ctx.emit(dict(x.axes), raw=x.raw, sources=(x,), heads=heads)


def feature_run(ctx: ACtx, x, dim: int, lo: int, hi: int) -> tuple:
    """The segments of ``x``'s feature axis at ``dim`` between entries ``lo`` and ``hi``
    (spaces cut there); the units left out get ``x`` as their observation point."""
    b = ctx.b
    axis = cut_at(b, x.axes[dim], [lo, hi])
    out, pos, end = [], 0, {}
    for seg in axis:
        w = b.axis_width((seg,))
        if lo <= pos and pos + w <= hi:
            out.append(seg)
        elif seg.space not in x.origin or (seg.inner, seg.outer) != (1, 1):
            b.fail(f"leaves out units of feature dim {dim} that hmir cannot observe (segment "
                   f"{seg} of a tensor of shape {tuple(x.shape)})")
        else:
            b.points.append((seg.space, x.origin[seg.space]))
        pos += w
        end[pos] = tuple(axis[:len(end) + 1])
    for i, at in ((2, lo), (3, hi)):
        if 0 < at and i < len(ctx.node.args) and type(ctx.node.args[i]) is int and \
                ctx.node.args[i] < 2 ** 62 and hasattr(b, "size_arg"):
            b.size_arg(ctx.node, i, None, "extent", end[at])
    return tuple(out)


@dataclass(frozen=True)
class ACat:
    """aten.cat: as :class:`~hmir.frontends.shape_rules.Cat`, and a parameter (a class token)
    concatenated along the tokens joins the features it is laid beside."""

    name: str = "cat"

    def apply(self, ctx: ACtx):
        b = ctx.b
        tensors = [ctx.val(t) for t in ctx.arg(0, "tensors")]
        if any(t is None for t in tensors):
            b.fail("concatenates something that is not a tensor value")
        dim = ctx.arg(1, "dim", 0) % tensors[0].ndim
        if any(heads_of(t) for t in tensors):
            return cat_heads(ctx, tensors, dim)
        axes: dict[int, tuple] = {}
        if any(dim in t.axes for t in tensors):
            parts = [b.axis_of(t, dim, "this concat") for t in tensors]
            axes[dim] = tuple(s for p in parts for s in p)
        for d in set().union(*(t.axes for t in tensors)) - {dim}:
            axis = None
            for t in tensors:
                if d in t.axes:
                    axis = t.axes[d] if axis is None else b.union_axes(axis, t.axes[d])
            for t in tensors:
                if d in t.axes:
                    continue
                if t.param is None:
                    axis = b.union_axes(axis, b.axis_of(t, d, "this concat"))
                else:
                    b.axis_slices(t.param, (t.pdims or {}).get(d, d), axis, "out")
            axes[d] = axis
        return ctx.emit(axes, raw=all(t.raw for t in tensors), sources=tuple(tensors))


def cat_heads(ctx: ACtx, tensors: list, dim: int):
    """Concatenate runs of head units along their units dim (``rotate_half``, partial rotary).

    Runs laid end to end in order give their union; any other order (``cat(-x2, x1)``) pins
    the units involved, which then never move, so the order no longer matters.
    """
    b, first = ctx.b, heads_of(tensors[0])
    keys = [{h: (hd.d, hd.merged, hd.rep) for h, hd in heads_of(t).items()} for t in tensors]
    if any(k != keys[0] for k in keys) or any(t.axes for t in tensors):
        b.fail("concatenates tensors whose attention heads are laid out differently")
    h = next((h for h, hd in first.items() if hd.d == dim), None)
    if h is None:
        b.fail(f"concatenates attention heads along dim {dim}, which is not the units of a head")
    runs = [heads_of(t)[h].units(t.shape) for t in tensors]
    for t in tensors[1:]:
        b.union(first[h].space, heads_of(t)[h].space)
    ordered = all(a[1] == c[0] for a, c in zip(runs, runs[1:]))
    lo, hi = min(r[0] for r in runs), max(r[1] for r in runs)
    if sum(r[1] - r[0] for r in runs) != hi - lo:
        b.fail("concatenates runs of head units that overlap or leave a gap")
    if not ordered:
        for r in runs:
            b.pin(first[h].space, *r)
    heads = dict(first)
    heads[h] = replace(first[h], lo=lo, hi=hi)
    return ctx.emit({}, sources=tuple(tensors), heads=heads)


def split_head_units(ctx: ACtx, x, dim: int, widths: list[int]) -> list[dict[int, Head]] | None:
    """Heads of each piece when ``x`` is split along the units of its heads (a fused q|k|v
    head: ``qkv.view(B, S, H, 3d).chunk(3, -1)``): each piece shows a run of every head's
    units, cut there. None when ``dim`` is not the units dim of a head; splitting the head
    dim itself is an error."""
    heads = heads_of(x)
    if dim in heads:
        ctx.b.fail("splits the attention heads themselves; hmir merges whole sets of heads")
    h = next((h for h, hd in heads.items() if hd.d == dim), None)
    if h is None:
        return None
    lo, _ = heads[h].units(x.shape)
    out = []
    for w in widths:
        ctx.b.cut(heads[h].space, lo, lo + w)
        out.append({**heads, h: replace(heads[h], lo=lo, hi=lo + w)})
        lo += w
    return out
