"""Rules for fused projections and matrix products with a parameter, in aten graphs.

* :class:`~hmir.frontends.aten_param_rules.ParamMatmul` lowers ``aten.addmm`` / ``aten.mm`` /
  ``aten.bmm`` when one operand is a parameter: GPT-2's ``Conv1D`` computes
  ``addmm(bias, x.view(-1, n_in), weight)`` with ``weight`` of shape (in, out), the transpose
  of ``nn.Linear``'s. The parameter's ``in`` dim
  reads the feature axis of the other operand, its ``out`` dim writes a new space; a bias (or
  any added tensor) joins that space as an elementwise add would. A product of two computed
  tensors (attention scores) is refused: it is not a layer.
* :class:`Split` lowers ``split`` / ``split_with_sizes`` / ``chunk`` / ``tensor_split`` /
  ``unbind``. Along a featureless dim (batch, tokens) every piece keeps the axes. Along a
  feature dim, a piece boundary that falls inside one plain segment of a space that only a
  fresh projection wrote (``c_attn(x).split(n, 2)`` → q, k, v; ``gate_up(x).chunk(2, -1)``)
  splits that space into one space per piece, with each piece's slices at its offset of the
  producing weight rows and bias; boundaries between segments (a concat split back) just
  hand each piece its segments. A space already joined or read elsewhere (EdgeNeXt's
  ``x.chunk(4, 1)`` of a residual stream) is cut with everything joined with it into
  sub-spaces (:func:`~hmir.frontends.subspaces.cut_at`), as a channel slice is. Along the units of attention heads (GPT-NeoX's
  ``qkv.view(B, S, H, 3d).chunk(3, -1)``) each piece is a run of every head's units
  (:func:`~hmir.frontends.aten_select_rules.split_head_units`). The op returns a tuple, read by
  ``operator.getitem``:
  :class:`Piece` hands out the pieces (and is the META rule for every other getitem).
* A fused projection reshaped so that its pieces lie along a dim of their own (timm's
  ``qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)``,
  :class:`~hmir.frontends.aten_layout_rules.PieceVal`) is handed out by ``unbind`` or
  ``select`` (``qkv[0]``, :class:`~hmir.frontends.aten_layout_rules.PieceSelect`) along that
  dim; a ``(k, C)`` view first read as ``k`` heads (``reshape(B, N, 3, C)``) becomes ``k``
  pieces when unbound or selected along the head dim.

Example (a fused gate/up MLP: each half of ``gate_up``'s rows is a space of its own; here
``*`` joins the two again, so one space holds rows 0..15 and 16..31)::

    >>> import torch, torch.nn as nn
    >>> from hmir.frontends.export import lower
    >>> class GLU(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.gate_up, self.down = nn.Linear(8, 32), nn.Linear(16, 8)
    ...     def forward(self, x):
    ...         g, u = self.gate_up(x).chunk(2, -1)
    ...         return self.down(torch.relu(g) * u)
    >>> ir = lower(GLU(), torch.randn(2, 8))
    >>> [(int(s.n), sorted(sl.offset for sl in s.slices if sl.param == "gate_up.weight"))
    ...  for s in ir.spaces if not s.fixed]
    [(16, [0, 16])]
"""
from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass, field, replace

import torch

from hmir.frontends.aten_layout_rules import (PieceSelect, PieceVal, chunk_pieces, refuse_layout,
                                              take_piece)
from hmir.frontends.aten_param_rules import ParamMatmul, refuse_heads as _refuse_heads
from hmir.frontends.aten_rules import ACtx, APointwise, AVal, heads_of
from hmir.frontends.attention_rules import PAIR_OPS, PairPointwise
from hmir.frontends.aten_select_rules import Select, split_head_units
from hmir.frontends.subspaces import cut_at
from hmir.ir import Segment

aten = torch.ops.aten


# -- splits of a feature dim ------------------------------------------------------------
@dataclass
class Pieces(AVal):
    """The tuple a split returns: per piece its axes (read by ``operator.getitem``)."""

    pieces: list = field(default_factory=list)


def _plain(seg: Segment) -> bool:
    return seg.inner == 1 and seg.outer == 1


