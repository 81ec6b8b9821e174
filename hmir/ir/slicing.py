"""Index arithmetic of :class:`~hmir.ir.Slice` s: where each unit of a space sits in a tensor.

Example::

    >>> from hmir.ir import Slice
    >>> slice_index(Slice("w", 1, 0, "in", offset=0, inner=2), 3).tolist()
    [[[0, 1], [2, 3], [4, 5]]]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hmir.ir import Slice


def slice_index(sl: Slice, n: int) -> torch.Tensor:
    """Indices along ``sl.dim`` of the slice's entries, shaped (outer, n, inner)."""
    o = torch.arange(sl.outer).view(-1, 1, 1) * (n * sl.inner)
    u = torch.arange(n).view(1, -1, 1) * sl.inner
    i = torch.arange(sl.inner).view(1, 1, -1)
    return sl.offset + o + u + i


def slice_extent(sl: Slice, n: int) -> int:
    """Number of entries the slice spans along its dim."""
    return sl.outer * n * sl.inner


def apply_units(t: torch.Tensor, sl: Slice, n: int, mat: torch.Tensor) -> torch.Tensor:
    """Transform the slice's units of ``t`` by ``mat`` (r × n): returns the new slice part.

    The result has shape of ``t`` with the slice's extent along ``sl.dim`` replaced by
    ``outer · r · inner``; only the slice's own entries are used.
    """
    part = t.narrow(sl.dim, sl.offset, slice_extent(sl, n))
    shape = list(part.shape)
    d = sl.dim
    view = shape[:d] + [sl.outer, n, sl.inner] + shape[d + 1:]
    part = part.reshape(view).movedim(d + 1, -1)
    out = part @ mat.to(part.dtype).T
    out = out.movedim(-1, d + 1)
    r = mat.shape[0]
    return out.reshape(shape[:d] + [sl.outer * r * sl.inner] + shape[d + 1:])


@dataclass(frozen=True)
class UnitMap:
    """A unit transform whose every input unit feeds at most one output unit.

    Output unit ``g`` = Σ ``weight[u]`` · input unit ``u`` over the inputs ``u`` of group ``g``:
    the shape of every merge (group average) and unmerge (copy) matrix. Applying it is a
    gather of each group's first member, scaled, plus an ``index_add`` of the further members
    (in increasing order): O(size of the tensor), where the dense product is O(size · n).
    """

    r: int
    src: torch.Tensor           # (r,) first member of each group (0 where it has none)
    scale: torch.Tensor | None  # (r,) its weight (0 where none); None: every weight is 1
    extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (group, member, weight)

    @classmethod
    def of(cls, mat: torch.Tensor) -> "UnitMap | None":
        """The map of an ``r × n`` matrix, or None when some column has two non-zeros.

        Example::

            >>> m = UnitMap.of(torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))
            >>> m.src.tolist(), m.scale.tolist(), m.extra[1].tolist()
            ([0, 2], [0.5, 1.0], [1])
        """
        if mat.is_contiguous() or not mat.T.is_contiguous():
            g, u = torch.nonzero(mat).unbind(1)         # by group, members ascending
        else:                                           # a transposed view: scan it in memory order
            u, g = torch.nonzero(mat.T).unbind(1)
            order = torch.argsort(g, stable=True)
            g, u = g[order], u[order]
        if bool((torch.bincount(u, minlength=mat.shape[1]) > 1).any()):
            return None
        w = mat[g, u]
        first = torch.ones_like(g, dtype=torch.bool)
        first[1:] = g[1:] != g[:-1]
        src = torch.zeros(mat.shape[0], dtype=torch.long, device=mat.device)
        scale = torch.zeros(mat.shape[0], dtype=mat.dtype, device=mat.device)
        src[g[first]], scale[g[first]] = u[first], w[first]
        ones = bool((scale == 1).all()) and bool((w == 1).all())
        extra = None if bool(first.all()) else (g[~first], u[~first], w[~first])
        return cls(mat.shape[0], src, None if ones else scale, extra)

    def to(self, device) -> "UnitMap":
        move = (lambda t: None if t is None else t.to(device))
        extra = None if self.extra is None else tuple(t.to(device) for t in self.extra)
        return UnitMap(self.r, self.src.to(device), move(self.scale), extra)


def _along(v: torch.Tensor, axis: int, ndim: int, dtype) -> torch.Tensor:
    """``v`` shaped to broadcast along ``axis`` of an ``ndim``-dim tensor."""
    return v.to(dtype).view([-1 if k == axis else 1 for k in range(ndim)])


def apply_map(t: torch.Tensor, sl: Slice, n: int, um: UnitMap) -> torch.Tensor:
    """:func:`apply_units` with a :class:`UnitMap` instead of its dense matrix (same values:
    each output entry is the same products, summed in increasing member order)."""
    part = t.narrow(sl.dim, sl.offset, slice_extent(sl, n))
    shape, d = list(part.shape), sl.dim
    part = part.reshape(shape[:d] + [sl.outer, n, sl.inner] + shape[d + 1:])
    ax = d + 1
    out = part.index_select(ax, um.src)
    if um.scale is not None:
        out.mul_(_along(um.scale, ax, out.dim(), out.dtype))
    if um.extra is not None:
        g, u, w = um.extra
        more = part.index_select(ax, u).mul_(_along(w, ax, part.dim(), part.dtype))
        out.index_add_(ax, g, more)
    return out.reshape(shape[:d] + [sl.outer * um.r * sl.inner] + shape[d + 1:])


def expand_grouped(t: torch.Tensor, sl: Slice, n_in: int, k_in: int) -> torch.Tensor:
    """(out, k_in, ...) grouped weight → dense (out, n_in, ...) block-diagonal weight."""
    rows = t.shape[0]
    k_out = rows // (n_in // k_in)
    dense = t.new_zeros((rows, n_in) + tuple(t.shape[2:]))
    for g in range(n_in // k_in):
        dense[g * k_out:(g + 1) * k_out, g * k_in:(g + 1) * k_in] = t[g * k_out:(g + 1) * k_out]
    return dense


def compress_grouped(dense: torch.Tensor, groups: int) -> torch.Tensor:
    """Dense block-diagonal (out, n_in, ...) weight → grouped (out, n_in / groups, ...): the inverse
    of :func:`expand_grouped` (entries off the diagonal blocks are dropped)."""
    rows, n_in = dense.shape[:2]
    k_out, k_in = rows // groups, n_in // groups
    parts = [dense[g * k_out:(g + 1) * k_out, g * k_in:(g + 1) * k_in] for g in range(groups)]
    return torch.cat(parts, 0)
