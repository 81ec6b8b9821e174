"""``aten.einsum`` of two computed tensors, read as the batched matmul it is.

An equation of two operands is classified letter by letter: *batch* letters appear in both
operands and in the output, one *contracted* letter in both operands only, one *row* letter
in the first operand and the output, one *column* letter in the second operand and the
output. With the output written ``batch… row column``, the einsum is ``A' @ B'`` for ``A'`` =
the first operand laid out ``batch… row contracted`` and ``B'`` = the second laid out
``batch… contracted column``, and :class:`~hmir.frontends.attention_rules.MatMul`'s semantics
apply unchanged: ``q·kᵀ`` contracts head units (MaxViT: ``"B G H I D, B G H J D -> B G H
I J"``), ``weights · v`` gives v's heads, features contracted with features join. A whole
2-d parameter as one operand is a linear layer (:func:`param_einsum`). Any other equation
(three operands, a diagonal, several contracted letters, an output in another order) is an
error naming the equation.

Example::

    >>> parse("b h i d, b h j d -> b h i j", (4, 4))
    (['b', 'h'], 'i', 'd', 'j')
"""
from __future__ import annotations

from dataclasses import dataclass

from hmir.frontends.aten_rules import ACtx, AVal, pmap
from hmir.frontends.attention_rules import MatMul


def _letters(term: str, ndim: int) -> list[str]:
    term = term.replace(" ", "")
    if "..." in term:
        pre, post = term.split("...")
        k = ndim - len(pre) - len(post)            # labelled from the right (broadcasting)
        return list(pre) + [f"...{k - 1 - i}" for i in range(k)] + list(post)
    return list(term)


def parse(eq: str, ndims: tuple[int, int]):
    """``(batch letters, row, contracted, column)`` of a two-operand matmul-like equation,
    or None when the equation is not one."""
    if "->" not in eq or eq.count(",") != 1:
        return None
    ins, out = eq.split("->")
    a, b = (_letters(t, n) for t, n in zip(ins.split(","), ndims))
    dots = max(sum(c.startswith("...") for c in t) for t in (a, b))
    o = _letters(out, len(out.replace(" ", "").replace("...", "")) + dots)
    if len(a) != ndims[0] or len(b) != ndims[1] or any(len(set(t)) != len(t) for t in (a, b, o)):
        return None
    batch = [c for c in o if c in a and c in b]
    rows, cols = [c for c in o if c in a and c not in b], [c for c in o if c in b and c not in a]
    con = [c for c in a if c in b and c not in o]
    if len(rows) != 1 or len(cols) != 1 or len(con) != 1 or o != batch + rows + cols or \
            set(a) != set(batch + rows + con) or set(b) != set(batch + con + cols):
        return None
    return batch, rows[0], con[0], cols[0]


def laid_out(v: AVal, order: list[int]) -> AVal:
    """``v`` with its dims in ``order`` (``order[new] = old``), as a permute would give it."""
    where = {old: new for new, old in enumerate(order)}
    heads = {where[h]: type(hd)(**{**vars(hd), "d": None if hd.d is None else where[hd.d]})
             for h, hd in (v.heads or {}).items()}
    out = AVal(tuple(v.shape[d] for d in order), {where[d]: a for d, a in v.axes.items()},
               v.raw, heads=heads)
    out.origin.update(v.origin)
    return out


@dataclass(frozen=True)
class Einsum:
    """aten.einsum(equation, [a, b]): a batched matmul (see the module docstring)."""

    name: str = "einsum"

    def apply(self, ctx: ACtx):
        b = ctx.b
        eq, ops = ctx.arg(0, "equation"), [ctx.val(t) for t in ctx.arg(1, "tensors")]
        if len(ops) != 2 or any(v is None for v in ops):
            b.fail(f"computes einsum '{eq}' of {len(ops)} operands; hmir follows an einsum only "
                   f"as a product of two computed tensors (a batched matmul)")
        if any(pmap(v) is not None for v in ops):
            return param_einsum(ctx, eq, ops)
        if any(getattr(v, "rows", None) for v in ops):
            b.fail(f"computes einsum '{eq}' of a product whose two last dims both hold head units")
        form = parse(eq, (ops[0].ndim, ops[1].ndim))
        if form is None:
            b.fail(f"computes einsum '{eq}', which is not a batched matmul (batch letters in "
                   f"both operands and the output, then one row letter of the first operand and "
                   f"one column letter of the second, one contracted letter); rewrite it as a "
                   f"matmul")
        batch, row, con, col = form
        a, c = (_letters(t, v.ndim) for t, v in zip(eq.split("->")[0].split(","), ops))
        x = laid_out(ops[0], [a.index(t) for t in batch + [row, con]])
        y = laid_out(ops[1], [c.index(t) for t in batch + [con, col]])
        return matmul_of(ctx, x, y)


def matmul_of(ctx: ACtx, x: AVal, y: AVal):
    """:class:`~hmir.frontends.attention_rules.MatMul` applied to two laid-out operands."""
    return MatMul.product(ctx, x, y, "computes an einsum whose {what} operand holds the "
                          "attention head index among its row or contracted letters; hmir "
                          "follows heads only as batch letters")


def param_einsum(ctx: ACtx, eq: str, ops: list):
    """``einsum("b n c, d c -> b n d", x, W)``: a linear layer. The parameter (a whole
    2-d parameter) has one letter contracted with a feature dim of ``x`` (its ``in`` dim)
    and one letter only it and the output have (its ``out`` dim, a new space)."""
    from hmir.frontends.aten_param_rules import _is_param, refuse_heads
    from hmir.frontends.rules import ParamOp

    b = ctx.b
    k = next((i for i, v in enumerate(ops) if pmap(v) is not None), 0)
    w, x = ops[k], ops[1 - k]
    terms = eq.split("->")[0].split(",") if "->" in eq and eq.count(",") == 1 else []
    if not terms or pmap(x) is not None or not _is_param(w) or w.ndim != 2:
        b.fail(f"computes einsum '{eq}' with a parameter operand that is not one whole 2-d "
               f"parameter against a computed tensor; write it as F.linear or a matmul")
    lw, lx = _letters(terms[k], 2), _letters(terms[1 - k], x.ndim)
    lo = _letters(eq.split("->")[1], len(lx))
    con, new = [c for c in lw if c in lx and c not in lo], [c for c in lw if c not in lx]
    if len(con) != 1 or len(new) != 1 or sorted(lo) != sorted([c for c in lx if c != con[0]]
                                                                 + new):
        b.fail(f"computes einsum '{eq}', which is not a linear layer (the parameter contracts "
               f"one dim of the input and writes one new output dim)")
    refuse_heads(ctx, x, "applies a weight by einsum to")
    xdim = lx.index(con[0])
    axis = b.axis_of(x, xdim, f"einsum '{eq}'")
    b.read_point(x, axis)
    out = ParamOp(w_out=lw.index(new[0]), w_in=lw.index(con[0]))._dense(
        b, w.param, tuple(w.shape), axis, [], ctx.node.name)
    axes = {lo.index(lx[d]): a for d, a in x.axes.items() if d != xdim}
    axes[lo.index(new[0])] = out
    return ctx.emit(axes, sources=(x,))
