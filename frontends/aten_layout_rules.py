"""Layouts a reshape builds that only reshapes, transposes and selections may read: the pieces
of a fused projection, and a feature dim folded together with batch or spatial dims.

* :class:`PieceVal`: a fresh projection's feature dim reshaped to ``(k, H, d)`` (timm's
  ``qkv(x).reshape(B, N, 3, H, d)``). The leading factor indexes ``k`` pieces (q, k, v),
  each a space of its own (:func:`~hmir.frontends.aten_fused_rules.split_space`) grouped
  into ``H`` heads of ``d`` units. ``permute`` moves the pieces' dim; ``unbind`` or
  ``select`` (``qkv[0]``) along it hands out the pieces.
* :class:`FoldVal`: a feature dim laid out inside a bigger dim as ``outer × units × inner``
  (MobileViT's unfold ``(B, C, H, W) -> (B·C·nh, ph, nw, pw)``): reshapes and transposes
  follow it (:func:`place`) until a reshape brings it out as a dim of its own again. Folded
  with positions only (Swin's patch merging ``(…, 2, 2, C) -> 4C``), the dim is an ordinary
  feature axis whose segment has ``outer``/``inner`` > 1 (:func:`fold_group`).

Neither is a tensor other rules understand: a rule that emits one checks that every user of
its node is a rule that reads these layouts (:func:`guard`), and fails naming the user.

Example: the group ``(B, C, nh·ph)`` of MobileViT's unfold, with ``B`` = 2, ``C`` = 64 and
``nh`` = 4, ``ph`` = 2, becomes ``(B·C·nh, ph)``; the channels sit in dim 0 with 2 batch
entries outside and the 4 patch rows inside::

    >>> place((512, 2), [0, 1], outer=2, inner=8, width=64)
    (0, 2, 4)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from hmir.frontends.aten_rules import ACtx, AVal, Head
from hmir.frontends.rules import Meta
from hmir.ir import Segment


@dataclass
class PieceVal(AVal):
    """Pieces of a fused projection along dim ``pdim``: per piece its ``(axes, heads)``,
    numbered as this value's dims (no piece uses ``pdim``)."""

    pdim: int = 0
    parts: list = field(default_factory=list)


@dataclass
class FoldVal(AVal):
    """``folds``: dim → ``(segment, inner)``, a plain feature segment laid out inside that dim
    as ``outer × units × inner`` (``outer`` = the dim's extent / (width · inner))."""

    folds: dict = field(default_factory=dict)


def guard(ctx: ACtx, v: AVal, what: str) -> AVal:
    """``v`` if every user of the node reads these layouts (``reads_layouts`` rules, shapes)."""
    from hmir.frontends.aten_table import lookup

    for user in ctx.node.users:
        rule = lookup(user.target) if user.op == "call_function" else None
        while rule is not None and not getattr(rule, "reads_layouts", False):
            rule = next((r for r in vars(rule).values() if hasattr(r, "apply")), None)
            # a wrapper (ParamView, ShuffleReshape) hands values it does not claim to its rule
        if not (getattr(rule, "reads_layouts", False) or isinstance(rule, Meta)):
            ctx.b.fail(f"{what}; hmir follows that layout only through reshapes, transposes and "
                       f"unbind/select of the pieces, but node '{user.name}' ({user.target}) "
                       f"reads it (select or unbind the pieces, or bring the features back to a "
                       f"dim of their own, first)")
    return v


def _move_heads(heads: dict, where: dict) -> dict:
    return {where[h]: replace(hd, d=None if hd.d is None else where[hd.d])
            for h, hd in heads.items()}


