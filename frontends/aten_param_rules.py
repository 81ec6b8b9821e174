"""Parameter ops of aten graphs: linear, conv, norms and embeddings read weights from arguments.

In an exported graph a layer is ``aten.linear(x, weight, bias)`` with ``weight`` a
``get_attr`` node; these rules slice those parameters exactly as the fx module rules do
(and reuse :class:`~hmir.frontends.rules.ParamOp`'s dense and grouped slicing).

Example::

    >>> Linear().name, Conv().groups_arg
    ('linear', 6)
"""
from __future__ import annotations

from dataclasses import dataclass

from hmir.frontends.aten_rules import ACtx, heads_of
from hmir.frontends.rules import ParamOp
from hmir.ir import Segment


@dataclass(frozen=True)
class Linear:
    """aten.linear(x, weight, bias): reads x's last dim, writes a new space."""

    name: str = "linear"

    def apply(self, ctx: ACtx):
        x, b = ctx.first(), ctx.b
        w, shape = ctx.param(1, "weight")
        bias, _ = ctx.param(2, "bias", required=False)
        axis = b.axis_of(x, -1, "this linear")
        b.read_point(x, axis)
        out = ParamOp(in_dim=-1)._dense(b, w, shape, axis, [bias] if bias else [], ctx.node.name)
        axes = {d: a for d, a in x.axes.items() if d != x.ndim - 1}
        axes[x.ndim - 1] = out
        return ctx.emit(axes, sources=(x,))


@dataclass(frozen=True)
class Conv:
    """aten.conv{1,2,3}d(x, weight, bias, stride, padding, dilation, groups)."""

    groups_arg: int = 6
    name: str = "conv"

    def apply(self, ctx: ACtx):
        x, b = ctx.first(), ctx.b
        w, shape = ctx.param(1, "weight")
        bias, _ = ctx.param(2, "bias", required=False)
        groups = int(ctx.arg(self.groups_arg, "groups", 1))
        axis = b.axis_of(x, 1, "this conv")
        b.read_point(x, axis)
        op, outs = ParamOp(in_dim=1), [bias] if bias else []
        out = (op._dense(b, w, shape, axis, outs, ctx.node.name) if groups == 1
               else op._grouped(b, w, shape, axis, outs, groups, ctx.node.name))
        axes = {d: a for d, a in x.axes.items() if d != 1}
        axes[1] = out
        return ctx.emit(axes, sources=(x,))


@dataclass(frozen=True)
class Norm:
    """Per-unit parameters at ``dim`` read from arguments ``params`` (layer_norm, batch_norm)."""

    dim: int = -1
    params: tuple[int, ...] = (2, 3)
    shape_arg: int | None = 1
    name: str = "norm"

    def apply(self, ctx: ACtx):
        x, b = ctx.first(), ctx.b
        if self.shape_arg is not None and len(ctx.arg(self.shape_arg, "normalized_shape")) != 1:
            b.fail("normalises over several dims; only the last dim is supported")
        axis = b.axis_of(x, self.dim, "this norm")
        for i in self.params:
            p, _ = ctx.param(i, f"argument {i}", required=False)
            if p:
                b.axis_slices(p, 0, axis, "out")
        if self.shape_arg is not None:
            b.size_arg(ctx.node, self.shape_arg, 0, "extent", axis)
        axes = dict(x.axes)
        axes[self.dim % x.ndim] = axis
        return ctx.emit(axes, sources=(x,))


@dataclass(frozen=True)
class Embedding:
    """aten.embedding(weight, indices): the rows are fixed (vocabulary), the columns a new space."""

    name: str = "embedding"

    def apply(self, ctx: ACtx):
        w, shape = ctx.param(0, "weight")
        idx = ctx.val(ctx.arg(1, "indices"))
        if idx is not None and (idx.axes or heads_of(idx)):
            ctx.b.fail("looks up embeddings with indices that carry features")
        sid = ctx.b.new_space(shape[1], ctx.node.name)
        ctx.b.add_slice(w, 1, sid, "out")
        return ctx.emit({len(ctx.out_shape()) - 1: (Segment(sid),)})
