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

import math
from dataclasses import dataclass, field

import torch
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
    if getattr(ctx.module, attr, None) is None:
        return None
    return f"{ctx.node.target}.{attr}"


@dataclass(frozen=True)
class Pointwise:
    """Elementwise ops of any arity (activations, add, mul, dropout...): broadcast joins.

    Dims where several operands carry feature axes are joined (a residual add unions
    spaces); a parameter broadcast against a feature axis becomes a slice of that space.
    """

    name: str = "pointwise"

    def apply(self, ctx: Ctx) -> Val:
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
            if v.param is not None:
                b.axis_slices(v.param, dv, axis, "out")
            elif v.raw:
                axis = b.union_axes(axis, b.axis_of(v, dv))
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
        axis = b.axis_of(x, dim, "this op")
        groups = int(getattr(ctx.module, self.groups)) if self.groups else 1
        outs = [p for p in [_param(ctx, self.bias) if self.bias else None] + [_param(ctx, e) for e in self.extra_out] if p]
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


def flatten_axes(b: Builder, x: Val, start: int, end: int) -> dict[int, tuple]:
    """Axes after flattening dims ``start..end`` of ``x`` into one."""
    start, end = start % x.ndim, end % x.ndim
    carried = [d for d in range(start, end + 1) if d in x.axes]
    if len(carried) > 1:
        b.fail(f"flattens dims {carried} that all carry features")
    axes = {d: a for d, a in x.axes.items() if d < start}
    axes.update({d - (end - start): a for d, a in x.axes.items() if d > end})
    if carried:
        p = carried[0]
        inner = math.prod(x.shape[p + 1:end + 1])
        outer = math.prod(x.shape[start:p])
        axis = x.axes[p]
        if outer > 1 and (len(axis) > 1 or axis[0].outer > 1):
            b.fail(f"flattens a composite feature axis {axis} behind {outer} outer positions")
        axes[start] = tuple(Segment(s.space, s.inner * inner, s.outer * outer) for s in axis)
    return axes


@dataclass(frozen=True)
class Flatten:
    """torch.flatten / nn.Flatten / Tensor.flatten: channel units expand to blocks."""

    default_start: int = 0
    name: str = "flatten"

    def apply(self, ctx: Ctx) -> Val:
        x = ctx.first()
        if ctx.module is not None:
            start, end = ctx.module.start_dim, ctx.module.end_dim
        else:
            start = ctx.arg(1, "start_dim", self.default_start)
            end = ctx.arg(2, "end_dim", -1)
        return ctx.emit(flatten_axes(ctx.b, x, start, end), raw=x.raw, sources=(x,))


@dataclass(frozen=True)
class Reshape:
    """view/reshape: identity, flatten-like merges, or splits of dims with no feature."""

    name: str = "reshape"

    def apply(self, ctx: Ctx) -> Val:
        x, out, b = ctx.first(), ctx.out_shape(), ctx.b
        ctx.node.meta["hmir_shape_args"] = True
        if tuple(x.shape) == out:
            return ctx.emit(dict(x.axes), raw=x.raw, sources=(x,))
        big_in = [d for d, n in enumerate(x.shape) if n != 1]
        big_out = [d for d, n in enumerate(out) if n != 1]
        if [x.shape[d] for d in big_in] == [out[d] for d in big_out] and \
                all(d in big_in for d in x.axes):          # only size-1 dims added/removed
            where = dict(zip(big_in, big_out))
            return ctx.emit({where[d]: a for d, a in x.axes.items()}, raw=x.raw, sources=(x,))
        lo = 0
        while lo < min(len(out), x.ndim) and x.shape[lo] == out[lo]:
            lo += 1
        hi_x, hi_o = x.ndim, len(out)
        while hi_x > lo and hi_o > lo and x.shape[hi_x - 1] == out[hi_o - 1]:
            hi_x, hi_o = hi_x - 1, hi_o - 1
        if hi_o - lo == 1 and hi_x - lo >= 1:
            return ctx.emit(flatten_axes(b, x, lo, hi_x - 1), raw=x.raw, sources=(x,))
        if hi_x - lo == 1 and lo not in x.axes:          # split of a featureless dim
            shift = (hi_o - lo) - 1
            axes = {d if d < lo else d + shift: a for d, a in x.axes.items()}
            return ctx.emit(axes, raw=x.raw, sources=(x,))
        b.fail(f"reshapes {tuple(x.shape)} -> {out}, which splits or regroups a feature axis")


@dataclass(frozen=True)
class Reduce:
    """mean/sum/amax over dims; reducing a feature dim is allowed (it is permutation invariant)."""

    name: str = "reduce"

    def apply(self, ctx: Ctx) -> Val:
        x = ctx.first()
        dims = ctx.arg(1, "dim", None)
        keep = bool(ctx.arg(2, "keepdim", False))
        if dims is None:
            return ctx.emit({}, raw=x.raw)
        dims = {d % x.ndim for d in ((dims,) if isinstance(dims, int) else dims)}
        axes = {}
        for d, a in x.axes.items():
            if d not in dims:
                axes[d if keep else d - sum(r < d for r in dims)] = a
        return ctx.emit(axes, raw=x.raw, sources=(x,))


@dataclass(frozen=True)
class Cat:
    """torch.cat: along a feature dim it composes a space of sub-spaces; else it joins."""

    name: str = "cat"

    def apply(self, ctx: Ctx) -> Val:
        b = ctx.b
        tensors = [ctx.val(t) for t in ctx.arg(0, "tensors")]
        if any(t is None for t in tensors):
            b.fail("concatenates something that is not a tensor value")
        dim = ctx.arg(1, "dim", 0) % tensors[0].ndim
        axes: dict[int, tuple] = {}
        if any(dim in t.axes for t in tensors):
            parts = [b.axis_of(t, dim, "this concat") for t in tensors]
            if any(s.outer > 1 for p in parts for s in p):
                b.fail("concatenates feature axes that are interleaved (outer > 1)")
            axes[dim] = tuple(s for p in parts for s in p)
        for d in set().union(*(t.axes for t in tensors)) - {dim}:
            carried = [t.axes[d] for t in tensors if d in t.axes]
            if len(carried) != len(tensors):
                b.fail(f"concatenates tensors of which only some carry features at dim {d}")
            axis = carried[0]
            for other in carried[1:]:
                axis = b.union_axes(axis, other)
            axes[d] = axis
        return ctx.emit(axes, raw=all(t.raw for t in tensors), sources=tuple(tensors))


@dataclass(frozen=True)
class Permute:
    """permute / transpose: feature axes move with their dims."""

    name: str = "permute"

    def apply(self, ctx: Ctx) -> Val:
        x = ctx.first()
        args = [a for a in ctx.node.args[1:]]
        if ctx.node.target in ("transpose", torch.transpose):
            d0, d1 = (a % x.ndim for a in (ctx.arg(1, "dim0"), ctx.arg(2, "dim1")))
            order = list(range(x.ndim))
            order[d0], order[d1] = d1, d0
        else:
            dims = ctx.node.kwargs.get("dims", args[0] if len(args) == 1 and not isinstance(args[0], int) else args)
            order = [d % x.ndim for d in dims]
        axes = {new: x.axes[old] for new, old in enumerate(order) if old in x.axes}
        return ctx.emit(axes, raw=x.raw, sources=(x,))