def relayout(ctx: ACtx, x: AVal, where: dict[int, int]) -> AVal:
    """``x`` (a :class:`PieceVal` or :class:`FoldVal`) with dim ``d`` moved to ``where[d]``."""
    shape = ctx.out_shape()
    if isinstance(x, PieceVal):
        parts = [({where[d]: a for d, a in axes.items()}, _move_heads(heads, where))
                 for axes, heads in x.parts]
        v = PieceVal(shape, {}, pdim=where[x.pdim], parts=parts)
        what = "moves the pieces of a fused projection"
    else:
        v = FoldVal(shape, {where[d]: a for d, a in x.axes.items()},
                    folds={where[d]: f for d, f in x.folds.items()})
        what = "moves features folded together with other dims"
    v.origin.update(x.origin)
    return guard(ctx, ctx.b.observe(v, ctx.node), what)


def place(o: tuple, gj: list[int], outer: int, inner: int, width: int):
    """Where a feature of ``width`` units with ``outer`` entries before and ``inner`` after it
    in a group's flat index falls among output dims ``gj`` (sizes ``o``): ``(dim, outer',
    inner')`` with ``o[dim] = outer' · width · inner'``, or None when the reshape cuts it."""
    pre = 1
    for j in gj:
        post = math.prod(o[t] for t in gj if t > j)
        if outer % pre == 0 and inner % post == 0 and \
                (outer // pre) * width * (inner // post) == o[j]:
            return j, outer // pre, inner // post
        pre *= o[j]
    return None


def fold_group(ctx: ACtx, x: AVal, a: tuple, o: tuple, gi: list[int], gj: list[int],
               axes: dict, folds: dict) -> None:
    """One reshape group holding a single feature (plain, flattened or folded): place it
    among ``gj`` as a plain dim, a flattened one (``outer × units × inner`` where every
    factor around the units is a position: Swin's patch merging ``(…, 2, 2, C) -> 4C``, and
    its reverse) or a folded one (the batch among the factors: a patch unfold)."""
    b = ctx.b
    found = [(d, x.axes[d][0], x.axes[d][0].outer, x.axes[d][0].inner) for d in gi
             if d in x.axes] + \
        [(d, seg, None, inner) for d, (seg, inner) in getattr(x, "folds", {}).items() if d in gi]
    if len(found) != 1 or (found[0][0] in x.axes and len(x.axes[found[0][0]]) != 1):
        b.fail(f"reshapes {tuple(x.shape)} -> {ctx.out_shape()}, which merges or regroups "
               f"feature dims {[f[0] for f in found]} in a way hmir cannot follow")
    f, seg, outer_f, inner_f = found[0]
    width = b.width(seg.space)
    outer_f = a[f] // (width * inner_f) if outer_f is None else outer_f
    outer = math.prod(a[d] for d in gi if d < f) * outer_f
    inner = inner_f * math.prod(a[d] for d in gi if d > f)
    spot = place(o, gj, outer, inner, width)
    if spot is None:
        b.fail(f"reshapes {tuple(x.shape)} -> {ctx.out_shape()}, which cuts feature dim {f} "
               f"(width {width}) apart; only whole features can be merged")
    j, outer_j, inner_j = spot
    if outer_j == 1 or not ctx.sym()[j].free_symbols:        # positions only around the units
        axes[j] = (Segment(seg.space, inner_j, outer_j),)
    else:                                                     # the batch is folded in
        folds[j] = (Segment(seg.space), inner_j)


def fused_pieces(ctx: ACtx, x: AVal, f: int, dims: list[int], sizes_arg, at) -> tuple[int, list]:
    """A fresh projection's feature dim ``f`` reshaped to ``(k, H, d)`` at ``dims``: the
    piece dim and per piece the heads (one space of ``H`` heads of ``d`` units each)."""
    from hmir.frontends.aten_fused_rules import split_space

    b, o = ctx.b, ctx.out_shape()
    pdim, hdim, udim = dims
    k, d = o[pdim], o[udim]
    sids = split_space(b, x.axes[f][0].space, [o[hdim] * d] * k)
    out = []
    for sid in sids:
        b.read_point(x, (Segment(sid),))
        b.set_group(sid, d)
        b.size_arg(ctx.node, sizes_arg, at(udim), "units", sid)
        b.size_arg(ctx.node, sizes_arg, at(hdim), "groups", sid)
        out.append({hdim: Head(udim, sid)})
    return pdim, out


def emit_pieces(ctx: ACtx, x: AVal, axes: dict, heads: dict, pdim: int, per_piece: list):
    """The :class:`PieceVal` of a reshape that split a fused projection into pieces."""
    parts = [(dict(axes), {**heads, **ph}) for ph in per_piece]
    v = PieceVal(ctx.out_shape(), {}, pdim=pdim, parts=parts)
    v.origin.update(x.origin)
    return guard(ctx, v, "splits a fused projection into pieces along a dim of their own")


def emit_folds(ctx: ACtx, x: AVal, axes: dict, folds: dict) -> AVal:
    """The :class:`FoldVal` of a reshape that folded features together with other dims."""
    v = FoldVal(ctx.out_shape(), axes, folds=folds)
    v.origin.update(x.origin)
    return guard(ctx, ctx.b.observe(v, ctx.node),
                 "folds features together with batch or spatial dims")


def take_piece(ctx: ACtx, x: PieceVal, i: int, shape: tuple) -> AVal:
    """Piece ``i`` of ``x`` as a value of ``shape`` (the pieces' dim dropped)."""
    down = lambda d: d - (d > x.pdim)
    axes, heads = x.parts[i]
    v = AVal(shape, {down(d): a for d, a in axes.items()},
             heads={down(h): replace(hd, d=None if hd.d is None else down(hd.d))
                    for h, hd in heads.items()})
    v.origin.update(x.origin)
    return v


def refuse_layout(ctx: ACtx, x, what: str) -> None:
    """Fail when ``x`` is a pieces/folded layout a rule cannot read along the way it asks."""
    if isinstance(x, (PieceVal, FoldVal)):
        ctx.b.fail(f"{what} a tensor whose features are "
                   + ("pieces of a fused projection laid along a dim of their own; select or "
                      "unbind along that dim first" if isinstance(x, PieceVal) else
                      "folded together with batch or spatial dims; reshape them back to a dim "
                      "of their own first"))


def chunk_pieces(ctx: ACtx, x: AVal, dim: int) -> list[int]:
    """A fused projection viewed as ``(k, C)`` (``unflatten(-1, (3, E))``) was read as ``k``
    heads of ``C`` units; selecting along the head dim shows they are pieces: one space per
    piece (:meth:`~hmir.frontends.export.ExportBuilder.chunks`), whose literal sizes in that
    reshape become each piece's extent (the piece count stays)."""
    b, hd = ctx.b, x.heads[dim]
    if hd.d is None or hd.merged or hd.rep != 1 or not hd.whole(b):
        b.fail("selects one attention head; hmir cannot merge a single head")
    sid = hd.space
    new = b.chunks(sid)
    sizes = b.sizes
    sizes[:] = [(n, arg, i, "extent", (Segment(s),)) if kind == "units" and what == sid else
                (n, arg, i, kind, what) for n, arg, i, kind, what in sizes
                if not (kind == "groups" and what == sid)
                for s in (new if kind == "units" and what == sid else [None])]
    return new


@dataclass(frozen=True)
class PieceSelect:
    """``aten.select`` along the pieces' dim of a :class:`PieceVal` (``qkv[0]``) or the head
    dim of a fused ``(k, C)`` view; anything else is ``rule``'s (plain select)."""

    rule: object
    name: str = "select"
    reads_layouts = True

    def apply(self, ctx: ACtx):
        x = ctx.first()
        dim = ctx.arg(1, "dim") % x.ndim
        if isinstance(x, PieceVal) and dim == x.pdim:
            i = int(ctx.arg(2, "index")) % x.shape[dim]
            return ctx.b.observe(take_piece(ctx, x, i, ctx.out_shape()), ctx.node)
        refuse_layout(ctx, x, f"selects along dim {dim} of")
        if dim in getattr(x, "heads", {}) and x.heads[dim].d is not None:
            chunk_pieces(ctx, x, dim)
        return self.rule.apply(ctx)
