"""Op rules for aten-level graphs (torch.export): values that carry attention heads.

An exported graph shows aten ops whose parameters are graph inputs (``get_attr`` nodes),
not module calls. The rules here read the weight from the op's arguments and otherwise
reuse the semantic rules of :mod:`hmir.frontends.rules`. A value may carry, besides its
feature axes, **heads**: a dim ``h`` holding the head index of a grouped space and a
dim ``d`` holding the units within each head (``q.view(B, S, H, d)``). The head dim may
be folded with the batch (``B·H``, heads minor), or hold only the head index (attention
scores, ``d`` is None). Heads are never listed in ``axes``: a rule that does not
understand them refuses values that carry them.

Example::

    >>> from hmir.frontends.aten_rules import Head
    >>> Head(d=3, space=5)
    Head(d=3, space=5, merged=False)
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import sympy
import torch.fx as fx

from hmir.frontends.builder import Val
from hmir.frontends.rules import Ctx, Pointwise
from hmir.ir import Segment


@dataclass(frozen=True)
class Head:
    """Dim ``d`` holds the units of each head of ``space``; ``merged``: the head dim is B·H."""

    d: int | None
    space: int
    merged: bool = False


@dataclass
class AVal(Val):
    """A :class:`~hmir.frontends.builder.Val` with heads and, for views of a parameter, ``pdims``.

    ``pdims`` maps a dim of the value to the dim of parameter ``param`` it shows (an
    ``expand`` of a class token keeps its parameter, at shifted dims). ``index`` marks a value
    computed only from shapes, constants and integer inputs (masks, position ids, rotary
    tables): it carries no feature space, whatever ops computed it.
    """

    heads: dict[int, Head] = field(default_factory=dict)
    pdims: dict[int, int] | None = None
    index: bool = False


def sym_shape(node) -> tuple | None:
    """``node``'s shape with symbolic sizes (the exported batch) as sympy expressions."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if hasattr(val, "shape"):
        return tuple(sympy.sympify(s.node.expr) if hasattr(s, "node") else sympy.Integer(int(s))
                     for s in val.shape)
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(sympy.Integer(int(s)) for s in tm.shape) if hasattr(tm, "shape") else None


class ACtx(Ctx):
    """The rule context for aten graphs: emits :class:`AVal` values."""

    def emit(self, axes, raw=False, sources=(), heads=None, pdims=None) -> AVal:
        v = AVal(self.out_shape(), axes, raw, heads=heads or {}, pdims=pdims)
        for s in sources:
            v.origin.update(s.origin)
        return self.b.observe(v, self.node)

    def param(self, i: int, name: str, required: bool = True) -> tuple[str | None, tuple]:
        """The parameter name and shape of argument ``i`` (a ``get_attr`` of the state dict)."""
        a = self.arg(i, name, None)
        v = self.val(a)
        if v is None or v.param is None or getattr(v, "pdims", None) is not None:
            if required or a is not None:
                self.b.fail(f"takes its {name} from a computed tensor, not a parameter of the "
                            f"model; hmir slices only parameters")
            return None, ()
        return v.param, tuple(v.shape)

    def sym(self, node=None) -> tuple:
        return sym_shape(self.node if node is None else node)


def heads_of(v) -> dict[int, Head]:
    return getattr(v, "heads", {}) or {}


@dataclass(frozen=True)
class NoHeads:
    """Wraps a head-unaware rule: inputs carrying heads are an error naming the op."""

    rule: object
    name: str = "no_heads"

    def apply(self, ctx: ACtx):
        if any(heads_of(v) for v in ctx.tensor_args()):
            ctx.b.fail(f"applies '{self.rule.name}' to a tensor split into attention heads; hmir "
                       f"understands heads only through reshapes, transposes, elementwise ops and "
                       f"scaled_dot_product_attention")
        return self.rule.apply(ctx)


