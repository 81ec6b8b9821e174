"""Index arithmetic of :class:`~hmir.ir.Slice` s: where each unit of a space sits in a tensor.

Example::

    >>> from hmir.ir import Slice
    >>> slice_index(Slice("w", 1, 0, "in", offset=0, inner=2), 3).tolist()
    [[[0, 1], [2, 3], [4, 5]]]
"""
from __future__ import annotations

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
