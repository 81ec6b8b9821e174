"""Permutations of a lowered model's spaces: random ones, and applying them to a state dict.

Applying a permutation to every free space of a model must leave its function unchanged;
that is the frontend's proof of correctness (design property 1).

Example::

    >>> import copy
    >>> from hmir.frontends import lower
    >>> from hmir.harness import zoo
    >>> model, x = zoo.cifar_resnet((1, 1, 1)).eval(), torch.randn(2, 3, 8, 8)   # residual joins
    >>> ir = lower(model, x)
    >>> perms = random_permutation(ir, seed=0)
    >>> sorted(perms) == [s.id for s in ir.free_spaces]
    True
    >>> state = permute_state(ir, model.state_dict(), perms)
    >>> model_p = copy.deepcopy(model); model_p.load_state_dict(state)
    <All keys matched successfully>
    >>> torch.equal(state["stem.0.weight"], model.state_dict()["stem.0.weight"])
    False
    >>> torch.allclose(model_p(x), model(x), atol=1e-5)      # same outputs
    True
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from hmir.ir import MergeIR, Slice
from hmir.ir.parts import within_perm
from hmir.ir.slicing import slice_index
from hmir.ir.ties import tensor_slices, tie_state


def random_permutation(ir: MergeIR, seed: int = 0) -> dict[int, torch.Tensor]:
    """A random permutation of every free space, respecting group structure.

    Spaces of one group class share the permutation of whole groups; units move within
    their group's free parts (:mod:`hmir.ir.parts`); a view moves as its base, its copies
    in one shared random order per class group. Returns ``{space id: perm}`` with
    ``new[i] = old[perm[i]]``.
    """
    g = torch.Generator().manual_seed(seed)
    sigma: dict[int, torch.Tensor] = {}
    tau: dict[tuple[int, int], torch.Tensor] = {}
    within: dict[int, torch.Tensor] = {}
    perms = {}
    for s in sorted(ir.free_spaces, key=lambda s: s.view is not None):
        cls, k = s.group_class, s.group_size
        if cls not in sigma:
            sigma[cls] = torch.randperm(s.class_groups, generator=g)
        if s.view is None:
            within[s.id] = torch.stack([within_perm(s.parts, g, k) for _ in range(s.groups)])
            perms[s.id] = (sigma[cls].view(-1, 1) * k + within[s.id]).flatten()
            continue
        v = s.view
        if (cls, v.rep) not in tau:
            tau[cls, v.rep] = torch.stack([torch.randperm(v.rep, generator=g)
                                           for _ in range(s.class_groups)])
        old_group = sigma[cls].view(-1, 1) * v.rep + tau[cls, v.rep]          # (G, rep)
        unit = within[v.base][:, v.lo:v.lo + k] - v.lo                        # (G, k)
        perms[s.id] = (old_group.unsqueeze(-1) * k + unit.unsqueeze(1)).flatten()
    return perms


def _permute_dim(t: torch.Tensor, sl: Slice, perm: torch.Tensor) -> torch.Tensor:
    idx = slice_index(sl, len(perm))
    full = torch.arange(t.shape[sl.dim])
    full[idx.flatten()] = idx[:, perm, :].flatten()
    return t.index_select(sl.dim, full)


def _permute_grouped(t: torch.Tensor, sl: Slice, perm: torch.Tensor, k_in: int) -> torch.Tensor:
    """Within-group reorder of a grouped conv's input dim (rows already permuted)."""
    rows = t.shape[0]
    k_out = rows // (len(perm) // k_in)
    g = torch.arange(rows) // k_out
    idx = perm.view(-1, k_in)[g] % k_in                     # (rows, k_in)
    idx = idx.view(rows, k_in, *([1] * (t.dim() - 2))).expand_as(t)
    return torch.gather(t, sl.dim, idx)


def permute_state(ir: MergeIR, state: dict[str, torch.Tensor],
                  perms: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict with every slice of every space in ``perms`` reordered.

    A tied tensor is permuted once and every name of it holds the result. ``state`` is not
    modified.
    """
    out = dict(state)
    grouped = []
    meta = getattr(state, "_metadata", None)     # module versions (MNASNet's load hook reads them)
    for slices in tensor_slices(ir).values():      # a tied tensor once, each region once
        for sl in slices:
            perm = perms.get(sl.space)
            if perm is None:
                continue
            if sl.grouped:
                grouped.append((sl, perm, ir.space(sl.space).group_size))
            else:
                out[sl.param] = _permute_dim(out[sl.param], sl, perm)
    for sl, perm, k in grouped:
        out[sl.param] = _permute_grouped(out[sl.param], sl, perm, k)
    out = tie_state(ir, out)
    if meta is not None:
        out = OrderedDict(out)
        out._metadata = meta
    return out
