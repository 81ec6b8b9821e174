"""Op rules: the small closed set of semantic op kinds every frontend maps graph nodes onto.

A rule is a frozen dataclass with ``apply(ctx) -> Val | None``. Each one says how the
feature axes of a node's output relate to those of its inputs, and which parameter
slices it reads or writes. The registry (:mod:`hmir.frontends.registry`) maps module
types, functions and method names to these rules.

Example (a custom per-channel scale module, registered as data)::

    >>> from hmir.frontends.rules import Affine
    >>> Affine(dim=1, params=("scale",)).name
    'affine'
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx
import torch.nn as nn

from hmir.frontends.builder import Builder, Val
from hmir.ir import Segment

_MISSING = object()


@dataclass
class Ctx:
    """What a rule sees: the builder, the node, the called module (if any), and its output shape."""

    b: Builder
    node: fx.Node
    module: nn.Module | None = None

    def arg(self, i: int, name: str, default=_MISSING):
        if i < len(self.node.args):
            return self.node.args[i]
        if name in self.node.kwargs:
            return self.node.kwargs[name]
        if default is _MISSING:
            self.b.fail(f"is missing argument '{name}'")
        return default

    def val(self, a) -> Val | None:
        v = self.b.values.get(a) if isinstance(a, fx.Node) else None
        return v if isinstance(v, Val) else None

    def tensor_args(self) -> list[Val]:
        out: list[Val] = []
        fx.node.map_arg((self.node.args, self.node.kwargs), lambda n: out.append(self.val(n)) or n)
        return [v for v in out if v is not None]

    def out_shape(self) -> tuple[int, ...]:
        tm = self.node.meta.get("tensor_meta")
        if tm is None or not hasattr(tm, "shape"):
            self.b.fail("has no single tensor output shape (shape propagation did not record one)")
        return tuple(int(s) for s in tm.shape)

    def emit(self, axes: dict[int, tuple], raw: bool = False, sources: tuple[Val, ...] = ()) -> Val:
        v = Val(self.out_shape(), axes, raw)
        for s in sources:
            v.origin.update(s.origin)
        return self.b.observe(v, self.node)

    def first(self) -> Val:
        vals = self.tensor_args()
        if not vals:
            self.b.fail("has no tensor input")
        return vals[0]


def _param(ctx: Ctx, attr: str) -> str | None:
    """Qualified name of a called module's parameter/buffer ``attr`` (None if absent)."""
    if attr is None or getattr(ctx.module, attr, None) is None:
        return None
    return f"{ctx.node.target}.{attr}"


def position_axis(b: Builder, v: Val, dim: int, what: str) -> tuple:
    """The axis ``v`` carries at ``dim``, read by a layer. A dim with no feature (tokens, a
    constant table's coordinates) holds positions: a new *fixed* space (never permuted, merged
    unit i with unit i); a parameter read so is data (no feature dim). Heads are an error."""
    dim %= v.ndim
    if dim in v.axes or v.raw:
        return b.axis_of(v, dim, what)
    if any(dim in (h, hd.d) for h, hd in (getattr(v, "heads", None) or {}).items()):
        b.fail(f"{what} reads dim {dim}, which holds attention heads")
    why = f"positions: {what} at '{b.node.name}' reads dim {dim} of shape {tuple(v.shape)}"
    sid = b.new_space(v.shape[dim], f"positions:{b.node.name}:{dim}", fixed=why)
    if v.param is not None and v.param not in b.param_dims:
        b.declare(v.param, reason=f"read as data by '{b.node.name}' (constant positions)")
    return (Segment(sid),)


