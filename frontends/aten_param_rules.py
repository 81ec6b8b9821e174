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
from hmir.ir import ObsPoint, Segment


@dataclass(frozen=True)
class Linear:
    """aten.linear(x, weight, bias): reads x's last dim, writes a new space.

    A last dim holding the attention head index (talking heads: ``proj(attn.permute(0, 2, 3,
    1))``) mixes heads: the weight's two dims and the bias get a space of one unit per head
    in the heads' group class, and the output holds the head index again."""

    name: str = "linear"

    def apply(self, ctx: ACtx):
        x, b = ctx.first(), ctx.b
        w, shape = ctx.param(1, "weight")
        bias, _ = ctx.param(2, "bias", required=False)
        hd = heads_of(x).get(x.ndim - 1)
        if hd is not None:
            return _mix_heads(ctx, x, hd, w, shape, bias)
        axis = b.axis_of(x, -1, "this linear")
        b.read_point(x, axis)
        out = ParamOp(in_dim=-1)._dense(b, w, shape, axis, [bias] if bias else [], ctx.node.name)
        axes = {d: a for d, a in x.axes.items() if d != x.ndim - 1}
        axes[x.ndim - 1] = out
        return ctx.emit(axes, sources=(x,))


def _mix_heads(ctx: ACtx, x, hd, w: str, shape: tuple, bias: str | None):
    """A linear over the head index: ``W[j, i]`` mixes head ``i`` into head ``j``."""
    b, n = ctx.b, x.shape[-1]
    if hd.d is not None or hd.merged or hd.rep != 1 or tuple(shape) != (n, n):
        b.fail(f"applies a linear of weight {tuple(shape)} to the attention head index of a "
               f"tensor of shape {tuple(x.shape)}; hmir mixes heads only as a square linear over "
               f"a dim holding the head index alone (not the units, not heads folded with the "
               f"batch or repeated)")
    sid = b.new_space(n, f"{ctx.node.name}:{w}:heads")
    b.add_slice(w, 1, sid, "in")
    b.add_slice(w, 0, sid, "out")
    if bias:
        b.add_slice(bias, 0, sid, "out")
    b.group_links.append((hd.space, sid))
    b.points.append((sid, ObsPoint(ctx.node.name, x.ndim - 1, 0)))
    return ctx.emit(dict(x.axes), sources=(x,), heads=dict(heads_of(x)))


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
        axis = _constant_input(ctx, x) or b.axis_of(x, 1, "this conv")
        b.read_point(x, axis)
        op, outs = ParamOp(in_dim=1), [bias] if bias else []
        out = (op._dense(b, w, shape, axis, outs, ctx.node.name) if groups == 1
               else op._grouped(b, w, shape, axis, outs, groups, ctx.node.name))
        if groups > 1 and shape[1] == 1 and groups == b.axis_width(axis):   # depthwise: groups
            b.size_arg(ctx.node, self.groups_arg, None, "extent", axis)    # is the channel count
        axes = {d: a for d, a in x.axes.items() if d != 1}
        axes[1] = out
        return ctx.emit(axes, sources=(x,))


def _constant_input(ctx: ACtx, x) -> tuple | None:
    """Channels of a constant input (a Fourier position encoding computed from shapes only):
    a fixed space, never permuted (both models' weights read the same constant features)."""
    if not getattr(x, "index", False) or 1 in x.axes:
        return None
    sid = ctx.b.new_space(x.shape[1], f"constant:{ctx.node.name}:1",
                          fixed=f"constant input of '{ctx.node.name}' (computed from shapes only)")
    return (Segment(sid),)


