"""Lowering of tied and shared parameters: one name, and one space per dim, for every reader.

Called by :meth:`hmir.frontends.builder.Builder.finalize` before spaces are collapsed. A
parameter read by several ops, or held under several names, gets:

1. one canonical name (:func:`hmir.ir.ties.canonical_names`): the slices and declarations of
   its aliases move to it;
2. one space per region: the slices of every reader that cover the same part of one dim
   (same offset and layout), whatever their role, union their spaces (a shared layer called
   once per layer, a tied embedding read again by the output projection);
3. slices that became identical (the same region read with the same role by several calls)
   collapse into one when the builder collects them (their spaces are rewritten to the
   union's representative here).

See :mod:`hmir.ir.ties` for what the IR records and how passes transform a tied tensor.

Example::

    >>> import torch, torch.nn as nn
    >>> from hmir.frontends import lower
    >>> class Twice(nn.Module):                 # one Linear called twice
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.inp, self.mid, self.out = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 2)
    ...     def forward(self, x):
    ...         return self.out(torch.relu(self.mid(torch.relu(self.mid(self.inp(x))))))
    >>> ir = lower(Twice(), torch.randn(2, 3))
    >>> [s.n for s in ir.free_spaces], len(ir.slices_of("mid.weight"))   # one space, two slices
    ([6], 2)
"""
from __future__ import annotations

from dataclasses import replace

from hmir.errors import LoweringError
from hmir.ir.ties import canonical_names


def tie_shared(b) -> None:
    """Canonical names, unions and representative spaces for ``b``'s slices (a Builder)."""
    canon = canonical_names(b.gm, lambda n: n in b.param_dims or n in b.unsliced)
    if canon:
        _rename(b, canon)
    first: dict[tuple, int] = {}
    for sl in b.slices:
        key = (sl.param, sl.dim, sl.offset, sl.inner, sl.outer, sl.grouped)
        other = first.setdefault(key, sl.space)
        if b.uf[other] == b.uf[sl.space]:
            continue
        if b.width(other) != b.width(sl.space):
            raise LoweringError(
                f"{b.model_name}: '{sl.param}' dim {sl.dim} at offset {sl.offset} is read by two "
                f"ops as spaces of different widths ({b.raw[other].name}: {b.width(other)}, "
                f"{b.raw[sl.space].name}: {b.width(sl.space)}): a shared parameter must be read "
                f"with one feature layout")
        b.uf.union(other, sl.space)
    b.slices = [replace(sl, space=b.uf[sl.space]) for sl in b.slices]


def _rename(b, canon: dict[str, str]) -> None:
    """Move the aliases' slices and declarations to their canonical names."""
    b.slices = [replace(sl, param=canon.get(sl.param, sl.param)) for sl in b.slices]
    for alias, name in canon.items():
        dims = b.param_dims.pop(alias, None)
        if dims is not None:
            b.param_dims.setdefault(name, set()).update(dims)
        reason = b.unsliced.pop(alias, None)
        if reason is not None and name not in b.param_dims:
            b.unsliced.setdefault(name, reason)
    for name in list(b.unsliced):
        if name in b.param_dims and name in canon.values():
            del b.unsliced[name]           # another reader slices the tied tensor
