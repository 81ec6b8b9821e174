"""Aten rules for linears over a non-feature (token) axis.

An MLP-Mixer mixes tokens with ``nn.Linear(num_tokens, hidden)`` applied to
``x.transpose(1, 2)``; Swin V2's ``cpb_mlp`` applies a linear to a constant coordinate
table. The dim such a layer reads carries no feature: its units are positions, not a
permutation symmetry of the model. The rules here give that dim a *fixed* space
(:func:`~hmir.frontends.rules.position_axis`: never permuted, merged unit i with unit i)
and then delegate to the ordinary parameter rules, so the layer's output is a fresh space
like any linear's (free while it feeds ops that permute, fixed where it meets positions
again, :class:`~hmir.frontends.rules.Pointwise`).

Registered in :mod:`hmir.frontends.aten_table` through ``TOKEN_RULES`` (after the main
entries, so these wrappers replace ``aten.linear`` and ``aten.matmul``).

Example::

    >>> import torch, torch.nn as nn
    >>> from hmir.frontends.export import lower
    >>> class TokenMix(nn.Module):                   # mixes 6 tokens of 8 channels
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.emb, self.tok, self.head = nn.Linear(4, 8), nn.Linear(6, 6), nn.Linear(8, 2)
    ...     def forward(self, x):
    ...         x = self.emb(x)
    ...         return self.head((x + self.tok(x.transpose(1, 2)).transpose(1, 2)).mean(1))
    >>> ir = lower(TokenMix(), torch.randn(2, 6, 4))
    >>> [(s.name, s.n, s.fixed_reason.split(" at ")[0]) for s in ir.spaces if "tok" in str(s.slices)]
    [('positions:linear_1:2', 6, 'positions: this linear'), ('linear_1', 6, 'positions: joined')]
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from hmir.frontends.aten_param_rules import Linear, ParamMatmul, _is_param
from hmir.frontends.aten_rules import ACtx, APointwise
from hmir.frontends.rules import position_axis

try:                                    # eager attention's rule (moving out of head_rules)
    from hmir.frontends.attention_rules import MatMul
except ImportError:                     # pragma: no cover
    from hmir.frontends.head_rules import MatMul

aten = torch.ops.aten


def with_positions(ctx: ACtx, rule, reads: list[tuple[object, int]], what: str):
    """Apply ``rule`` with each ``(node, dim)`` of ``reads`` showing its axis: a dim carrying
    no feature shows a fixed space of positions for this op only (the value is restored)."""
    b, saved = ctx.b, {}
    for node, dim in reads:
        v = ctx.val(node)
        if v is None or dim % v.ndim in v.axes:
            continue
        axis = position_axis(b, v, dim, what)
        saved.setdefault(node, v)
        b.values[node] = replace(v, axes={**b.values[node].axes, dim % v.ndim: axis})
    try:
        return rule.apply(ctx)
    finally:
        b.values.update(saved)


@dataclass(frozen=True)
class TokenLinear:
    """aten.linear over any last dim: a dim with no feature is positions (module docstring)."""

    name: str = "linear"

    def apply(self, ctx: ACtx):
        x = ctx.val(ctx.arg(0, "input"))
        if x is not None and x.ndim - 1 in (getattr(x, "heads", None) or {}):
            return Linear().apply(ctx)                  # mixes attention heads (talking heads)
        return with_positions(ctx, Linear(), [(ctx.arg(0, "input"), -1)], "this linear")


@dataclass(frozen=True)
class TokenMatmul:
    """aten.matmul: with a parameter operand it is a layer (``x @ W`` reads x's last dim,
    ``W @ x`` x's dim -2, which may hold positions), else eager attention (:class:`MatMul`)."""

    name: str = "matmul"

    def apply(self, ctx: ACtx):
        a, m = ctx.arg(0, "self"), ctx.arg(1, "other")
        va, vm = ctx.val(a), ctx.val(m)
        if va is None or vm is None or _is_param(va) == _is_param(vm):
            return MatMul().apply(ctx)                  # attention, or a clear error there
        if va.ndim < 2 or vm.ndim < 2:
            ctx.b.fail("multiplies a parameter with a vector; hmir lowers matrix products only")
        read = (a, -1) if _is_param(vm) else (m, -2)
        rule = ParamMatmul(names=("self", "other"))
        return with_positions(ctx, rule, [read], "this matrix product")


TOKEN_RULES: dict[object, object] = {
    aten.linear: TokenLinear(),
    aten.matmul: TokenMatmul(),
    aten.addcmul: APointwise(),                 # ResMLP's affine: beta + alpha * x
}
