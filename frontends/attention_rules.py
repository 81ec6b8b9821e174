"""Rules of aten graphs for attention itself: ``scaled_dot_product_attention`` and the
eager ``matmul`` products of attention (``q @ k.T``, ``weights @ v``, and any product whose
contracted dims are both positions, both head units or both features: cross-covariance
attention ``q @ kᵀ`` over tokens, CoaT's ``q @ (kᵀ @ v)``).

q and k share a head-grouped space (their units are contracted together); v's heads, and
the output's, form another, linked to q/k's as one group class (heads move alike). q
against a run of a fused k|v head (LeViT) becomes a view of that run. A product holding
head units at both matrix dims (:class:`UnitPair`) flows only through elementwise ops
(:class:`PairPointwise`) into another matmul.

Example::

    >>> Attention().name, MatMul().name, PairPointwise(None).name
    ('attention', 'matmul', 'pair_pointwise')
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from hmir.frontends.aten_rules import ACtx, AVal, Head, group_size, heads_of

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
    elif hq.whole(b) != hk.whole(b) and hq.rep == hk.rep == 1:   # q against a run of k|v
        (w, _), (r, rv) = sorted(((hq, qv), (hk, kv)), key=lambda p: not p[0].whole(b))
        lo, hi = r.units(rv.shape)
        if group_size(b, w.space) != hi - lo:
            b.fail(f"contracts {group_size(b, w.space)} units of each head with a run of "
                   f"{hi - lo} units of another projection's heads")
        b.view(w.space, r.space, 1, lo)
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


@dataclass
class UnitPair(AVal):
    """A product whose two matrix dims both hold head units (``kᵀ @ v``: (B, H, dk, dv)):
    ``heads`` holds the last dim's, ``rows`` = ``(h, Head)`` the units at dim -2. Only
    another matmul may read it (:func:`_guard`)."""

    rows: tuple | None = None


def _units(v) -> dict[int, tuple[int, Head]]:
    """``{dim: (head dim, Head)}`` for each dim of ``v`` holding head units."""
    out = {hd.d: (h, hd) for h, hd in heads_of(v).items() if hd.d is not None}
    if getattr(v, "rows", None):
        out[v.rows[1].d] = v.rows
    return out


def _index(v) -> dict[int, Head]:
    """``{head dim: Head}`` of every head index ``v`` carries (rows included)."""
    out = dict(heads_of(v))
    if getattr(v, "rows", None):
        out.setdefault(*v.rows)
    return out


def _guard(ctx: ACtx) -> None:
    for user in ctx.node.users:
        if user.op != "call_function" or getattr(user.target, "overloadpacket",
                                                 user.target) not in _PAIR_READERS:
            ctx.b.fail(f"gives a product whose two last dims both hold attention head units; "
                       f"hmir follows it only into another matmul, but node '{user.name}' "
                       f"({user.target}) reads it")


@dataclass(frozen=True)
class PairPointwise:
    """An elementwise op (``rule``) that also reads :class:`UnitPair` values (XCA's
    ``(q @ kᵀ) * temperature``, its softmax): the pair's last-dim heads pass through
    ``rule``; every other operand must be constant along the rows (size 1 there) or a pair
    with the same rows (joined)."""

    rule: object
    name: str = "pair_pointwise"

    def apply(self, ctx: ACtx):
        b, pairs = ctx.b, [v for v in ctx.tensor_args() if isinstance(v, UnitPair)]
        if not pairs:
            return self.rule.apply(ctx)
        n = len(ctx.out_shape())
        h, rows = pairs[0].rows[0] - pairs[0].ndim + n, pairs[0].rows[1]
        d = rows.d - pairs[0].ndim + n
        for v in ctx.tensor_args():
            e = d - n + v.ndim
            if isinstance(v, UnitPair):
                if (v.rows[0] - v.ndim + n, v.rows[1].d - v.ndim + n) != (h, d):
                    b.fail("combines two products whose head units lie at different dims")
                b.union(rows.space, v.rows[1].space)
            elif e >= 0 and v.shape[e] != 1:
                b.fail(f"combines a product holding head units at dims -2 and -1 with a tensor "
                       f"of shape {tuple(v.shape)} that varies along the units at dim {d}")
        saved = {nd: v for nd, v in b.values.items() if isinstance(v, UnitPair)}
        b.values.update({nd: AVal(v.shape, dict(v.axes), v.raw, heads=dict(v.heads),
                                  origin=dict(v.origin)) for nd, v in saved.items()})
        try:
            out = self.rule.apply(ctx)
        finally:
            b.values.update(saved)
        _guard(ctx)
        v = UnitPair(out.shape, out.axes, heads=out.heads, rows=(h, replace(rows, d=d)))
        v.origin.update(out.origin)
        return v


def _ops(names: str) -> list:
    aten = torch.ops.aten
    return [getattr(aten, n + s) for n in names.split() for s in ("", "_")
            if hasattr(aten, n + s)]


PAIR_OPS = _ops("add sub mul div neg exp softmax _softmax log_softmax dropout clone "
                 "contiguous alias detach _to_copy to type_as")
_PAIR_READERS = (torch.ops.aten.matmul, torch.ops.aten.sym_size, *PAIR_OPS)


@dataclass(frozen=True)
class MatMul:
    """aten.matmul of two computed tensors: out dim -2 takes A's dim -2 layout, out dim -1
    B's dim -1 layout, batch dims (the head index) join. The contracted dims (A's -1, B's -2)
    must both be positions, both head units (bound as :func:`bind_qk`: ``q @ kᵀ``,
    ``q @ (kᵀ @ v)``) or both features (joined); anything else is an error. ``weights @ v``
    gives v's heads (as :class:`Attention`'s output)."""

    name: str = "matmul"

    def apply(self, ctx: ACtx):
        b = ctx.b
        x, y = ctx.val(ctx.arg(0, "self")), ctx.val(ctx.arg(1, "other"))
        if x is None or y is None or x.ndim < 2 or y.ndim < 2:
            b.fail("multiplies something that is not a matrix of computed values")
        return self.product(ctx, x, y)

    INDEX_ERROR = ("multiplies a {what} operand whose matrix dims hold the attention head "
                   "index; hmir follows heads only along batch dims of a matmul")

    @classmethod
    def product(cls, ctx: ACtx, x, y, index_error: str = INDEX_ERROR):
        """The output layout of ``x @ y`` (both at least 2-d, batch dims first); also used by
        einsum once its operands are laid out as matmul operands (with its own wording of
        the head-index error)."""
        n = len(ctx.out_shape())
        ux, uy = _units(x), _units(y)
        for v, what in ((x, "first"), (y, "second")):
            if any(h >= v.ndim - 2 for h in _index(v)):
                ctx.b.fail(index_error.format(what=what))
        cls._contract(ctx, x, y, ux.get(x.ndim - 1), uy.get(y.ndim - 2))
        axes = cls._batch(ctx, x, y, n)
        if x.ndim - 2 in x.axes:
            axes[n - 2] = x.axes[x.ndim - 2]
        if y.ndim - 1 in y.axes:
            axes[n - 1] = y.axes[y.ndim - 1]
        return cls._heads(ctx, x, y, n, axes, ux.get(x.ndim - 2), uy.get(y.ndim - 1))

    @staticmethod
    def _contract(ctx: ACtx, x, y, hx, hy) -> None:
        b, dx, dy = ctx.b, x.ndim - 1, y.ndim - 2
        fx, fy = dx in x.axes, dy in y.axes
        if hx and hy:
            bind_qk(ctx, (x, hx[1]), (y, hy[1]))
        elif (fx or x.raw) and (fy or y.raw) and (fx or fy):     # the model input: fixed
            ax, ay = b.axis_of(x, dx, "this matmul"), b.axis_of(y, dy, "this matmul")
            b.read_point(x, ax)
            b.read_point(y, ay)
            b.union_axes(ax, ay)
        elif hx or hy or fx or fy:
            what = lambda h, f: "head units" if h else "features" if f else "positions"
            b.fail(f"contracts {what(hx, fx)} (dim -1 of the first operand) with "
                   f"{what(hy, fy)} (dim -2 of the second); hmir merges a product only when "
                   f"both contracted dims are positions, both head units or both features")

    @staticmethod
    def _batch(ctx: ACtx, x, y, n: int) -> dict:
        """Batch dims: features join; features or heads against entries that vary are errors."""
        b, axes = ctx.b, {}
        for d in range(n - 2):
            got = [(v, d - n + v.ndim) for v in (x, y) if d - n + v.ndim >= 0]
            feat = [v.axes[e] for v, e in got if e in v.axes]
            head = [_index(v)[e] for v, e in got if e in _index(v)]
            vary = [v for v, e in got if v.shape[e] != 1]
            if feat and (head or len(feat) < len(vary)):
                b.fail(f"multiplies along batch dim {d} features against entries that are not "
                       f"the same features")
            if head and len(head) < len(vary):
                b.fail(f"multiplies attention heads at dim {d} by a tensor that varies along it "
                       f"without carrying the same heads")
            if len(head) == 2:
                if head[0].merged != head[1].merged:
                    b.fail("multiplies attention heads laid out at different dims")
                b.group_links.append((head[0].space, head[1].space))
            if feat:
                axes[d] = feat[0] if len(feat) == 1 else b.union_axes(*feat)
        return axes

    @staticmethod
    def _heads(ctx: ACtx, x, y, n: int, axes: dict, rx, cy):
        """Out heads: the head index of A (else B), B's units at -1 (as :class:`Attention`'s
        output), A's units at -2; both at one head index: a :class:`UnitPair`."""
        at = lambda v, h: _index(v).get(h - n + v.ndim)
        heads = {h - v.ndim + n: Head(None, hd.space, hd.merged)
                 for v in (y, x) for h, hd in _index(v).items()}
        rows = None
        if cy:
            heads[cy[0] - y.ndim + n] = _out_units(ctx, y, cy[1], x, at(x, cy[0] - y.ndim + n),
                                                   n - 1)
        if rx:
            rows = (rx[0] - x.ndim + n, _out_units(ctx, x, rx[1], y, at(y, rx[0] - x.ndim + n),
                                                   n - 2))
            if not (cy and rows[0] == cy[0] - y.ndim + n):
                heads[rows[0]], rows = rows[1], None
        if rows is None:
            v = ctx.emit(axes, raw=x.raw and y.raw, sources=(x, y), heads=heads)
            v.index = getattr(x, "index", False) and getattr(y, "index", False)
            return v
        _guard(ctx)
        v = UnitPair(ctx.out_shape(), axes, heads=heads, rows=rows)
        for src in (x, y):
            v.origin.update(src.origin)
        return ctx.b.observe(v, ctx.node)


def _out_units(ctx: ACtx, v, hv: Head, w, hw: Head | None, d: int) -> Head:
    """The output's units at ``d`` from ``v``'s head ``hv``, against ``w``'s head ``hw`` at the
    same head dim (copies or a run of ``v``'s units: a new space viewing them)."""
    if hw is None:
        if hv.rep != 1 or not hv.whole(ctx.b):
            ctx.b.fail("multiplies copies or runs of head units by a tensor without heads")
        return replace(hv, d=d)
    return replace(attention_output(ctx, w, hw, v, hv), d=d)
