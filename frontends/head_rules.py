"""Shape rules for aten graphs that understand attention heads: reshape, permute, attention.

A reshape is cut into *groups*: runs of input dims and output dims with equal products
(sizes compared symbolically, so the exported batch ``s0`` never collides with a width).
Per group, feature dims are carried over (``n → n``), split into heads
(``n → (H, d)`` or, with the batch folded in, ``(B, n) → (B·H, d)``), merged back, or
flattened with featureless dims (``(C, H, W) → C·H·W``). Anything else is an error that
names the node.

Example::

    >>> groups((2, 16, 64), (2, 16, 4, 16))
    [([0], [0]), ([1], [1]), ([2], [2, 3])]
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import sympy

from hmir.frontends.aten_rules import ACtx, Head, heads_of
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

    def apply(self, ctx: ACtx):
        x = ctx.first()
        ctx.node.meta["hmir_shape_args"] = self.sizes_arg == 1
        a, o = numeric(ctx.sym(ctx.node.args[0])), numeric(ctx.sym())
        axes, heads, dmap = {}, {}, {}
        for gi, gj in groups(a, o):
            self._group(ctx, x, a, o, gi, gj, axes, heads, dmap)
        for h, hd in list(heads.items()):
            if hd.d is not None and hd.d < 0:           # a d dim carried by another group
                if -hd.d - 1 not in dmap:
                    ctx.b.fail("reshapes the units of attention heads apart from their heads")
                heads[h] = replace(hd, d=dmap[-hd.d - 1])
        return ctx.emit(axes, raw=x.raw, sources=(x,), heads=heads)

    def _group(self, ctx, x, a, o, gi, gj, axes, heads, dmap) -> None:
        b, xh = ctx.b, heads_of(x)
        feat = [d for d in gi if d in x.axes]
        hdims = [d for d in gi if d in xh]
        ddims = [hd.d for hd in xh.values() if hd.d in gi]
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
            return self._split(ctx, x, a, o, feat[0], big_i, big_o, axes, heads, gi, gj)
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

    def _split(self, ctx, x, a, o, f, big_i, big_o, axes, heads, gi, gj) -> None:
        b, axis = ctx.b, x.axes[f]
        if len(big_o) == 1 and f == big_i[0]:                        # (C, H, W) -> C·H·W
            axes[big_o[0]] = flatten_axes(b, x, gi[0], gi[-1])[gi[0]]
            return
        plain = len(axis) == 1 and axis[0].inner == 1 and axis[0].outer == 1
        if not plain or f != big_i[-1] or len(big_o) != 2:
            b.fail(f"reshapes {tuple(x.shape)} -> {ctx.out_shape()}, which splits or regroups "
                   f"feature dim {f} in a way hmir cannot follow")
        sid, n = axis[0].space, b.axis_width(axis)
        d = o[big_o[1]]
        other = math.prod(a[i] for i in big_i[:-1])
        if n % d or d == n or o[big_o[0]] != other * (n // d):
            b.fail(f"reshapes feature dim {f} (width {n}) into {o[big_o[0]]} x {d}, which is not "
                   f"heads x units")
        b.read_point(x, axis)
        b.set_group(sid, d)
        heads[big_o[0]] = Head(big_o[1], sid, merged=other != 1)
        at = (lambda d: d - gj[0]) if self.sizes_arg == 2 else (lambda d: d)
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

    def apply(self, ctx: ACtx):
        x = ctx.first()
        order = self._order(ctx, x.ndim)
        where = {old: new for new, old in enumerate(order)}
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


@dataclass(frozen=True)
class Attention:
    """aten.scaled_dot_product_attention(q, k, v, mask): q and k share a head-grouped space,
    v (and what reads the output) another; the two are linked as one group class.

    Grouped-query attention (``repeat_kv`` copies, or ``enable_gqa``): q's space becomes a
    view of k's with ``rep`` query heads per kv head, and the output a view of v's. q and k
    read from two runs of one fused head (q|k|v in one projection) must move alike: both
    runs are pinned.
    """

    name: str = "attention"

    def apply(self, ctx: ACtx):
        b = ctx.b
        q, k, v = (ctx.val(ctx.arg(i, n)) for i, n in enumerate(("query", "key", "value")))
        hq, hk, hv = (self._head(ctx, t, n) for t, n in ((q, "query"), (k, "key"), (v, "value")))
        mask = ctx.val(ctx.arg(3, "attn_mask", None))
        if mask is not None and (heads_of(mask) or set(mask.axes) - {hq[0] - q.ndim + mask.ndim}):
            b.fail("uses an attention mask that carries features (other than one bias per head)")
        if mask is not None and mask.axes:                  # a per-head bias (T5): joins the heads
            axis = next(iter(mask.axes.values()))
            if len(axis) != 1 or b.width(axis[0].space) != q.shape[hq[0]]:
                b.fail("uses an attention mask whose head dim is not one bias per head")
            b.read_point(mask, axis)
            b.group_links.append((hq[1].space, axis[0].space))
        if not (hq[0] == hk[0] == hv[0]):
            b.fail("has query, key and value with heads at different dims")
        gqa = q.shape[hq[0]] // k.shape[hk[0]] if ctx.node.kwargs.get("enable_gqa") else 1
        bind_qk(ctx, (q, hq[1]), (k, replace(hk[1], rep=hk[1].rep * gqa)))
        out = attention_output(ctx, q, hq[1], v, replace(hv[1], rep=hv[1].rep * gqa))
        return ctx.emit({}, sources=(v,), heads={hv[0]: out})

    @staticmethod
    def _head(ctx, t, what: str):
        hs = heads_of(t) if t is not None else {}
        if len(hs) != 1 or next(iter(hs.values())).d != len(t.shape) - 1 or t.axes:
            ctx.b.fail(f"takes a {what} that is not split into heads x units at its last dim "
                       f"(reshape it with view(B, S, heads, head_dim) first)")
        return next(iter(hs.items()))


def bind_qk(ctx: ACtx, q: tuple, k: tuple) -> None:
    """q·k contracts each head's units: q's and k's units must move alike."""
    b, (qv, hq), (kv, hk) = ctx.b, q, k
    if hq.rep != 1:
        b.fail("takes a query whose heads are copies; hmir follows copies of keys and values only")
    if hk.rep > 1:
        if not hq.whole(b):
            b.fail("uses grouped-query attention on part of each query head's units")
        b.view(hq.space, hk.space, hk.rep, hk.units(kv.shape)[0])
    elif hq.whole(b) and hk.whole(b):
        b.union(hq.space, hk.space)
    elif b.uf[hq.space] == b.uf[hk.space]:
        if hq.units(qv.shape) != hk.units(kv.shape):         # q|k|v in one head: pin q and k
            b.pin(hq.space, *hq.units(qv.shape))
            b.pin(hk.space, *hk.units(kv.shape))
    else:
        b.fail("contracts runs of head units of two different projections")