@dataclass(frozen=True)
class APointwise(Pointwise):
    """Elementwise ops: features join as in :class:`Pointwise`; heads pass through and join."""

    name: str = "pointwise"

    def apply(self, ctx: ACtx):
        v = super().apply(ctx)
        ops, out = ctx.tensor_args(), ctx.out_shape()
        heads: dict[int, Head] = {}
        for op in ops:
            shift = len(out) - op.ndim
            for h, hd in heads_of(op).items():
                new = replace(hd, d=None if hd.d is None else hd.d + shift)
                old = heads.setdefault(h + shift, new)
                if old.d != new.d or old.merged != new.merged:
                    ctx.b.fail(f"combines two tensors whose heads are laid out differently")
                ctx.b.union(old.space, new.space)
        dims = set(heads) | {hd.d for hd in heads.values() if hd.d is not None}
        for op in ops:
            shift = len(out) - op.ndim
            for d in dims:
                if d - shift >= 0 and op.shape[d - shift] > 1 and not _carries(op, d - shift):
                    ctx.b.fail(f"combines attention heads with a tensor of shape {op.shape} that is "
                               f"not split into the same heads (dim {d - shift})")
        v.heads = heads
        return v


def _carries(v, d: int) -> bool:
    hs = heads_of(v)
    return d in hs or any(hd.d == d for hd in hs.values())


@dataclass(frozen=True)
class Featureless:
    """Ops on index/mask tensors (arange, gather, comparisons): inputs must carry no features."""

    name: str = "featureless"

    def apply(self, ctx: ACtx):
        ops = ctx.tensor_args()
        if any(v.axes or heads_of(v) for v in ops if v.param is None):
            ctx.b.fail("computes on a feature tensor in a way hmir cannot follow (only index and "
                       "mask tensors may pass through this op)")
        for v in ops:
            if v.param is not None:
                ctx.b.declare(v.param, reason="index/mask tensor (no feature dim)")
        tm = ctx.node.meta.get("tensor_meta")
        if not hasattr(tm, "shape"):
            return None
        raw = bool(ops) and all(v.raw for v in ops)
        return ctx.emit({}, raw=raw, sources=tuple(ops))


@dataclass(frozen=True)
class Expand:
    """aten.expand: broadcast size-1 dims (never feature dims); a parameter stays a parameter."""

    name: str = "expand"

    def apply(self, ctx: ACtx):
        x = ctx.first()
        shift = len(ctx.out_shape()) - x.ndim
        axes = {d + shift: a for d, a in x.axes.items()}
        heads = {h + shift: replace(hd, d=None if hd.d is None else hd.d + shift)
                 for h, hd in heads_of(x).items()}
        pdims = None
        if x.param is not None:
            base = x.pdims or {d: d for d in range(x.ndim)}
            pdims = {d + shift: p for d, p in base.items()}
        v = ctx.emit(axes, raw=x.raw, sources=(x,), heads=heads, pdims=pdims)
        v.param = x.param
        return v


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
    """aten.slice(x, dim, start, end): a featureless dim, or a whole feature dim."""

    name: str = "slice"

    def apply(self, ctx: ACtx):
        x = ctx.first()
        dim = ctx.arg(1, "dim", 0) % x.ndim
        if (dim in x.axes or _carries(x, dim)) and ctx.out_shape()[dim] != x.shape[dim]:
            ctx.b.fail(f"slices part of feature dim {dim}; only whole features can be merged")
        return ctx.emit(dict(x.axes), raw=x.raw, sources=(x,), heads=dict(heads_of(x)))


@dataclass(frozen=True)
class ACat:
    """aten.cat: as :class:`~hmir.frontends.shape_rules.Cat`, and a parameter (a class token)
    concatenated along the tokens joins the features it is laid beside."""

    name: str = "cat"

    def apply(self, ctx: ACtx):
        b = ctx.b
        tensors = [ctx.val(t) for t in ctx.arg(0, "tensors")]
        if any(t is None or heads_of(t) for t in tensors):
            b.fail("concatenates something that is not a plain tensor value")
        dim = ctx.arg(1, "dim", 0) % tensors[0].ndim
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
