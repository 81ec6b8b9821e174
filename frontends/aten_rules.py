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
    Head(d=3, space=5, merged=False, lo=0, hi=None, rep=1)
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import sympy
import torch.fx as fx

from hmir.frontends.builder import Val
from hmir.frontends.rules import Ctx, Pointwise


@dataclass(frozen=True)
class Head:
    """Dim ``d`` holds the units of each head of ``space``; ``merged``: the head dim is B·H.

    ``lo``/``hi``: the dim shows units ``lo..hi`` of each head (``hi`` None: to the end; a
    slice of a head, as partial rotary or a fused q|k|v head makes). ``rep``: each head of
    ``space`` appears ``rep`` times in a row along the head dim (``repeat_kv``).
    """

    d: int | None
    space: int
    merged: bool = False
    lo: int = 0
    hi: int | None = None
    rep: int = 1

    def units(self, shape) -> tuple[int, int]:
        """The head units the value shows: ``(lo, hi)`` with ``hi`` resolved from ``shape``."""
        if self.d is None:
            return 0, 0
        return self.lo, self.lo + int(shape[self.d]) if self.hi is None else self.hi

    def whole(self, b) -> bool:
        """Whether the value shows every unit of each head."""
        return self.lo == 0 and (self.hi is None or self.hi == group_size(b, self.space))


def group_size(b, sid: int) -> int:
    """The group size of ``sid`` as the builder knows it so far (over its union)."""
    root = b.uf[sid]
    return max(b.raw[i].group_size for i in range(len(b.raw)) if b.uf[i] == root)


@dataclass
class AVal(Val):
    """A :class:`~hmir.frontends.builder.Val` with heads and, for views of a parameter, ``pdims``.

    ``pdims`` maps a dim of the value to the dim of parameter ``param`` it shows (an
    ``expand`` of a class token keeps its parameter, at shifted dims). ``index`` marks a value
    computed only from shapes, constants and integer inputs (masks, position ids, rotary
    tables): it carries no feature space, whatever ops computed it. ``copies``: dims an
    ``expand`` broadcast from size 1 (every entry along them is the same).
    """

    heads: dict[int, Head] = field(default_factory=dict)
    pdims: dict[int, int] | None = None
    index: bool = False
    copies: frozenset = frozenset()


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
        """The output; a reshape/permute of a parameter stays its view (``view_dims``)."""
        v = AVal(self.out_shape(), axes, raw, heads=heads or {}, pdims=pdims)
        if pdims is None and not axes and not heads and sources:
            from hmir.frontends.aten_index_rules import view_dims
            dims = view_dims(self, sources[0])
            if dims is not None:
                v.param, v.pdims = sources[0].param, dims
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


def pmap(v) -> dict[int, int] | None:
    """The dims of parameter ``v.param`` that ``v`` shows, ``{value dim: parameter dim}``
    (every dim for the bare parameter); None when ``v`` is not a view of a parameter."""
    if v is None or getattr(v, "param", None) is None:
        return None
    pd = getattr(v, "pdims", None)
    return {d: d for d in range(v.ndim)} if pd is None else pd


