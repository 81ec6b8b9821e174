"""Aten rules for gathered bias tables, parameters read directly by ops, and the remaining vision ops.

A parameter read by an elementwise op (a layer scale, a position embedding, a per-head bias)
is sliced where it meets features: each of its dims that broadcasts against a feature axis
gets a slice of that axis's space; a dim against the head index of attention scores gets a
space of its own in the heads' group class. Views keep track of which parameter dim each dim
shows (:attr:`~hmir.frontends.aten_rules.AVal.pdims`): reshapes, permutes, ``index`` gathers
(``table[relative_position_index]``: the gathered dim shows no parameter dim) and
elementwise functions of the parameter alone (``16 * sigmoid(table)``). A dim that must bind
but shows no parameter dim is an error. Registered in :mod:`hmir.frontends.aten_table`
through ``INDEX_RULES`` (entries here override the main table's).

Example::

    >>> import torch
    >>> from hmir.frontends.aten_table import lookup
    >>> lookup(torch.ops.aten.index.Tensor).name, lookup(torch.ops.aten.roll.default).name
    ('index', 'roll')
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from hmir.frontends.aten_einsum_rules import Einsum
from hmir.frontends.aten_param_rules import Norm
from hmir.frontends.aten_rules import ACtx, APointwise, AVal, Expand, _carries, heads_of, pmap
from hmir.frontends.head_rules import APermute, AReshape, groups
from hmir.frontends.rules import Pointwise
from hmir.ir import ObsPoint

aten = torch.ops.aten
_COPIES = {getattr(aten, n) for n in ("contiguous", "clone", "alias", "detach", "_to_copy", "to",
                                      "type_as", "lift_fresh_copy")}


def param_function(ctx: ACtx, ops, out: tuple):
    """An elementwise function of one parameter (and constants): a view of that parameter at
    each of its dims along which no constant varies; a pure copy keeps the parameter itself."""
    params = {v.param for v in ops if pmap(v) is not None}
    if len(params) != 1:
        ctx.b.fail(f"combines parameters {sorted(params)} before they meet a feature tensor; hmir "
                   f"slices one parameter per value")
    pdims: dict[int, int] = {}
    for d in range(len(out)):
        seen = {pmap(v).get(d - len(out) + v.ndim) for v in ops if pmap(v) is not None
                and _size(v, d - len(out) + v.ndim) == out[d]}
        varies = any(pmap(v) is None and _size(v, d - len(out) + v.ndim) not in (None, 1)
                     for v in ops)
        if len(seen) == 1 and None not in seen and not varies:
            pdims[d] = seen.pop()
    p = next(v for v in ops if pmap(v) is not None)
    keep = len(ops) == 1 and p.pdims is None and tuple(p.shape) == out and \
        getattr(ctx.node.target, "overloadpacket", None) in _COPIES
    v = ctx.emit({}, pdims=None if keep else pdims)
    v.param = p.param
    return v


def _size(v, d: int) -> int | None:
    return None if d < 0 or d >= v.ndim else int(v.shape[d])


def join_dim(ctx: ACtx, ops, out: tuple, d: int):
    """:meth:`Pointwise._join_dim` at dim ``d``, parameters (and views) sliced at the
    parameter dim they show there."""
    params = [v for v in ops if pmap(v) is not None]
    axis = Pointwise._join_dim(APointwise(), ctx, [v for v in ops if pmap(v) is None], out, d)
    for v in params:
        dv = d - len(out) + v.ndim
        if axis is None or dv < 0 or v.shape[dv] != out[d] or out[d] == 1:
            continue
        if dv not in pmap(v):
            ctx.b.fail(f"combines a feature axis with dim {dv} of parameter '{v.param}' seen "
                       f"through a gather or reshape (shape {tuple(v.shape)}), which is not one "
                       f"of the parameter's dims; hmir slices only whole parameter dims")
        ctx.b.axis_slices(v.param, pmap(v)[dv], axis, "out")
    return axis


def bind_heads(ctx: ACtx, ops, out: tuple, heads: dict) -> dict[int, set]:
    """A parameter (view) varying along the head index of attention values (a relative
    position bias table, a per-head logit scale): its dim there gets a new space, one unit
    per head, in the heads' group class, observed on the biased values. Returns ``{operand index: dims bound}``."""
    b, bound = ctx.b, {}
    for i, v in enumerate(ops):
        pm = pmap(v)
        for h, hd in heads.items() if pm is not None else ():
            dv = h - len(out) + v.ndim
            if dv < 0 or v.shape[dv] == 1:
                continue
            if dv not in pm or hd.merged or hd.rep != 1 or v.shape[dv] != out[h]:
                b.fail(f"adds parameter '{v.param}' (shape {tuple(v.shape)}) along the attention "
                       f"heads at its dim {dv}, which is not one of the parameter's dims, or "
                       f"heads folded with the batch or repeated")
            if hd.d is not None and _size(v, hd.d - len(out) + v.ndim) not in (None, 1):
                b.fail(f"combines parameter '{v.param}' with the units of attention heads; "
                       f"hmir binds a parameter to heads only as one value per head")
            sid = b.new_space(out[h], f"{ctx.node.name}:{v.param}:heads")
            b.add_slice(v.param, pm[dv], sid, "out")
            b.group_links.append((hd.space, sid))
            b.points.append((sid, ObsPoint(ctx.node.name, h, 0)))       # the biased scores
            bound.setdefault(i, set()).add(dv)
    return bound


