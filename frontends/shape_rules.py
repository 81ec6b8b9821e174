"""Shape rules: flatten, reshape, permute, reductions and concat move feature axes between dims;
and the functional norms (``F.layer_norm``, ``F.group_norm``), whose parameters are arguments.

Example::

    >>> from hmir.frontends.shape_rules import Flatten
    >>> Flatten().name
    'flatten'
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hmir.frontends.builder import Builder, Val
from hmir.frontends.rules import Ctx
from hmir.ir import Segment


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
            v = ctx.emit({where[d]: a for d, a in x.axes.items()}, raw=x.raw, sources=(x,))
            if x.param is not None:                        # gamma.reshape(1, -1, 1, 1)
                base = getattr(x, "pdims", None) or {d: d for d in range(x.ndim)}
                v.param, v.pdims = x.param, {where[d]: base[d] for d in big_in if d in base}
            return v
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


@dataclass(frozen=True)
class FNorm:
    """``F.layer_norm(x, shape, weight, bias)`` / ``F.group_norm(x, groups, weight, bias)``: the
    module norms' rules (:class:`~hmir.frontends.rules.Affine`) with the parameters passed as
    ``get_attr`` arguments (a ``LayerNorm2d``'s forward). Example: ``FNorm(dim=1, shape_arg=None,
    groups_arg=1)`` is ``F.group_norm``."""

    dim: int = -1
    shape_arg: int | None = 1
    groups_arg: int | None = None
    name: str = "norm"

    def apply(self, ctx: Ctx) -> Val:
        x, b = ctx.first(), ctx.b
        shape = ctx.arg(self.shape_arg, "normalized_shape") if self.shape_arg else (1,)
        if not isinstance(shape, (tuple, list)) or len(shape) != 1:
            b.fail(f"normalises over dims {shape}; only the last dim (literal shape) is supported")
        axis = b.axis_of(x, self.dim, "this norm")
        g = ctx.arg(self.groups_arg, "num_groups") if self.groups_arg is not None else 1
        if g != 1:                     # one group: statistics over all units, no structure
            if not isinstance(g, int) or len(axis) != 1:
                b.fail(f"normalises {g} groups over a composite feature axis {axis}")
            b.set_group(axis[0].space, b.axis_width(axis) // g)
        for i, n in ((2, "weight"), (3, "bias")):
            v = ctx.val(ctx.arg(i, n, None))
            if v is not None and v.param is None:
                b.fail(f"takes its {n} from a computed tensor; hmir slices only parameters")
            if v is not None:
                b.axis_slices(v.param, 0, axis, "out")
        return ctx.emit({**x.axes, self.dim % x.ndim: axis}, sources=(x,))
