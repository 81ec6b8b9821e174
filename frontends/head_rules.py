"""Shape rules for aten graphs that understand attention heads: reshape, permute, attention.

A reshape is cut into *groups*: runs of input dims and output dims with equal products
(sizes compared symbolically, so the exported batch ``s0`` never collides with a width).
Per group, feature dims are carried over (``n → n``), split into heads
(``n → (H, d)`` or, with the batch folded in, ``(B, n) → (B·H, d)``), merged back, or
flattened with featureless dims (``(C, H, W) → C·H·W``). Anything else is an error that
names the node.

A fresh projection's feature dim reshaped to ``(k, H, d)`` is split into ``k`` pieces of
``H`` heads each, and a feature dim merged with batch or spatial dims (a patch unfold) is
followed inside the merged dim (:mod:`hmir.frontends.aten_layout_rules`). Attention itself
lives in :mod:`hmir.frontends.attention_rules` (re-exported here).

Example::

    >>> groups((2, 16, 64), (2, 16, 4, 16))
    [([0], [0]), ([1], [1]), ([2], [2, 3])]
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import sympy

from hmir.frontends.aten_layout_rules import (FoldVal, PieceVal, emit_folds, emit_pieces,
                                              fold_group, fused_pieces, refuse_layout, relayout)
from hmir.frontends.aten_rules import ACtx, Head, heads_of
from hmir.frontends.attention_rules import Attention, MatMul, attention_output, bind_qk  # noqa: F401
from hmir.frontends.shape_rules import flatten_axes
from hmir.ir import Segment

_PRIMES = (10007, 10009, 10037, 10039, 10061, 10067)


def numeric(shape: tuple) -> tuple[int, ...]:
    """Sizes with each symbol replaced by a distinct large prime (for grouping only)."""
    syms = sorted({s for e in shape for s in sympy.sympify(e).free_symbols}, key=str)
    sub = dict(zip(syms, _PRIMES))
    return tuple(int(sympy.sympify(e).subs(sub)) for e in shape)


def groups(a: tuple, b: tuple) -> list[tuple[list[int], list[int]]]:
    """Runs of dims of ``a`` and ``b`` with equal size products, in order."""
    out, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        gi, gj, pi, pj = [], [], 1, 1
        while not (gi and gj and pi == pj) or (i < len(a) and a[i] == 1) or (j < len(b) and b[j] == 1):
            if j < len(b) and b[j] == 1 and not (i < len(a) and a[i] == 1):
                gj.append(j)
                j += 1
            elif i < len(a) and (pi <= pj or j >= len(b) or a[i] == 1):
                pi, i = pi * a[i], i + 1
                gi.append(i - 1)
            elif j < len(b):
                pj, j = pj * b[j], j + 1
                gj.append(j - 1)
            else:
                break
        out.append((gi, gj))
    return out


@dataclass(frozen=True)
class AReshape:
    """view / reshape / unflatten / flatten / (un)squeeze, with heads (see module docstring)."""

    sizes_arg: int | None = 1
    name: str = "reshape"
    reads_layouts = True

    def apply(self, ctx: ACtx):
        x = ctx.first()
        if isinstance(x, PieceVal):
            refuse_layout(ctx, x, "reshapes")
        ctx.node.meta["hmir_shape_args"] = self.sizes_arg == 1
        a, o = numeric(ctx.sym(ctx.node.args[0])), numeric(ctx.sym())
        axes, heads, dmap, extra = {}, {}, {}, {"folds": {}}
        for gi, gj in groups(a, o):
            self._group(ctx, x, a, o, gi, gj, axes, heads, dmap, extra)
        for h, hd in list(heads.items()):
            if hd.d is not None and hd.d < 0:           # a d dim carried by another group
                if -hd.d - 1 not in dmap:
                    ctx.b.fail("reshapes the units of attention heads apart from their heads")
                heads[h] = replace(hd, d=dmap[-hd.d - 1])
        if "pieces" in extra:
            return emit_pieces(ctx, x, axes, heads, *extra["pieces"])
        if extra["folds"]:
            if heads:
                ctx.b.fail("folds features together with other dims in a tensor that also "
                           "carries attention heads; hmir cannot follow both")
            return emit_folds(ctx, x, axes, extra["folds"])
        return ctx.emit(axes, raw=x.raw, sources=(x,), heads=heads)

    def _group(self, ctx, x, a, o, gi, gj, axes, heads, dmap, extra) -> None:
        b, xh = ctx.b, heads_of(x)
        feat = [d for d in gi if d in x.axes]
        hdims = [d for d in gi if d in xh]
        ddims = [hd.d for hd in xh.values() if hd.d in gi]
        if any(d in getattr(x, "folds", {}) for d in gi):
            return fold_group(ctx, x, a, o, gi, gj, axes, extra["folds"])
        if not (feat or hdims or ddims):
            return
        big_i = [d for d in gi if a[d] != 1]
        big_o = [d for d in gj if o[d] != 1]
        if len(big_i) == 1 and len(big_o) == 1:                     # carried over
            i, j = big_i[0], big_o[0]
            dmap[i] = j
            if i in x.axes:
                axes[j] = x.axes[i]
            if i in xh:
                heads[j] = replace(xh[i], d=None if xh[i].d is None else -xh[i].d - 1)
            self._literal(ctx, x, i, j)
            return
        if feat and not hdims and not ddims and len(feat) == 1:
            return self._split(ctx, x, a, o, feat[0], big_i, big_o, axes, heads, gi, gj, extra)
        if hdims and not feat:
            return self._heads(ctx, x, a, o, hdims, ddims, big_i, big_o, axes, heads, gj)
        b.fail(f"reshapes {tuple(x.shape)} -> {ctx.out_shape()} in a way hmir cannot follow "
               f"(input dims {gi} become output dims {gj})")

    def _literal(self, ctx, x, i: int, j: int) -> None:
        """A literal size of a dim kept by a view is a feature extent (``(B·S, n) -> (B, S, n)``
        after a Conv1D addmm), a head's units or the head count (``reshape(B, -1, S, d)``):
        the backend rewrites it when widths change."""
        if self.sizes_arg != 1:
            return
        if i in x.axes:
            ctx.b.size_arg(ctx.node, 1, j, "extent", x.axes[i])
        for h, hd in heads_of(x).items():
            if hd.d == i and hd.whole(ctx.b):
                ctx.b.size_arg(ctx.node, 1, j, "units", hd.space)
            elif h == i and not hd.merged and hd.rep == 1:
                ctx.b.size_arg(ctx.node, 1, j, "groups", hd.space)

    def _split(self, ctx, x, a, o, f, big_i, big_o, axes, heads, gi, gj, extra) -> None:
        b, axis = ctx.b, x.axes[f]
        if len(big_o) == 1 and f == big_i[0]:                        # (C, H, W) -> C·H·W
            axes[big_o[0]] = flatten_axes(b, x, gi[0], gi[-1])[gi[0]]
            return
        plain = len(axis) == 1 and axis[0].inner == 1 and axis[0].outer == 1
        at = (lambda d: d - gj[0]) if self.sizes_arg == 2 else (lambda d: d)
        if plain and big_i == [f] and len(big_o) == 3:                  # n -> (k, H, d) pieces
            extra["pieces"] = fused_pieces(ctx, x, f, big_o, self.sizes_arg, at)
            return
        if not plain or f != big_i[-1] or len(big_o) != 2:              # a patch unfold, ...
            return fold_group(ctx, x, a, o, gi, gj, axes, extra["folds"])
        sid, n = axis[0].space, b.axis_width(axis)
        d = o[big_o[1]]
        other = math.prod(a[i] for i in big_i[:-1])
        if n % d or d == n or o[big_o[0]] != other * (n // d):
            b.fail(f"reshapes feature dim {f} (width {n}) into {o[big_o[0]]} x {d}, which is not "
                   f"heads x units")
        b.read_point(x, axis)
        b.set_group(sid, d)
        heads[big_o[0]] = Head(big_o[1], sid, merged=other != 1)
        b.size_arg(ctx.node, self.sizes_arg, at(big_o[1]), "units", sid)
        if other == 1:
            b.size_arg(ctx.node, self.sizes_arg, at(big_o[0]), "groups", sid)

    def _heads(self, ctx, x, a, o, hdims, ddims, big_i, big_o, axes, heads, gj) -> None:
        b, xh = ctx.b, heads_of(x)
        h = hdims[0]
        hd = xh[h]
        if len(hdims) == 1 and hd.d in ddims and big_i == [h, hd.d] and len(big_o) == 1 \
                and not hd.merged:                                   # (H, d) -> n
            if not hd.whole(b) or hd.rep != 1:
                b.fail("merges attention heads back into features while it shows only part of "
                       "each head's units, or copies of the heads")
            axes[big_o[0]] = (Segment(hd.space),)
            return
        copies = getattr(x, "copies", frozenset())
        if len(hdims) == 1 and not ddims and not hd.merged and len(big_o) == 1 and \
                len(big_i) == 2 and big_i[0] == h and big_i[1] in copies:  # repeat_kv
            heads[big_o[0]] = replace(hd, d=None if hd.d is None else -hd.d - 1,
                                      rep=hd.rep * a[big_i[1]])
            return
        if len(hdims) == 1 and not ddims and hd.merged and len(big_i) == 1 and len(big_o) == 2:
            k = b.raw[hd.space].width // b.raw[hd.space].group_size    # B·H -> (B, H)
            if o[big_o[1]] == k:
                heads[big_o[1]] = replace(hd, d=-hd.d - 1, merged=False)
                return
        if len(hdims) == 1 and not ddims and not hd.merged and big_i[-1] == h and len(big_o) == 1:
            heads[big_o[0]] = replace(hd, d=-hd.d - 1, merged=True)  # (B, H) -> B·H
            return
        b.fail(f"reshapes attention heads {tuple(x.shape)} -> {ctx.out_shape()} in a way hmir "
               f"cannot follow")


@dataclass(frozen=True)
class APermute:
    """aten.permute / transpose / t: feature axes and heads move with their dims."""

    name: str = "permute"
    reads_layouts = True

    def apply(self, ctx: ACtx):
        x = ctx.first()
        order = self._order(ctx, x.ndim)
        where = {old: new for new, old in enumerate(order)}
        if isinstance(x, (PieceVal, FoldVal)):
            return relayout(ctx, x, where)
        axes = {where[d]: a for d, a in x.axes.items()}
        heads = {where[h]: replace(hd, d=None if hd.d is None else where[hd.d])
                 for h, hd in heads_of(x).items()}
        return ctx.emit(axes, raw=x.raw, sources=(x,), heads=heads)

    @staticmethod
    def _order(ctx, n: int) -> list[int]:
        packet = getattr(ctx.node.target, "__name__", "")
        if packet.startswith("permute"):
            return [d % n for d in ctx.arg(1, "dims")]
        order = list(range(n))
        if n >= 2:
            d0, d1 = (ctx.arg(1, "dim0", 0) % n, ctx.arg(2, "dim1", 1) % n)
            order[d0], order[d1] = d1, d0
        return order