@dataclass(frozen=True)
class Norm:
    """Per-unit parameters at ``dim`` read from arguments ``params`` (layer_norm, batch_norm,
    group_norm). ``groups_arg``: the argument holding a group count (group_norm): groups of
    more than one make a group structure; one group normalises over all units (a LayerNorm
    over channels and positions), whose statistics are permutation invariant."""

    dim: int = -1
    params: tuple[int, ...] = (2, 3)
    shape_arg: int | None = 1
    groups_arg: int | None = None
    name: str = "norm"

    def apply(self, ctx: ACtx):
        x, b = ctx.first(), ctx.b
        if self.shape_arg is not None and len(ctx.arg(self.shape_arg, "normalized_shape")) != 1:
            b.fail("normalises over several dims; only the last dim is supported")
        axis = b.axis_of(x, self.dim, "this norm")
        g = ctx.arg(self.groups_arg, "num_groups") if self.groups_arg is not None else 1
        if g != 1:
            if type(g) is not int or len(axis) != 1 or axis[0].inner != 1 or axis[0].outer != 1:
                b.fail(f"normalises {g} groups over a composite feature axis {axis}")
            b.set_group(axis[0].space, b.axis_width(axis) // g)
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


def _is_param(v) -> bool:
    return v is not None and v.param is not None and getattr(v, "pdims", None) is None


def refuse_heads(ctx: ACtx, v, what: str) -> None:
    if heads_of(v):
        ctx.b.fail(f"{what} a tensor split into attention heads; hmir follows heads only through "
                   f"reshapes, transposes, elementwise ops and scaled_dot_product_attention "
                   f"(split the projection before its view into heads)")


# -- matrix products with a parameter ------------------------------------------------------
@dataclass(frozen=True)
class ParamMatmul:
    """``addmm(bias, a, b)`` / ``mm(a, b)`` / ``bmm(a, b)`` with ``a`` or ``b`` a parameter.

    ``x @ W`` (W of shape (…, in, out), GPT-2's Conv1D): W's dim -2 reads x's last dim and W's
    dim -1 writes a new space at the output's last dim. ``W @ x`` (W of shape (…, out, in)):
    W's dim -1 reads x's dim -2, W's dim -2 writes the output's dim -2. ``bias_arg`` names the
    added tensor of ``addmm``.
    """

    a_arg: int = 0
    b_arg: int = 1
    bias_arg: int | None = None
    names: tuple[str, str] = ("self", "mat2")
    name: str = "param_matmul"

    def apply(self, ctx: ACtx):
        b = ctx.b
        a, m = (ctx.val(ctx.arg(i, n)) for i, n in zip((self.a_arg, self.b_arg), self.names))
        if a is None or m is None:
            b.fail("multiplies something that is not a tensor value")
        if _is_param(a) and _is_param(m):
            b.fail(f"multiplies two parameters ({a.param} @ {m.param}); hmir slices a parameter "
                   f"only where it multiplies a feature tensor")
        if not (_is_param(a) or _is_param(m)):
            b.fail(f"multiplies two computed tensors of shapes {tuple(a.shape)} and "
                   f"{tuple(m.shape)} (an attention-like product, not a layer); this rule lowers "
                   f"matrix products with a parameter only (x @ W, W @ x)")
        w, x, right = (m, a, True) if _is_param(m) else (a, m, False)
        refuse_heads(ctx, x, "multiplies")
        nd = x.ndim
        xdim = nd - 1 if right else nd - 2
        w_in, w_out = (w.ndim - 2, w.ndim - 1) if right else (w.ndim - 1, w.ndim - 2)
        for d in range(nd - 2):                                   # bmm: the batch of matrices
            if d in x.axes:
                b.fail(f"multiplies by a batch of weight matrices along dim {d}, which carries "
                       f"features")
        axis = b.axis_of(x, xdim, "this matrix product")
        b.read_point(x, axis)
        out = ParamOp(w_out=w_out, w_in=w_in)._dense(b, w.param, tuple(w.shape), axis, [],
                                                     ctx.node.name)
        odim = nd - 1 if right else nd - 2
        axes = {d: ax for d, ax in x.axes.items() if d != xdim}
        axes[odim] = out
        if self.bias_arg is not None:
            bias = ctx.val(ctx.arg(self.bias_arg, "self", None))
            if bias is not None:
                refuse_heads(ctx, bias, "adds")
                self._join_bias(ctx, bias, axes)
        return ctx.emit(axes, sources=(x,))

    @staticmethod
    def _join_bias(ctx: ACtx, bias, axes: dict) -> None:
        """The added tensor joins the product's feature dims as an elementwise add would."""
        b, out = ctx.b, ctx.out_shape()
        shift = len(out) - bias.ndim
        sliced = False
        for d, axis in list(axes.items()):
            bd = d - shift
            if bd < 0 or bias.shape[bd] == 1 and out[d] > 1:
                continue                                          # broadcast along this dim
            if _is_param(bias):
                b.axis_slices(bias.param, bd, axis, "out")
                sliced = True
            elif bd in bias.axes:
                axes[d] = b.union_axes(axis, bias.axes[bd])
            elif bias.raw:
                axes[d] = b.union_axes(axis, b.axis_of(bias, bd))
            else:
                b.fail(f"adds a tensor of shape {tuple(bias.shape)} whose dim {bd} carries no "
                       f"known feature layout to the product's features")
        if _is_param(bias) and not sliced and bias.param not in b.param_dims:
            b.declare(bias.param, reason="added to a matrix product along no feature dim")
        for bd in bias.axes:
            if bd + shift not in axes:
                b.fail(f"adds a tensor whose dim {bd} carries features the product lacks")