def _refuse(ctx: ACtx, x, dims, what: str) -> None:
    for d in dims:
        if d in x.axes or _carries(x, d):
            ctx.b.fail(f"{what} dim {d} of a tensor of shape {tuple(x.shape)}, which carries "
                       f"features or attention heads; only positions (spatial, token) dims can be")


@dataclass(frozen=True)
class Index:
    """``aten.index(x, [i0, i1, ...])``: gathers positions of ``x`` with index tensors.

    The gathered dims must carry no feature (``table[relative_position_index]``,
    ``biases[:, idxs]``, tokens); the other dims keep their axes and heads, and a parameter's
    view keeps its parameter dims (the gathered dims show none). Indices computed from
    features are an error.
    """

    name: str = "index"

    def apply(self, ctx: ACtx):
        x, idx = ctx.val(ctx.arg(0, "self")), list(ctx.arg(1, "indices"))
        if x is None:
            ctx.b.fail("indexes something that is not a tensor value")
        for i in idx:
            if i is not None and not getattr(ctx.val(i), "index", False):
                ctx.b.fail("indexes with a tensor computed from features or parameters; hmir "
                           "follows only gathers by constant (index) tensors")
        pos = [k for k, i in enumerate(idx) if i is not None]
        _refuse(ctx, x, pos, "gathers along")
        nb = len(ctx.out_shape()) - (x.ndim - len(pos))
        rest = [d for d in range(x.ndim) if d not in pos]
        if pos == list(range(pos[0], pos[-1] + 1)):           # adjacent: the result stays there
            where = {d: d if d < pos[0] else d - len(pos) + nb for d in rest}
        else:                                                   # apart: gathered dims lead
            where = {d: nb + k for k, d in enumerate(rest)}
        v = ctx.emit({where[d]: a for d, a in x.axes.items()}, raw=x.raw, sources=(x,),
                     heads={where[h]: replace(hd, d=None if hd.d is None else where[hd.d])
                            for h, hd in heads_of(x).items()})
        if pmap(x) is not None:
            v.param, v.pdims = x.param, {where[d]: p for d, p in pmap(x).items() if d in where}
        return v


def view_dims(ctx: ACtx, x) -> dict[int, int] | None:
    """For a reshape or permute of a parameter (or a view of one): the parameter dim each output
    dim shows (``gamma.reshape(1, -1, 1, 1)`` shows dim 0 at dim 1). None for other nodes.
    :meth:`ACtx.emit <hmir.frontends.aten_rules.ACtx.emit>` calls it, whichever rule lowers
    the reshape."""
    kind = _VIEWS.get(getattr(ctx.node.target, "overloadpacket", None))
    pm = pmap(x)
    if kind is None or pm is None or x.axes or heads_of(x):
        return None
    out = ctx.out_shape()
    if kind == "permute":
        return {k: pm[d] for k, d in enumerate(APermute._order(ctx, x.ndim)) if d in pm}
    new = {}
    for gi, gj in groups(tuple(x.shape), out):
        bi, bo = [d for d in gi if x.shape[d] != 1], [d for d in gj if out[d] != 1]
        if len(bi) == 1 and len(bo) == 1 and bi[0] in pm:
            new[bo[0]] = pm[bi[0]]
    return new


_VIEWS = {**{getattr(aten, n): "reshape" for n in ("view", "reshape", "_unsafe_view", "unflatten",
                                                    "flatten", "unsqueeze", "squeeze", "view_as",
                                                    "reshape_as")},
          **{getattr(aten, n): "permute" for n in ("permute", "transpose", "t", "swapaxes",
                                                    "swapdims")}}