def split_space(b, sid: int, widths: list[int]) -> list[int]:
    """Split space ``sid``, written only by a fresh projection, into spaces of ``widths``.

    The projection's slices (weight rows, bias; all ``out``, plain) are cut at the pieces'
    offsets; every value carrying ``sid`` as a plain segment carries the pieces instead (a later
    op that reads the whole value reads their concatenation). The first piece keeps ``sid``.
    A space that is already joined, read, grouped, viewed or flattened is an error.
    """
    rs = b.raw[sid]
    if len(widths) == 1:
        return [sid]
    why = _why_not_fresh(b, sid)
    if why:
        b.fail(f"selects part of a projection whose features are used elsewhere: space "
               f"'{rs.name}' (width {rs.width}) cannot be split into pieces of {widths} because "
               f"{why}; split the projection's output right after the projection, or use "
               f"separate projections")
    offsets = [0, *itertools.accumulate(widths)][:-1]
    rs.width = widths[0]
    new = [sid] + [b.new_space(w, f"{rs.name}:{c}") for c, w in enumerate(widths[1:], 1)]
    b.slices = [replace(sl, space=s, offset=sl.offset + off) if sl.space == sid else sl
                for sl in b.slices
                for s, off in (zip(new, offsets) if sl.space == sid else [(None, 0)])]
    segs = tuple(Segment(s) for s in new)
    swap = lambda axis: tuple(t for s in axis for t in (segs if s == Segment(sid) else (s,)))
    for v in _all_values(b):
        for d, axis in v.axes.items():
            if Segment(sid) in axis:
                v.axes[d] = swap(axis)
        pt = v.origin.get(sid)
        if pt is not None:
            for s, off in zip(new[1:], offsets[1:]):
                v.origin[s] = replace(pt, offset=pt.offset + off)
    sizes = getattr(b, "sizes", [])
    for i, (name, arg, index, kind, what) in enumerate(sizes):
        if kind == "extent" and Segment(sid) in what:
            sizes[i] = (name, arg, index, kind, swap(what))
    return new


def _why_not_fresh(b, sid: int) -> str | None:
    """Why space ``sid`` is not a fresh projection's output (None when it is)."""
    rs = b.raw[sid]
    if any(b.uf[i] == b.uf[sid] for i in range(len(b.raw)) if i != sid):
        return "they are joined with other features (a residual add, a product, a shared layer)"
    if any(sl.space == sid and (sl.role != "out" or not _plain(sl)) for sl in b.slices) or \
            any(s == sid for s, _ in b.points):
        return "a layer already reads them whole"
    if rs.group_size != 1 or rs.cuts or rs.pins or any(sid in (s, v.base) for s, v in b.views):
        return "they are already grouped into heads"
    if rs.fixed:
        return f"they are fixed ({rs.fixed})"
    if not any(sl.space == sid for sl in b.slices):
        return "no projection wrote them"
    own = {(sl.param, sl.dim) for sl in b.slices if sl.space == sid}
    if any(sl.space != sid and (sl.param, sl.dim) in own for sl in b.slices):
        return "their layer is also called elsewhere (a shared weight)"
    if any(sid in (s.space for s in axis if not _plain(s))
           for v in _all_values(b) for axis in v.axes.values()):
        return "they are flattened with another dim"
    return None


def _all_values(b):
    for v in list(b.values.values()):
        if isinstance(v, Pieces):
            yield from v.pieces
        if isinstance(v, AVal):
            yield v


def _cut_axis(ctx: ACtx, axis: tuple, widths: list[int]) -> list[tuple]:
    """``axis`` cut into consecutive parts of ``widths``. A fresh projection's space (or a
    fixed one) is split into spaces of its own (:func:`split_space`); any other space is cut
    with everything joined with it into sub-spaces (:func:`~hmir.frontends.subspaces.cut_at`)."""
    b = ctx.b
    bounds = list(itertools.accumulate(widths))
    segs, start = [], 0
    for seg in axis:
        n = b.axis_width((seg,))
        inside = sorted(c - start for c in bounds if start < c < start + n)
        rs = b.raw[seg.space]
        if not inside or not _plain(seg) or not (rs.fixed or _why_not_fresh(b, seg.space) is None):
            segs.append(seg)
        else:
            cuts = list(zip([0, *inside], [*inside, n]))
            if rs.fixed:                 # never permuted: each piece is a fixed space of its own
                segs += [Segment(b.new_space(e - s, f"{rs.name}[{s}:{e}]", fixed=rs.fixed))
                         for s, e in cuts]
            else:
                segs += [Segment(s) for s in split_space(b, seg.space, [e - s for s, e in cuts])]
        start += n
    it = iter(cut_at(b, tuple(segs), bounds[:-1]))
    parts = []
    for w in widths:
        part, got = [], 0
        while got < w:
            s = next(it)
            part.append(s)
            got += b.axis_width((s,))
        parts.append(tuple(part))
    return parts


