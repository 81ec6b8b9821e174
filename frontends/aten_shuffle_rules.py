"""Channel shuffle (ShuffleNet's view / transpose / view) in aten graphs.

``x.view(B, g, k, H, W).transpose(1, 2).reshape(B, g·k, H, W)`` interleaves the ``g`` groups
of ``k`` channels: output channel ``j·g + i`` is input channel ``i·k + j``. A unit of one
space then sits every ``g`` entries, between units of other spaces: a strided layout the IR
cannot express (a :class:`~hmir.ir.Segment` lays units of one space side by side; tying
the groups unit by unit instead forces every later block to tie ever coarser runs of units,
which cannot be cut by the next ``chunk``). hmir therefore keeps the shuffled channels in
place: every space the shuffle reads becomes *fixed* (never permuted; merged unit ``i``
with unit ``i``, so both models need the same widths there), and the shuffled output is a
new fixed space. This is exact (the identity is always a symmetry) and recorded as the
spaces' ``fixed_reason``; the spaces inside each branch stay free and merge as usual.

:class:`ShuffleReshape` recognises the opening reshape by structure (a feature dim reshaped
to ``(g, k)``, whose only use is a transpose of those two dims, then, through elementwise
copies, a reshape merging them back) and delegates every other reshape to
:class:`~hmir.frontends.head_rules.AReshape`. ``SHUFFLE_RULES`` registers it in
:data:`~hmir.frontends.aten_table.ATEN_RULES`.

Example::

    >>> import torch, torch.nn as nn
    >>> from hmir.frontends.export import lower
    >>> class Shuffle(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 2, 1)
    ...     def forward(self, x):
    ...         y = torch.cat([self.a(x), self.b(x)], 1)
    ...         return self.c(y.view(-1, 2, 4, 5, 5).transpose(1, 2).reshape(-1, 8, 5, 5))
    >>> ir = lower(Shuffle(), torch.randn(2, 3, 5, 5))
    >>> [(s.name, s.n) for s in ir.spaces if s.fixed_reason.startswith("channel shuffle")]
    [('conv2d', 4), ('conv2d_1', 4), ('shuffle:reshape', 8)]
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from hmir.frontends.aten_rules import ACtx, heads_of
from hmir.frontends.head_rules import AReshape
from hmir.ir import Segment

aten = torch.ops.aten
_RESHAPES = (aten.view, aten.reshape, aten._unsafe_view)
_SWAPS = (aten.transpose, aten.permute)
_COPIES = (aten.clone, aten.contiguous, aten.alias, aten._to_copy)


def _packet(node):
    return getattr(node.target, "overloadpacket", node.target)


def _shape(node) -> tuple | None:
    tm = node.meta.get("tensor_meta")
    return tuple(int(s) for s in tm.shape) if hasattr(tm, "shape") else None


def _only_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def shuffle_end(node, d: int):
    """The reshape that closes a channel shuffle opened by ``node`` at dims ``d, d+1``
    (see the module docstring), or None when ``node`` does not open one."""
    t = _only_user(node)
    if t is None or _packet(t) not in _SWAPS:
        return None
    s = _shape(node)
    order = list(range(len(s)))
    order[d], order[d + 1] = d + 1, d
    if _shape(t) != tuple(s[i] for i in order) or \
            (_packet(t) is aten.permute and [i % len(s) for i in t.args[1]] != order):
        return None
    end = _only_user(t)
    while end is not None and _packet(end) in _COPIES and _shape(end) == _shape(t):
        end = _only_user(end)
    if end is None or _packet(end) not in _RESHAPES or end.args[0] is node:
        return None
    out = _shape(end)
    want = s[:d] + (s[d] * s[d + 1],) + s[d + 2:]
    return end if out == want else None


@dataclass(frozen=True)
class ShuffleReshape:
    """A reshape that opens or closes a channel shuffle; any other is ``inner``'s."""

    inner: AReshape = field(default_factory=AReshape)
    name: str = "reshape"

    def apply(self, ctx: ACtx):
        why = ctx.node.meta.get("hmir_shuffle_end")
        if why is not None:
            return self._close(ctx, *why)
        x, out = ctx.first(), ctx.out_shape()
        d = next((d for d in x.axes if d + 1 < len(out) and len(out) == x.ndim + 1 and
                  out[:d] == x.shape[:d] and out[d + 2:] == x.shape[d + 1:] and
                  out[d] * out[d + 1] == x.shape[d] and 1 < out[d] < x.shape[d]), None)
        end = shuffle_end(ctx.node, d) if d is not None and not heads_of(x) else None
        if end is None:
            return self.inner.apply(ctx)
        g, k = out[d], out[d + 1]
        why = (f"channel shuffle at '{ctx.node.name}': the {g} groups of {k} units are "
               f"interleaved, a strided layout hmir cannot permute; kept in place")
        for seg in x.axes[d]:
            ctx.b.fix(seg.space, why)
        end.meta["hmir_shuffle_end"] = (d, why)
        axes = {(e if e < d else e + 1): a for e, a in x.axes.items() if e != d}
        return ctx.emit(axes, raw=x.raw, sources=(x,))

    def _close(self, ctx: ACtx, d: int, why: str):
        x = ctx.first()
        if d in x.axes or d + 1 in x.axes or heads_of(x):
            ctx.b.fail("closes a channel shuffle over a tensor that gained features on the "
                       "shuffled dims")
        axes = {(e if e < d else e - 1): a for e, a in x.axes.items()}
        sid = ctx.b.new_space(math.prod(x.shape[d:d + 2]), f"shuffle:{ctx.node.name}", fixed=why)
        axes[d] = (Segment(sid),)
        return ctx.emit(axes, raw=x.raw, sources=(x,))


SHUFFLE_RULES: dict[object, object] = {p: ShuffleReshape() for p in _RESHAPES}