@dataclass(frozen=True)
class Reduce:
    """mean / sum / amax / var / std / linalg_vector_norm over dims (arguments read by name).

    Reducing feature dims is allowed (permutation invariant); reducing the units of
    attention heads leaves one value per head; reducing the head index is an error.
    """

    name: str = "reduce"

    def apply(self, ctx: ACtx):
        x = ctx.first()
        dims = _schema_arg(ctx, "dim", None)
        keep = bool(_schema_arg(ctx, "keepdim", False))
        dims = range(x.ndim) if dims is None or dims == [] else \
            [dims] if isinstance(dims, int) else dims
        dims = {d % x.ndim for d in dims}
        _refuse(ctx, x, [h for h in heads_of(x) if h in dims], "reduces over the heads at")
        at = {d: d if keep else d - sum(r < d for r in dims) for d in range(x.ndim)
              if d not in dims}
        heads = {at[h]: replace(hd, d=at.get(hd.d)) for h, hd in heads_of(x).items()}
        axes = {at[d]: a for d, a in x.axes.items() if d in at}
        return ctx.emit(axes, raw=x.raw, sources=(x,), heads=heads)


def _schema_arg(ctx: ACtx, name: str, default):
    names = [a.name for a in ctx.node.target._schema.arguments]
    return ctx.arg(names.index(name), name, default) if name in names else default


@dataclass(frozen=True)
class Positional:
    """``pad(x, pad)`` / ``constant_pad_nd`` and ``roll(x, shifts, dims)``: positions move or
    grow along dims that must carry no feature (spatial padding, Swin's shifted windows)."""

    name: str

    def apply(self, ctx: ACtx):
        x = ctx.first()
        if self.name == "roll":
            dims = list(ctx.arg(2, "dims", []) or range(x.ndim))
        else:
            pads = list(ctx.arg(1, "pad"))
            dims = [x.ndim - 1 - k // 2 for k, p in enumerate(pads) if not (type(p) is int and p == 0)]
        _refuse(ctx, x, sorted({d % x.ndim for d in dims}), f"{self.name}s")
        return ctx.emit(dict(x.axes), raw=x.raw, sources=(x,), heads=dict(heads_of(x)))


@dataclass(frozen=True)
class Constant:
    """``new_zeros(x, size)`` / ``zeros_like(x)`` ...: reads only ``x``'s shape, dtype and
    device, never its values: the result is a constant (an index value, no feature).
    ``fill_``/``zero_`` of a constant too; of anything else: :mod:`~hmir.frontends.aten_fill_rules`."""

    name: str = "constant"

    def apply(self, ctx: ACtx):
        if self.name == "fill":
            x, value = ctx.val(ctx.arg(0, "self")), ctx.val(ctx.arg(1, "value", None))
            if value is not None and (value.ndim or not getattr(value, "index", False)
                                      and value.param is None):
                ctx.b.fail("fills in place with a tensor that is not a scalar constant; hmir "
                           "follows in-place fills only with constants")
            if value is not None and value.param is not None and value.param not in ctx.b.param_dims:
                ctx.b.declare(value.param, reason="a scalar filled in place (no feature dim)")
            if not getattr(x, "index", False):            # features, or a parameter's copy
                from hmir.frontends.aten_fill_rules import fill_in_place
                return fill_in_place(ctx, x)
        return AVal(ctx.out_shape(), index=True)


def _with_inplace(names: str, rule) -> dict:
    return {getattr(aten, v): rule for n in names.split() for v in (n, n + "_") if hasattr(aten, v)}


INDEX_RULES: dict[object, object] = {
    aten.index: Index(),
    aten.einsum: Einsum(),                              # a batched matmul (MaxViT attention)
    aten.swapaxes: APermute(),                          # transposes by another name
    aten.swapdims: APermute(),
    aten.expand_as: Expand(),                           # F.normalize: x / norm.expand_as(x)
    aten.reshape_as: AReshape(sizes_arg=None),          # sizes from the template tensor
    aten.view_as: AReshape(sizes_arg=None),
    **_with_inplace("fill", Constant("fill")),
    aten.zero_: Constant("fill"),
    **{getattr(aten, n): Constant() for n in ("new_zeros", "new_ones", "new_full", "new_empty",
                                              "zeros_like", "ones_like", "full_like", "empty_like")},
    **_with_inplace("sin cos addcmul addcdiv", APointwise()),
    **{getattr(aten, n): Reduce() for n in ("mean", "sum", "amax", "amin", "var", "std",
                                            "linalg_vector_norm")},
    aten.pad: Positional("pad"),
    aten.constant_pad_nd: Positional("pad"),
    aten.roll: Positional("roll"),
    aten.group_norm: Norm(dim=1, params=(2, 3), shape_arg=None, groups_arg=1),
}