@dataclass(frozen=True)
class Split:
    """split / split_with_sizes / chunk / tensor_split (``keepdim``) and unbind (not)."""

    dim_arg: int = 2
    keepdim: bool = True
    sizes_arg: int | None = None
    name: str = "split"
    reads_layouts = True

    def apply(self, ctx: ACtx):
        b = ctx.b
        x = ctx.first()
        metas = ctx.node.meta.get("tensor_meta")
        if not isinstance(metas, (tuple, list)):
            b.fail("has no tuple of output shapes (shape propagation did not record them)")
        shapes = [tuple(int(s) for s in m.shape) for m in metas]
        dim = int(ctx.arg(self.dim_arg, "dim", 0)) % x.ndim
        if isinstance(x, PieceVal) and dim == x.pdim and not self.keepdim:   # q, k, v = unbind
            out = Pieces((), pieces=[take_piece(ctx, x, i, s) for i, s in enumerate(shapes)])
            out.origin.update(x.origin)
            return out
        refuse_layout(ctx, x, f"splits along dim {dim}")
        if not self.keepdim and dim in heads_of(x) and x.heads[dim].d is not None:
            return self._unbind_chunks(ctx, x, dim, shapes)     # (k, C): k pieces, not heads
        if heads_of(x):                          # a fused q|k|v head: runs of every head's units
            heads = split_head_units(ctx, x, dim, [s[dim] for s in shapes]) if self.keepdim \
                else None
            if heads is None or x.axes:
                _refuse_heads(ctx, x, "splits")
            out = Pieces((), pieces=[AVal(s, {}, heads=h) for s, h in zip(shapes, heads)])
            out.origin.update(x.origin)
            return out
        if not self.keepdim:
            if dim in x.axes:
                b.fail(f"unbinds feature dim {dim} into single units; only whole features can be "
                       f"merged")
            down = lambda d: d - (d > dim)
            pieces = [{down(d): a for d, a in x.axes.items()} for _ in shapes]
        elif dim not in x.axes:
            pieces = [dict(x.axes) for _ in shapes]
        else:
            widths = [s[dim] for s in shapes]
            if sum(widths) != x.shape[dim]:
                b.fail(f"splits dim {dim} of extent {x.shape[dim]} into pieces {widths} that do "
                       f"not cover it")
            axis = b.axis_of(x, dim, "this split")
            parts = _cut_axis(ctx, axis, [w for w in widths if w])
            it = iter(parts)
            pieces = []
            for i, w in enumerate(widths):
                p = {d: a for d, a in x.axes.items() if d != dim}
                if w:
                    p[dim] = next(it)
                    if self.sizes_arg is not None:       # split_with_sizes: rewritten on resize
                        b.size_arg(ctx.node, self.sizes_arg, i, "extent", p[dim])
                pieces.append(p)
        out = Pieces((), raw=x.raw, pieces=[AVal(s, a, x.raw) for s, a in zip(shapes, pieces)])
        out.origin.update(x.origin)
        return out

    @staticmethod
    def _unbind_chunks(ctx: ACtx, x, dim: int, shapes: list):
        """Unbind along the head dim of a fused ``(k, C)`` view: ``k`` pieces of ``C``."""
        down = lambda d: d - (d > dim)
        units = down(x.heads[dim].d)
        axes = {down(d): a for d, a in x.axes.items()}
        heads = {down(h): replace(hd, d=None if hd.d is None else down(hd.d))
                 for h, hd in x.heads.items() if h != dim}
        out = Pieces((), pieces=[AVal(s, {**axes, units: (Segment(sid),)}, heads=heads)
                                 for s, sid in zip(shapes, chunk_pieces(ctx, x, dim))])
        out.origin.update(x.origin)
        return out


@dataclass(frozen=True)
class Piece:
    """``operator.getitem``: a piece of a :class:`Split`'s tuple; of anything else, nothing
    (sizes, shapes: the META rule it replaces)."""

    name: str = "getitem"

    def apply(self, ctx: ACtx):
        src = ctx.b.values.get(ctx.node.args[0])
        if not isinstance(src, Pieces):
            return None
        p = src.pieces[ctx.node.args[1]]
        return ctx.emit(dict(p.axes), raw=p.raw, sources=(src,), heads=dict(p.heads))


PIECE = Piece()


_SPLIT, _SIZES = Split(), Split(sizes_arg=1)

FUSED_RULES: dict[object, object] = {
    aten.addmm: ParamMatmul(a_arg=1, b_arg=2, bias_arg=0, names=("mat1", "mat2")),
    aten.mm: ParamMatmul(),
    aten.bmm: ParamMatmul(),
    **{getattr(aten, n): _SPLIT for n in ("unsafe_split", "chunk", "unsafe_chunk", "tensor_split")
       if hasattr(aten, n)},
    **{getattr(aten, n): _SIZES for n in ("split", "split_with_sizes", "unsafe_split_with_sizes")
       if hasattr(aten, n)},
    aten.unbind: Split(dim_arg=1, keepdim=False),
    aten.select: PieceSelect(Select()),
    operator.getitem: PIECE,
    **{op: PairPointwise(APointwise()) for op in PAIR_OPS},    # XCA: (q @ kᵀ) * t, softmax
}
