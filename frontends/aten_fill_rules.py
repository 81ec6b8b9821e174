"""In-place fills (``fill_`` / ``zero_``) of feature tensors and of copies of parameters.

A fill writes one constant into every entry of a view. It commutes with a permutation of a
space when the filled entries are a union of whole sub-spaces:

* a view of a feature (or position) tensor: the view rules already cut its spaces at the
  view's bounds (:func:`~hmir.frontends.aten_select_rules.feature_run`) or refused the view,
  so the fill is elementwise within the view;
* a run ``lo:hi`` of one dim of a parameter's copy (torchvision Swin V2:
  ``qkv_bias = self.qkv.bias.clone(); qkv_bias[C:2C].zero_()``): the spaces that own that
  parameter dim are known only once a later op reads the copy (the ``linear``), so the cut
  is recorded and made when the graph is lowered (:func:`cut_parameter_runs`): every space
  sliced over the dim is cut at ``lo`` and ``hi`` (:func:`~hmir.frontends.subspaces.refine`),
  and the literal bounds of the slice become extents the backend rewrites.

Anything else (a fill of a single entry of a parameter dim, of a gathered or reshaped
parameter) is an error naming the node.

Example::

    >>> cover([(0, 48), (48, 96), (96, 144)], 48, 96)
    []
    >>> cover([(0, 144)], 48, 96)
    [(0, 48), (0, 96)]
"""
from __future__ import annotations

import torch

from hmir.frontends.aten_rules import ACtx, pmap
from hmir.ir import Segment

aten = torch.ops.aten
_VIEWS = {getattr(aten, n) for n in ("slice", "select", "view", "reshape", "_unsafe_view",
                                     "permute", "transpose", "swapaxes", "unsqueeze", "squeeze", "expand",
                                     "alias", "narrow", "unflatten", "flatten")}


def _packet(node):
    return getattr(getattr(node, "target", None), "overloadpacket", None)


def fill_in_place(ctx: ACtx, x):
    """The value of ``fill_(x, c)`` / ``zero_(x)`` (``x`` itself) for a non-constant ``x``."""
    node = ctx.node.args[0]
    base = node
    while _packet(base) in _VIEWS:
        base = base.args[0]
    if pmap(ctx.val(base)) is None:
        return x                       # a view of features or positions: bounds already cut
    src = node.args[0] if _packet(node) is aten.slice else None
    pm = pmap(ctx.val(src)) if src is not None else None
    dim = (node.args[1] if len(node.args) > 1 else 0) % src.meta["val"].ndim \
        if pm is not None else None
    step = node.args[4] if len(node.args) > 4 else 1
    if pm is None or dim not in pm or step != 1:
        ctx.b.fail("writes in place into a part of a parameter (or its copy) that is not a run "
                   "of one parameter dim taken by a slice of the parameter itself; hmir follows "
                   "in-place fills of parameters only as param.clone()[..., lo:hi, ...].fill_(c)")
    n = int(src.meta["val"].shape[dim])
    lo, hi = (node.args[i] if len(node.args) > i and node.args[i] is not None else d
              for i, d in ((2, 0), (3, n)))
    lo, hi = (max(0, min(n, v + n if v < 0 else v)) for v in (lo, hi))
    b, here, param = ctx.b, ctx.node, ctx.val(src).param
    _defer(b, lambda: cut_parameter_runs(b, here, node, param, pm[dim], lo, hi))
    return x


def _defer(b, fn) -> None:
    """Run ``fn`` when the graph is lowered, right before ``b.finalize`` collects spaces."""
    todo = b.__dict__.get("deferred")
    if todo is None:
        todo, finalize = [], b.finalize
        b.deferred = todo

        def run_then_finalize(*args, **kwargs):
            for f in todo:
                f()
            return finalize(*args, **kwargs)
        b.finalize = run_then_finalize
    todo.append(fn)


def cover(spans: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """``(span start, unit position)`` of each bound ``lo``/``hi`` strictly inside a span."""
    return [(a, at) for at in (lo, hi) for a, e in spans if a < at < e]


def cut_parameter_runs(b, fill, slice_node, param: str, pdim: int, lo: int, hi: int) -> None:
    """Cut every space sliced over ``param``'s dim ``pdim`` at entries ``lo`` and ``hi``."""
    from hmir.frontends.subspaces import refine

    b.node = fill
    while True:
        sls = [sl for sl in b.slices if sl.param == param and sl.dim == pdim]
        spans = {(sl.offset, sl.offset + b.width(sl.space) * sl.inner * sl.outer): sl
                 for sl in sls}
        todo = cover(list(spans), lo, hi)
        if not todo:
            break
        a, at = todo[0]
        sl = next(s for (s0, _), s in spans.items() if s0 == a)
        if sl.inner != 1 or sl.outer != 1:
            b.fail(f"fills entries {lo}:{hi} of dim {pdim} of parameter '{param}', which cut "
                   f"a unit of space '{b.raw[sl.space].name}' (laid out with inner/outer > 1)")
        refine(b, sl.space, [at - a])
    for i, at in ((2, lo), (3, hi)):
        segs = tuple(Segment(sl.space) for sl in sorted(
            (s for s in b.slices if s.param == param and s.dim == pdim), key=lambda s: s.offset)
            if sl.offset < at)
        if 0 < at and segs and i < len(slice_node.args) and type(slice_node.args[i]) is int:
            b.size_arg(slice_node, i, None, "extent", tuple(dict.fromkeys(segs)))
    b.node = None
