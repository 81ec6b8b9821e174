"""Tied and shared parameters: one tensor, whatever the number of its names and readers.

A parameter read by several ops (a tied input embedding and output projection, ALBERT's
shared layers, a module called twice) is **one tensor** in the IR (design property 7):

- **Names.** A module may hold one tensor object under several names (``self.b.weight =
  self.a.weight``, Hugging Face's tied ``cls.predictions.decoder.weight`` and
  ``bert.embeddings.word_embeddings.weight``); its state dict lists every name. The IR slices
  one *canonical* name only (the first name, in registration order, that the graph reads);
  :attr:`MergeIR.ties <hmir.ir.MergeIR>` maps every other name (*alias*) to it. A state dict
  a pass produces holds, for an alias, the canonical's tensor object (:func:`tie_state`), and
  the verifier rejects a state whose tied names hold different values.
- **Spaces.** Each dim of the tensor binds the spaces of every reader at that dim into one
  (the frontend unions them, :mod:`hmir.frontends.ties`): a shared layer's spaces are one
  across its calls, and a tied embedding's columns put the residual stream and the output
  projection's input into one space.
- **Regions.** A *region* is one (dim, space, offset, inner, outer, grouped) of a parameter. A
  region read by ops of one role keeps one slice; a region read with both roles (the tied
  embedding's columns: written by the embedding, ``"out"``, and read by the output projection,
  ``"in"``) keeps one slice per role, so ``Space.producers()`` and ``Space.consumers()`` still
  list every reader. Coverage counts a region once, and every tensor transform (fuse,
  permutations) visits each region once: :func:`tensor_slices`.

**What fuse does with a dim that is both written and read.** The merged tensor must be one
tensor, so it is computed as *one* reader computes it: the form of an ordinary weight, with
one dim merged (``M``: each merged unit is the average of its members', which also averages
across models) and every other feature dim unmerged (``Uᵀ``: copies). The merged dim is the
lowest dim that some reader writes on a free space (else the lowest dim some reader writes).
For a tied embedding ``E`` (vocabulary × hidden) read again by the output projection, the
columns (hidden) are merged and the vocabulary rows get ``Uᵀ`` of the fixed vocabulary space
(the identity): ``E* = Σ_m E_m M_mᵀ``, the embedding's own formula, consistent with every
other producer of the residual stream it writes. The output projection, whose own formula
is ``½ Σ_m W_m U_m`` (sum over a merged unit's members, averaged over the two models), then
reads the mean of the members' columns: the two formulas agree exactly when every merged
unit holds one unit of each model (``permute``, ``avg``, ``zip`` of twins), and differ by a
factor ``|members| / 2`` otherwise (a within-model zip, or an elastic unit of one model).
Mixing the two readers' roles dim by dim would average twice (a factor ½ everywhere); a
permutation never depends on roles.

Example::

    >>> import torch, torch.nn as nn
    >>> from hmir.frontends import lower
    >>> class Tied(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
    ...         self.b.weight = self.a.weight                      # one tensor, two names
    ...     def forward(self, x):
    ...         return self.out(self.b(torch.relu(self.a(x))))
    >>> ir = lower(Tied(), torch.randn(2, 4))
    >>> ir.ties
    {'b.weight': 'a.weight'}
    >>> sorted({sl.param for sl in ir.slices_of("a.weight")}), ir.slices_of("b.weight")
    (['a.weight'], [])
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Container
from dataclasses import replace

import torch

from hmir.ir.core import MergeIR, Slice

Region = tuple  # (dim, space, offset, inner, outer, grouped)


def region(sl: Slice) -> Region:
    """The part of a tensor a slice covers, whatever its role."""
    return (sl.dim, sl.space, sl.offset, sl.inner, sl.outer, sl.grouped)


def alias_groups(module: torch.nn.Module, names: Container[str] | None = None) -> list[list[str]]:
    """Names that hold one tensor object (parameters and buffers), in registration order.

    Only groups of two or more names are returned; ``names`` (default: the module's state
    dict keys) restricts which names count.
    """
    if not isinstance(module, torch.nn.Module):
        return []
    names = module.state_dict().keys() if names is None else names
    seen: dict[int, list[str]] = {}
    for name, t in itertools.chain(module.named_parameters(remove_duplicate=False),
                                   module.named_buffers(remove_duplicate=False)):
        if t is not None and name in names:
            group = seen.setdefault(id(t), [])
            if name not in group:
                group.append(name)
    return [g for g in seen.values() if len(g) > 1]


def canonical_names(module: torch.nn.Module, read: Callable[[str], bool]) -> dict[str, str]:
    """``{alias: canonical}``: per group of names of one tensor, the canonical is the first
    name ``read`` accepts (the IR's slices use it), else the first name."""
    out = {}
    for group in alias_groups(module):
        canon = next((n for n in group if read(n)), group[0])
        out.update({n: canon for n in group if n != canon})
    return out


def find_ties(module: torch.nn.Module, param_dims: Container[str], unsliced: Container[str]) \
        -> dict[str, str]:
    """The ties of an IR built over ``module``: canonical names are those the IR declares."""
    return canonical_names(module, lambda n: n in param_dims or n in unsliced)


def tie_state(ir: MergeIR, state: dict) -> dict:
    """``state`` with every alias holding its canonical's tensor object (in place; returned).

    An alias whose canonical is missing from ``state`` is left as it is.
    """
    for alias, canon in ir.ties.items():
        if canon in state and alias in state:
            state[alias] = state[canon]
    return state


def tensor_slices(ir: MergeIR) -> dict[str, list[Slice]]:
    """Per parameter, one slice per region, with the role a tensor transform applies.

    A parameter whose every region has one role keeps its slices as they are. For one whose
    readers disagree (some region written by one op and read by another), the roles are those
    of one reader (see the module docstring): the lowest dim written on a free space (else
    the lowest dim written) is ``"out"`` where some reader writes it, every other dim ``"in"``.
    """
    by_param: dict[str, dict[Region, list[Slice]]] = {}
    for s in ir.spaces:
        for sl in s.slices:
            by_param.setdefault(sl.param, {}).setdefault(region(sl), []).append(sl)
    out = {}
    for param, regions in by_param.items():
        if all(len({sl.role for sl in sls}) == 1 for sls in regions.values()):
            out[param] = [sls[0] for sls in regions.values()]
            continue
        written = [(not ir.space(sl.space).fixed, sl.dim) for sls in regions.values()
                   for sl in sls if sl.role == "out"]
        merged_dim = min(written, key=lambda w: (not w[0], w[1]))[1] if written else None
        out[param] = []
        for sls in regions.values():
            roles = {sl.role for sl in sls}
            role = "out" if sls[0].dim == merged_dim and "out" in roles else "in"
            out[param].append(replace(sls[0], role=role))
    return out