@dataclass(frozen=True)
class APointwise(Pointwise):
    """Elementwise ops: features join as in :class:`Pointwise`; heads pass through and join.

    A constant (an index value: rotary cos/sin tables) that varies along the units of a head
    pins those units (:meth:`~hmir.frontends.builder.Builder.pin`): they must keep their place.
    A parameter, or a view of one (``gamma.reshape(1, -1, 1, 1)``, a gathered bias table),
    gets a slice of each of its dims that meets a feature axis, and a space of its own in the
    heads' group class at a dim holding the head index (:mod:`hmir.frontends.aten_index_rules`).
    An elementwise function of one parameter alone (``16 * sigmoid(table)``) stays its view.
    """

    name: str = "pointwise"

    def apply(self, ctx: ACtx):
        ops, out = ctx.tensor_args(), ctx.out_shape()
        if any(pmap(v) is not None for v in ops) and not any(
                v.axes or heads_of(v) or v.raw for v in ops if pmap(v) is None):
            from hmir.frontends.aten_index_rules import param_function
            return param_function(ctx, ops, out)
        heads = self._heads(ctx, ops, out)
        from hmir.frontends.aten_index_rules import bind_heads
        bound = bind_heads(ctx, ops, out, heads)
        v = super().apply(ctx)
        for op in ops:                      # a scalar parameter (StarReLU's scale): no feature dim
            if pmap(op) is not None and all(n == 1 for n in op.shape) and \
                    op.param not in ctx.b.param_dims:
                ctx.b.declare(op.param, reason="a scalar read by an elementwise op")
        for i, op in enumerate(ops):
            self._constant(ctx, op, heads, len(out) - op.ndim, bound.get(i, ()))
        v.heads = heads
        if len(ops) == 1:
            v.copies = getattr(ops[0], "copies", frozenset())
        return v

    @staticmethod
    def _heads(ctx: ACtx, ops, out: tuple) -> dict[int, Head]:
        """The operands' heads, joined; a per-head value (no units dim, size 1 at the other
        operand's units dim: a norm over each head's units) broadcasts against whole heads."""
        heads: dict[int, Head] = {}
        src: dict[int, object] = {}
        for op in ops:
            shift = len(out) - op.ndim
            for h, hd in heads_of(op).items():
                new = replace(hd, d=None if hd.d is None else hd.d + shift)
                old = heads.setdefault(h + shift, new)
                other = src.setdefault(h + shift, op)
                if not _same_heads(old, other, new, op, out):
                    ctx.b.fail("combines two tensors whose heads are laid out differently")
                if old.d is None and new.d is not None:
                    heads[h + shift] = new
                ctx.b.union(old.space, new.space)
        return heads

    def _join_dim(self, ctx: ACtx, ops, out: tuple, d: int):
        """At a dim holding the head index, a feature axis (T5's per-head position bias, an
        embedding of width = heads) joins the heads' group class instead of a feature dim."""
        head = next((hd for op in ops for h, hd in heads_of(op).items()
                     if h + len(out) - op.ndim == d), None)
        if head is None:
            from hmir.frontends.aten_index_rules import join_dim
            return join_dim(ctx, ops, out, d)
        for v in ops:
            dv = d - (len(out) - v.ndim)
            if dv < 0 or dv not in v.axes:
                continue
            axis = v.axes[dv]
            if head.d is not None or len(axis) != 1 or (axis[0].inner, axis[0].outer) != (1, 1) \
                    or v.shape[dv] != out[d]:
                ctx.b.fail("adds a feature tensor to attention heads other than as one value per "
                           "head (a per-head bias of the attention scores)")
            ctx.b.read_point(v, axis)
            ctx.b.group_links.append((head.space, axis[0].space))
        return None

    @staticmethod
    def _constant(ctx: ACtx, op, heads: dict[int, Head], shift: int, bound=()) -> None:
        for h, hd in heads.items():
            for d, what in ((h, "head"), (hd.d, "units")):
                if d is None or d - shift < 0 or op.shape[d - shift] == 1 or _carries(op, d - shift) \
                        or d - shift in getattr(op, "copies", ()) \
                        or (what == "head" and (d - shift in op.axes or d - shift in bound)):
                    continue
                if what == "units" and getattr(op, "index", False):
                    ctx.b.pin(hd.space, *hd.units(ctx.out_shape()))
                    continue
                ctx.b.fail(f"combines attention heads with a tensor of shape {op.shape} that is "
                           f"not split into the same heads (dim {d - shift})" +
                           (": a constant per head cannot follow a permutation of heads"
                            if getattr(op, "index", False) else ""))


def _same_heads(x: Head, xv, y: Head, yv, out: tuple) -> bool:
    """Heads ``x`` of value ``xv`` and ``y`` of ``yv`` (dims of ``out``) combine elementwise."""
    if (x.merged, x.rep) != (y.merged, y.rep):
        return False
    if x.d is not None and y.d is not None:
        return x.d == y.d and x.units(out) == y.units(out)
    (n, nv), d = (x, xv) if x.d is None else (y, yv), x.d if x.d is not None else y.d
    return d is None or _size(nv, d - len(out) + nv.ndim) in (1, None) or \
        d - len(out) + nv.ndim in getattr(nv, "copies", ())          # expand_as of a norm


def _size(v, d: int | None) -> int | None:
    """``v``'s size at dim ``d`` (None where ``v`` has no such dim)."""
    return None if d is None or d < 0 or d >= v.ndim else int(v.shape[d])


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
            pdims = {d + shift: p for d, p in pmap(x).items()}
        v = ctx.emit(axes, raw=x.raw, sources=(x,), heads=heads, pdims=pdims)
        v.param = x.param
        ins = (1,) * shift + tuple(x.shape)
        v.copies = frozenset(d for d, (i, o) in enumerate(zip(ins, v.shape)) if i == 1 and o > 1)
        return v