@dataclass(frozen=True)
class Pointwise:
    """Elementwise ops of any arity (activations, add, mul, dropout...): broadcast joins.

    Dims where several operands carry feature axes are joined (a residual add unions
    spaces); a parameter broadcast against a feature axis becomes a slice of that space.
    """

    name: str = "pointwise"

    def apply(self, ctx: Ctx) -> Val | None:
        if not ctx.tensor_args() and not hasattr(ctx.node.meta.get("tensor_meta"), "shape"):
            return None                           # arithmetic on sizes (H // 2, H == 224)
        ops, out = ctx.tensor_args(), ctx.out_shape()
        axes: dict[int, tuple] = {}
        for d in range(len(out)):
            axis = self._join_dim(ctx, ops, out, d)
            if axis is not None:
                axes[d] = axis
        raw = all(v.raw for v in ops if v.param is None) and any(v.param is None for v in ops)
        return ctx.emit(axes, raw=raw, sources=tuple(ops))

    def _join_dim(self, ctx: Ctx, ops: list[Val], out: tuple, d: int):
        b, here = ctx.b, []
        for v in ops:
            dv = d - (len(out) - v.ndim)
            if dv >= 0 and v.shape[dv] == out[d] and (out[d] > 1 or dv in v.axes):
                here.append((v, dv))
        axis = None
        for v, dv in here:
            if dv in v.axes:
                axis = v.axes[dv] if axis is None else b.union_axes(axis, v.axes[dv])
        if axis is None:
            return None
        for v, dv in here:
            if dv in v.axes:
                continue
            if v.param is not None:                  # a view of it: at its own dim
                b.axis_slices(v.param, (getattr(v, "pdims", None) or {}).get(dv, dv), axis, "out")
            elif v.raw:
                axis = b.union_axes(axis, b.axis_of(v, dv))
            elif v.axes or getattr(v, "heads", None):    # positions of a feature tensor
                for seg in axis:                           # (tokens) meet features: kept
                    b.fix(seg.space, f"positions: joined at '{b.node.name}' with dim {dv} of "
                                     f"shape {tuple(v.shape)}, which carries no feature")
            else:
                b.fail(f"combines a feature axis with a tensor of shape {v.shape} whose dim {dv} "
                       f"carries no known feature layout")
        return axis


