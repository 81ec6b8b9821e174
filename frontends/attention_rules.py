"""Rules of aten graphs for attention itself: ``scaled_dot_product_attention`` and the
eager ``matmul`` products of attention (``q @ k.T``, ``weights @ v``).

q and k share a head-grouped space (their units are contracted together); v's heads, and
the output's, form another, linked to q/k's as one group class (heads move alike).

Example::

    >>> Attention().name, MatMul().name
    ('attention', 'matmul')
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from hmir.frontends.aten_rules import ACtx, Head, heads_of

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