def attention_output(ctx: ACtx, q, hq: Head, v, hv: Head) -> Head:
    """The output's heads: v's, or a new space viewing v's (copies of kv heads, a run of units)."""
    b = ctx.b
    b.group_links.append((hq.space, hv.space))
    if hv.rep == 1 and hv.whole(b):
        return hv
    lo, hi = hv.units(v.shape)
    heads = q.shape[[h for h, hd in heads_of(q).items()][0]]
    sid = b.new_space(heads * (hi - lo), f"{ctx.node.name}:out", group_size=hi - lo)
    b.view(sid, hv.space, hv.rep, lo)
    return Head(hv.d, sid, hv.merged)


@dataclass(frozen=True)
class MatMul:
    """aten.matmul of eager attention: ``q @ kᵀ`` contracts each head's units (as
    :func:`bind_qk`) into scores carrying the head index; ``weights @ v`` gives v's heads
    (as :class:`Attention`'s output). Any other product of computed tensors is an error."""

    name: str = "matmul"

    def apply(self, ctx: ACtx):
        b = ctx.b
        x, y = ctx.val(ctx.arg(0, "self")), ctx.val(ctx.arg(1, "other"))
        hx, hy = heads_of(x), heads_of(y)
        if x is None or y is None or len(hx) != 1 or len(hy) != 1 or x.axes or y.axes:
            b.fail("multiplies two computed tensors that are not attention heads; hmir follows "
                   "matmul only as eager attention (q @ k.T, weights @ v)")
        (h1, a), (h2, c) = next(iter(hx.items())), next(iter(hy.items()))
        out = len(ctx.out_shape())
        if h1 - x.ndim != h2 - y.ndim:
            b.fail("multiplies attention heads laid out at different dims")
        h = out - x.ndim + h1
        if a.d == x.ndim - 1 and c.d == y.ndim - 2:                     # q @ k.T
            bind_qk(ctx, (x, a), (y, c))
            return ctx.emit({}, sources=(x, y), heads={h: Head(None, a.space, a.merged)})
        if a.d is None and c.d == y.ndim - 1:                           # weights @ v
            o = attention_output(ctx, x, a, y, c)
            return ctx.emit({}, sources=(y,), heads={h: replace(o, d=out - 1)})
        b.fail("multiplies attention heads in a way that is neither q @ k.T nor weights @ v")