@dataclass(frozen=True)
class ParamOp:
    """A weighted op (conv, linear): reads a space at ``in_dim``, writes a new one there.

    ``w_out``/``w_in`` are the weight dims of output and input units; ``groups`` names the
    module attribute holding the group count (grouped and depthwise convolutions).
    """

    in_dim: int = -1
    weight: str = "weight"
    bias: str | None = "bias"
    w_out: int = 0
    w_in: int = 1
    groups: str | None = None
    extra_out: tuple[str, ...] = ()
    name: str = "param_op"

    def apply(self, ctx: Ctx) -> Val:
        x, b = ctx.first(), ctx.b
        w = _param(ctx, self.weight)
        if w is None:
            b.fail(f"has no weight attribute '{self.weight}'")
        shape = tuple(getattr(ctx.module, self.weight).shape)
        dim = self.in_dim % x.ndim
        axis = position_axis(b, x, dim, f"this {self.name}")
        groups = int(getattr(ctx.module, self.groups)) if self.groups else 1
        outs = [p for p in map(lambda a: _param(ctx, a), (self.bias, *self.extra_out)) if p]
        b.read_point(x, axis)
        if groups == 1:
            out_axis = self._dense(b, w, shape, axis, outs, ctx.node.name)
        else:
            out_axis = self._grouped(b, w, shape, axis, outs, groups, ctx.node.name)
        axes = {d: a for d, a in x.axes.items() if d != dim}
        axes[dim] = out_axis
        return ctx.emit(axes, sources=(x,))

    def _dense(self, b: Builder, w, shape, axis, outs, name) -> tuple:
        b.axis_slices(w, self.w_in, axis, "in")
        sid = b.new_space(shape[self.w_out], name)
        b.add_slice(w, self.w_out, sid, "out")
        for p in outs:
            b.add_slice(p, 0, sid, "out")
        return (Segment(sid),)

    def _grouped(self, b: Builder, w, shape, axis, outs, groups, name) -> tuple:
        n_in, n_out = b.axis_width(axis), shape[self.w_out]
        if shape[self.w_in] == 1 and groups == n_in and n_out % n_in == 0:
            mult = n_out // n_in          # depthwise: output unit c*mult+j follows input unit c
            out_axis = tuple(Segment(s.space, s.inner * mult, s.outer) for s in axis)
            for p in (w, *outs):
                b.axis_slices(p, 0, out_axis, "out")
            return out_axis
        if len(axis) != 1 or axis[0].inner != 1 or axis[0].outer != 1:
            b.fail(f"is a grouped conv ({groups} groups) over a composite feature axis {axis}")
        s_in = axis[0].space
        b.set_group(s_in, n_in // groups)
        sid = b.new_space(n_out, name, group_size=n_out // groups)
        b.group_links.append((s_in, sid))
        b.add_slice(w, self.w_in, s_in, "in", grouped=True)
        b.add_slice(w, self.w_out, sid, "out")
        for p in outs:
            b.add_slice(p, 0, sid, "out")
        return (Segment(sid),)


@dataclass(frozen=True)
class Affine:
    """Per-unit parameters along ``dim`` (norms, custom scales): output keeps input's axes.

    ``unsliced`` names buffers with no feature dim (e.g. ``num_batches_tracked``);
    ``num_groups`` names the attribute with the group count (GroupNorm).
    """

    dim: int = 1
    params: tuple[str, ...] = ("weight", "bias")
    unsliced: tuple[str, ...] = ()
    num_groups: str | None = None
    name: str = "affine"

    def apply(self, ctx: Ctx) -> Val:
        x, b = ctx.first(), ctx.b
        dim = self.dim % x.ndim
        axis = b.axis_of(x, dim, "this norm")
        if self.num_groups:
            g = int(getattr(ctx.module, self.num_groups))
            if len(axis) != 1:
                b.fail(f"normalises {g} groups over a composite feature axis {axis}")
            b.set_group(axis[0].space, b.axis_width(axis) // g)
        for p in filter(None, (_param(ctx, a) for a in self.params)):
            b.axis_slices(p, 0, axis, "out")
        for p in filter(None, (_param(ctx, a) for a in self.unsliced)):
            b.declare(p, reason="scalar buffer")
        axes = dict(x.axes)
        axes[dim] = axis
        return ctx.emit(axes, raw=False, sources=(x,))


@dataclass(frozen=True)
class LayerNormRule(Affine):
    """LayerNorm over the last dim only (a multi-dim normalized_shape is an error)."""

    dim: int = -1
    name: str = "layer_norm"

    def apply(self, ctx: Ctx) -> Val:
        if len(ctx.module.normalized_shape) != 1:
            ctx.b.fail(f"normalises over {len(ctx.module.normalized_shape)} dims; only the last "
                       f"dim is supported")
        return super().apply(ctx)


@dataclass(frozen=True)
class Spatial:
    """Pooling and resizing: channels (dim 1) are kept, spatial dims carry no feature."""

    name: str = "spatial"

    def apply(self, ctx: Ctx) -> Val:
        x = ctx.first()
        if any(d >= 2 for d in x.axes):
            ctx.b.fail(f"pools over dims {sorted(d for d in x.axes if d >= 2)} that carry features")
        return ctx.emit({d: a for d, a in x.axes.items() if d < 2}, raw=x.raw, sources=(x,))


@dataclass(frozen=True)
class Meta:
    """Ops returning non-tensors (size, dim, shape): no feature axes."""

    name: str = "meta"

    def apply(self, ctx: Ctx) -> None:
        return None


@dataclass(frozen=True)
class GetItem:
    """Indexing a tuple/list output; indexing a tensor is not supported yet."""

    name: str = "getitem"

    def apply(self, ctx: Ctx):
        src = ctx.b.values.get(ctx.node.args[0])
        if isinstance(src, Val):
            ctx.b.fail("indexes or slices a tensor; tensor indexing is not supported yet")
        if isinstance(src, (tuple, list)):
            return src[ctx.node.args[1]]
        return None
