"""fuse: every parameter and buffer of the merged model, W* = Σ_i M_out,i · W_i · U_in,i.

Along each feature dim of a parameter, each slice's units are transformed by the merge
matrix of its space (rows: ``M_i``; columns: ``U_iᵀ``), so biases, norm affine parameters
and running statistics are merged alike. A tied tensor (several names, several readers) is
merged once, as one of its readers reads it, and every name of it in the merged state holds
that one tensor (:mod:`hmir.ir.ties`: a dim that one reader writes and another reads is
merged with ``M`` when it is the tensor's merged dim, else with ``Uᵀ``). Merge and unmerge
matrices send each unit to at most one merged unit, so they are applied as gathers and index-adds
(:class:`~hmir.ir.slicing.UnitMap`), not dense products. Grouped-conv weights are expanded to their dense
block-diagonal form, fused, and compressed back (exact when the match respects groups).

Example::

    >>> import torch
    >>> from hmir.harness import zoo
    >>> from hmir.frontends import lower
    >>> from hmir.ir.pairing import pair_spaces
    >>> from hmir.algorithms.matching import match_avg
    >>> a, b, x = zoo.mlp(4, (8,), 2), zoo.mlp(4, (8,), 2), torch.randn(2, 4)
    >>> ir_a, ir_b = lower(a, x, "a"), lower(b, x, "b")
    >>> pairs = pair_spaces(ir_a, ir_b)
    >>> matches = [match_avg(ir_a.space(p.a).n, ir_b.space(p.b).n) for p in pairs]
    >>> state = fuse(ir_a, ir_b, pairs, matches, a.state_dict(), b.state_dict())
    >>> w = [k for k in state if k.endswith("weight")][0]          # A's names and shapes
    >>> bool(torch.allclose(state[w], (a.state_dict()[w] + b.state_dict()[w]) / 2))
    True
"""
from __future__ import annotations

from dataclasses import replace

import torch

from hmir.errors import MergeError
from hmir.ir import MergeIR, Slice
from hmir.algorithms.matching import Match
from hmir.ir.pairing import SpacePair
from hmir.ir.slicing import UnitMap, apply_map, apply_units, compress_grouped, expand_grouped
from hmir.ir.pairing import param_map
from hmir.ir.ties import tensor_slices
from hmir.ir.verify import verify
from hmir.pipeline.manager import Out, Pass, register_pass


def _side(m: Match, side: int, n_a: int, role: str) -> torch.Tensor:
    """The (r × n_side) matrix applied to a slice of model ``side`` for ``role``."""
    cols = slice(0, n_a) if side == 0 else slice(n_a, None)
    return m.M[:, cols] if role == "out" else m.U[cols, :].T


class _Maps:
    """Each (space, role) transform of one model, as a :class:`UnitMap` (dense matrix when a
    unit feeds two outputs), built once and kept per device."""

    def __init__(self, mats: dict[int, Match], side: int, n_a: dict[int, int]):
        self.mats, self.side, self.n_a, self.done = mats, side, n_a, {}

    def apply(self, t: torch.Tensor, sl: Slice, n: int) -> torch.Tensor:
        key = (sl.space, sl.role, t.device)
        if key not in self.done:
            mat = _side(self.mats[sl.space], self.side, self.n_a[sl.space], sl.role).to(t.device)
            self.done[key] = UnitMap.of(mat) or mat
        m = self.done[key]
        if isinstance(m, UnitMap):
            return apply_map(t, sl, n, m)
        return apply_units(t, sl, n, m)


def _transform(ir: MergeIR, t: torch.Tensor, slices: list[Slice], maps: _Maps) -> torch.Tensor:
    """Apply the merge of every slice of one parameter of one model."""
    grouped = [sl for sl in slices if sl.grouped]
    if grouped:
        s = ir.space(grouped[0].space)
        t = expand_grouped(t, grouped[0], s.n, s.group_size)
    for dim in sorted({sl.dim for sl in slices}):
        parts = []
        for sl in sorted((x for x in slices if x.dim == dim), key=lambda x: x.offset):
            parts.append(maps.apply(t, replace(sl, grouped=False), ir.space(sl.space).n))
        t = torch.cat(parts, dim) if len(parts) > 1 else parts[0]
    if grouped:
        t = compress_grouped(t, ir.space(grouped[0].space).groups)
    return t


def fuse(ir_a: MergeIR, ir_b: MergeIR, pairs: list[SpacePair], matches: list[Match],
         state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor],
         names: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The merged state dict, in A's parameter names.

    ``names`` maps A's sliced parameters to B's (:func:`hmir.ir.pairing.param_map`); by
    default B's parameter of the same name.
    """
    n_a = [ir_a.space(p.a).n for p in pairs]
    maps_a = _Maps({p.a: m for p, m in zip(pairs, matches)}, 0, {p.a: k for p, k in zip(pairs, n_a)})
    maps_b = _Maps({p.b: m for p, m in zip(pairs, matches)}, 1, {p.b: k for p, k in zip(pairs, n_a)})
    by_a = _slices_by_param(ir_a)
    by_b = _slices_by_param(ir_b)
    merged = {}
    for name, t in state_a.items():
        if name in ir_a.ties:
            continue                     # an alias of a tied tensor: set below
        if name not in by_a:
            merged[name] = t.clone()
            continue
        other = names.get(name, name) if names is not None else name
        if other not in state_b or other not in by_b:
            raise MergeError(f"{ir_a.name}'s parameter '{name}' has no counterpart in {ir_b.name}")
        wb = _transform(ir_b, state_b[other].float().to(t.device), by_b[other], maps_b)
        if t.is_floating_point() and t.numel() and not bool(t.reshape(-1)[0]) and not bool(t.any()):
            # all zero (an inserted zero block's): adds nothing
            merged[name] = wb.to(t.dtype)
            continue
        wa = _transform(ir_a, t.float(), by_a[name], maps_a)
        merged[name] = (wa + wb).to(t.dtype)
    for alias, canon in ir_a.ties.items():
        if alias in state_a:
            merged[alias] = merged[canon] if canon in merged else state_a[alias].clone()
    return {name: merged[name] for name in state_a}          # A's order


def _slices_by_param(ir: MergeIR) -> dict[str, list[Slice]]:
    """One slice per region of each parameter (a tied tensor is transformed once, as one of
    its readers reads it: :func:`hmir.ir.ties.tensor_slices`)."""
    return tensor_slices(ir)


class Fuse(Pass):
    """Every merged tensor from the matches; the result is verified against A's IR when no
    width changed (with new widths, ``emit`` verifies the resized IR)."""

    name = "fuse"
    requires = ("irs", "pairs", "matches", "widths")
    provides = ("merged",)

    def run(self, state, options) -> Out:
        ir_a, ir_b = state.irs
        merged = fuse(ir_a, ir_b, state.pairs, state.matches, ir_a.graph_module.state_dict(),
                      ir_b.graph_module.state_dict(), param_map(ir_a, ir_b, state.pairs))
        if not state.widths:
            verify(ir_a, merged)            # the merged tensors still fit the IR exactly
        return Out({"merged": merged})


register_pass(Fuse())
