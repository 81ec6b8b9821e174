"""The IR verifier: coverage of every parameter, consistent widths, producers, groups.

Example::

    >>> import torch.nn as nn
    >>> from hmir.frontends import lower
    >>> ir = lower(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(2, 4))
    >>> verify(ir)          # raises VerificationError naming the first broken invariant
    >>> verify(ir, {**ir.graph_module.state_dict(), "extra": torch.zeros(3)})
    Traceback (most recent call last):
        ...
    hmir.errors.VerificationError: model: the merge IR is inconsistent:
      - parameter 'extra' is not covered by any op rule (is it used through an op hmir does
        not understand?)
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import torch

from hmir.errors import VerificationError
from hmir.ir import MergeIR
from hmir.ir.slicing import slice_index


def verify(ir: MergeIR, state: dict[str, torch.Tensor] | None = None) -> None:
    """Check the invariants of ``ir`` against ``state`` (default: its graph module's state).

    - every tensor of the state is either sliced on its feature dims or declared unsliced, or
      is an alias of a tied tensor (:mod:`hmir.ir.ties`) holding the same values;
    - along each feature dim, the slices cover every index exactly once (a region read with
      both roles by the readers of a tied tensor counts once);
    - every free space has a producer and an observation point;
    - spaces linked in one group class have the same number of (class) groups;
    - parts cover each group; a view matches its base's group size, parts and class.
    """
    state = ir.graph_module.state_dict() if state is None else state
    problems: list[str] = []
    problems += _check_declared(ir, state)
    problems += _check_coverage(ir, state)
    problems += _check_spaces(ir)
    if problems:
        raise VerificationError(f"{ir.name}: the merge IR is inconsistent:\n  - "
                                + "\n  - ".join(problems[:20])
                                + ("\n  ..." if len(problems) > 20 else ""))


def _check_declared(ir: MergeIR, state) -> list[str]:
    out = []
    for name in state:
        if name in ir.ties:
            out += _check_tie(ir, state, name)
        elif name not in ir.param_dims and name not in ir.unsliced:
            out.append(f"parameter '{name}' is not covered by any op rule (is it used through an "
                       f"op hmir does not understand?)")
    for name in ir.param_dims:
        if name not in state:
            out.append(f"a slice names '{name}', which is not a parameter or buffer of the model")
    return out


def _check_tie(ir: MergeIR, state, alias: str) -> list[str]:
    """An alias of a tied tensor: never sliced itself, and equal to its canonical in ``state``."""
    canon = ir.ties[alias]
    if alias in ir.param_dims or alias in ir.unsliced:
        return [f"'{alias}' is the same tensor as '{canon}' but the IR also covers it under its "
                f"own name (a tied tensor must be lowered through one name)"]
    if canon not in state:
        return [f"'{alias}' is tied to '{canon}', which the state does not hold"]
    a, c = state[alias], state[canon]
    if a is not c and (a.shape != c.shape or not torch.equal(a, c)):
        return [f"'{alias}' and '{canon}' are one parameter of the model (tied) but the state "
                f"holds different tensors for them (shapes {tuple(a.shape)}, {tuple(c.shape)})"]
    return []


def _check_coverage(ir: MergeIR, state) -> list[str]:
    by_dim = defaultdict(list)
    for s in ir.spaces:
        for sl in dict.fromkeys(replace(x, role="") for x in s.slices):   # a region once
            by_dim[(sl.param, sl.dim)].append((sl, s))
    out = []
    for param, dims in ir.param_dims.items():
        for dim in dims:
            if (param, dim) not in by_dim:
                out.append(f"'{param}' dim {dim} is a feature dim but no space's slice covers it")
    for (param, dim), items in by_dim.items():
        if param not in state:
            continue
        t = state[param]
        if dim >= t.dim():
            out.append(f"'{param}' has no dim {dim} (shape {tuple(t.shape)})")
            continue
        count = torch.zeros(t.shape[dim], dtype=torch.long)
        for sl, s in items:
            n = s.group_size if sl.grouped else s.n
            idx = slice_index(sl, n).flatten()
            if idx.numel() and int(idx.max()) >= t.shape[dim]:
                out.append(f"'{param}' dim {dim} (size {t.shape[dim]}) is shorter than its slice of "
                           f"space '{s.name}' (width {s.n}, offset {sl.offset}, inner {sl.inner})")
                continue
            count.index_add_(0, idx, torch.ones_like(idx))
        bad = (count != 1).nonzero().flatten()
        if len(bad):
            out.append(f"'{param}' dim {dim}: indices {bad[:8].tolist()} are covered "
                       f"{count[bad[:8]].tolist()} times (each must be covered exactly once)")
    return out


def _check_spaces(ir: MergeIR) -> list[str]:
    out = []
    classes = defaultdict(set)
    for s in ir.spaces:
        classes[s.group_class].add(s.class_groups)
        out += _check_within(ir, s)
        if s.fixed:
            continue
        if not s.producers() and s.view is None:       # a view is produced as its base
            out.append(f"free space '{s.name}' has no producer slice")
        if not s.points:
            out.append(f"free space '{s.name}' has no observation point")
    for c, counts in classes.items():
        if len(counts) > 1:
            out.append(f"group class %{c} links spaces with different group counts {sorted(counts)}")
    return out


def _check_within(ir: MergeIR, s) -> list[str]:
    from hmir.ir.parts import is_edge, restrict

    out = []
    if s.parts and (s.parts[0][0] != 0 or s.parts[-1][1] != s.group_size or any(
            a[1] != b[0] for a, b in zip(s.parts, s.parts[1:]))):
        out.append(f"space '{s.name}': parts {s.parts} do not cover its groups of {s.group_size}")
    v = s.view
    if v is None:
        return out
    base = ir.space(v.base)
    if s.groups % v.rep or base.class_groups != s.class_groups or base.group_class != s.group_class:
        out.append(f"space '{s.name}' views '{base.name}' with {v.rep} copies per group but their "
                   f"groups ({s.groups} vs {base.groups}) or group classes differ")
        return out
    hi = v.lo + s.group_size
    if hi > base.group_size or not all(is_edge(base.parts, base.group_size, e) for e in (v.lo, hi)) or \
            restrict(base.parts, base.group_size, v.lo, hi) != s.parts:
        out.append(f"space '{s.name}' views units {v.lo}.. of '{base.name}' whose parts "
                   f"{base.parts} do not match its own {s.parts}")
    return out
