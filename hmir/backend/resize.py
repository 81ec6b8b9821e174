"""Resizing: layers and IRs at new space widths (for merges whose width differs from A's).

Two things change when a space gets a new width: the modules whose parameters touch it
(their tensors *and* the attributes ``forward()`` reads, e.g. ``Linear.in_features``) and
the IR's own bookkeeping (space widths, slice and observation offsets after a concat).

Resize rules are data: :data:`RESIZE_RULES` maps a module type to
``fn(module, new_tensors)``; ``new_tensors`` maps the module's local tensor names to
their new values. A rule replaces the tensors (:func:`set_tensors`) and fixes the
attributes. Register one for a custom layer with :func:`register_resize`.

Example::

    >>> import torch, torch.nn as nn
    >>> lin = nn.Linear(4, 8)
    >>> RESIZE_RULES[nn.Linear](lin, {"weight": torch.zeros(6, 4), "bias": torch.zeros(6)})
    >>> lin.out_features, lin(torch.randn(2, 4)).shape
    (6, torch.Size([2, 6]))
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import sympy
import torch
import torch.nn as nn

from hmir.errors import HMIRError, MergeError
from hmir.ir import MergeIR, ObsPoint, Slice, Space
from hmir.ir.parts import keeps_group_size, pinned_classes, resized_group_sizes

ResizeRule = Callable[[nn.Module, dict[str, torch.Tensor]], None]


def set_tensors(module: nn.Module, new: dict[str, torch.Tensor]) -> None:
    """Replace parameters/buffers of ``module`` (dotted local names allowed) by ``new``.

    A parameter keeps its ``requires_grad``, device and dtype; a buffer keeps device,
    dtype and persistence. Example: ``set_tensors(bn, {"running_mean": torch.zeros(6)})``.
    """
    for name, t in new.items():
        prefix, _, leaf = name.rpartition(".")
        owner = module.get_submodule(prefix) if prefix else module
        old = getattr(owner, leaf)
        value = t.detach().clone().to(device=old.device, dtype=old.dtype)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
        elif leaf in owner._buffers:
            owner._buffers[leaf] = value
        else:
            raise MergeError(f"'{name}' is neither a parameter nor a buffer of "
                             f"{type(module).__name__}")


def _channels(new: dict[str, torch.Tensor], *names: str) -> int | None:
    """Length of the first of ``names`` present in ``new`` (the per-channel tensors)."""
    return next((int(new[n].shape[0]) for n in names if n in new), None)


def resize_conv(m: nn.Module, new: dict[str, torch.Tensor]) -> None:
    """Conv1d/2d/3d: depthwise stays depthwise (same multiplier); grouped keeps its groups."""
    w = new.get("weight", m.weight)
    out = int(w.shape[0])
    depthwise = m.groups > 1 and m.groups == m.in_channels
    if depthwise:
        mult = m.out_channels // m.in_channels
        if out % mult:
            raise MergeError(f"depthwise conv with multiplier {mult} cannot have {out} outputs")
        groups = cin = out // mult
    else:
        groups, cin = m.groups, int(w.shape[1]) * m.groups
        if out % groups:
            raise MergeError(f"{out} output channels do not split into {groups} groups")
    set_tensors(m, new)
    m.in_channels, m.out_channels, m.groups = cin, out, groups


def resize_linear(m: nn.Module, new: dict[str, torch.Tensor]) -> None:
    """Linear: in_features / out_features from the new weight."""
    w = new.get("weight", m.weight)
    set_tensors(m, new)
    m.out_features, m.in_features = int(w.shape[0]), int(w.shape[1])


def resize_batch_norm(m: nn.Module, new: dict[str, torch.Tensor]) -> None:
    """BatchNorm1d/2d/3d: num_features from the affine params or running stats."""
    set_tensors(m, new)
    n = _channels(new, "weight", "bias", "running_mean", "running_var")
    m.num_features = m.num_features if n is None else n


def resize_layer_norm(m: nn.Module, new: dict[str, torch.Tensor]) -> None:
    """LayerNorm: ``normalized_shape`` (read by F.layer_norm) from the new affine params."""
    set_tensors(m, new)
    w = new.get("weight", new.get("bias"))
    if w is not None:
        m.normalized_shape = tuple(int(s) for s in w.shape)


def resize_group_norm(m: nn.Module, new: dict[str, torch.Tensor]) -> None:
    """GroupNorm: num_channels changes, num_groups is kept (it must divide the channels)."""
    n = _channels(new, "weight", "bias")
    if n is not None and n % m.num_groups:
        raise MergeError(f"{n} channels do not split into {m.num_groups} groups")
    set_tensors(m, new)
    m.num_channels = m.num_channels if n is None else n


RESIZE_RULES: dict[type, ResizeRule] = {
    **{t: resize_conv for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d)},
    nn.Linear: resize_linear,
    **{t: resize_batch_norm for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)},
    nn.LayerNorm: resize_layer_norm,
    nn.GroupNorm: resize_group_norm,
}


def register_resize(cls: type, fn: ResizeRule, *, override: bool = False) -> None:
    """Resize instances of module type ``cls`` with ``fn(module, new_tensors)``.

    Example: ``register_resize(MyScale, lambda m, new: set_tensors(m, new))``.
    """
    if not callable(fn):
        raise HMIRError(f"a resize rule must be callable as fn(module, new_tensors); got {fn!r}")
    if cls in RESIZE_RULES and not override:
        raise HMIRError(f"a resize rule for {cls.__qualname__} is already registered; pass "
                        f"override=True to replace it")
    RESIZE_RULES[cls] = fn


def unregister_resize(cls: type) -> None:
    """Remove the resize rule of ``cls`` (e.g. in tests); unknown types raise HMIRError."""
    if cls not in RESIZE_RULES:
        raise HMIRError(f"no resize rule is registered for {cls.__qualname__}")
    del RESIZE_RULES[cls]


# -- the IR at new widths ------------------------------------------------------------
def new_widths(ir: MergeIR, widths: dict[int, int]) -> dict[int, int]:
    """Every space id → its new width (``widths`` checked; missing ids keep theirs)."""
    bad = [k for k in widths if not (isinstance(k, int) and 0 <= k < len(ir.spaces))]
    if bad:
        raise MergeError(f"{ir.name}: widths name unknown space ids {bad[:5]} "
                         f"(the IR has {len(ir.spaces)} spaces)")
    out = {s.id: s.n for s in ir.spaces}
    pinned = pinned_classes(ir)
    for sid, n in widths.items():
        s = ir.space(sid)
        if int(n) < 1:
            raise MergeError(f"{ir.name}: space '{s.name}' cannot have width {n}")
        if s.fixed and int(n) != s.n:
            raise MergeError(f"{ir.name}: space '{s.name}' is fixed ({s.fixed_reason}); its width "
                             f"{s.n} cannot become {n}")
        keep = keeps_group_size(ir, s, pinned)
        if keep and int(n) % s.group_size:
            raise MergeError(f"{ir.name}: space '{s.name}' has heads of {s.group_size} units with "
                             f"pinned (rotary) units, which do not divide its new width {n}")
        if s.group_size > 1 and not keep and int(n) % s.groups:
            raise MergeError(f"{ir.name}: space '{s.name}' has {s.groups} groups, which do not "
                             f"divide its new width {n}")
        out[sid] = int(n)
    return out


def axis_extent(axis: tuple, width: dict[int, int]) -> int:
    """Entries an axis spans along its dim: Σ width(space)·inner·outer over its segments."""
    return sum(width[s.space] * s.inner * s.outer for s in axis)


def resized_ir(ir: MergeIR, widths: dict[int, int]) -> MergeIR:
    """A copy of ``ir`` whose spaces have the new ``widths`` (``ir`` is left unchanged).

    Slice and observation offsets are recomputed; group counts are kept (group sizes, where
    the group class has pinned units: :func:`~hmir.ir.parts.keeps_group_size`). The copy shares
    ``ir.graph_module`` (not resized), so verify it against an explicit state.

    Example::

        >>> from hmir.frontends import lower
        >>> from hmir.harness import zoo
        >>> from hmir.ir.verify import verify
        >>> ir = lower(zoo.mlp(4, (8,), 2), torch.randn(2, 4))
        >>> ir2 = resized_ir(ir, {1: 16})
        >>> [s.n for s in ir2.spaces], [s.n for s in ir.spaces]
        ([4, 16, 2], [4, 8, 2])
        >>> verify(ir2, zoo.mlp(4, (16,), 2).state_dict())    # a state of the new widths
    """
    n = new_widths(ir, widths)
    gsize = resized_group_sizes(ir, n)
    spaces = [_resized_space(s, n[s.id], gsize[s.id]) for s in ir.spaces]
    offsets = _slice_offsets(ir, spaces)
    for s in spaces:
        s.slices = [replace(sl, offset=offsets[(sl.param, sl.dim, sl.offset)]) for sl in s.slices]
        s.points = [_moved_point(ir, pt, n) for pt in s.points]
    return replace(ir, spaces=spaces, param_dims=dict(ir.param_dims),
                   unsliced=dict(ir.unsliced), meta=dict(ir.meta))


def _resized_space(s: Space, n: int, gsize: int) -> Space:
    return replace(s, width=sympy.Integer(n), group_size=gsize, slices=list(s.slices),
                   points=list(s.points), joins=list(s.joins))


def _slice_extent(sl: Slice, s: Space) -> int:
    return (s.group_size if sl.grouped else s.n) * sl.inner * sl.outer


def _slice_offsets(ir: MergeIR, spaces: list[Space]) -> dict[tuple, int]:
    """(param, dim, old offset) → new offset: the slices of one dim tile it in order."""
    extents: dict[tuple[str, int], dict[int, int]] = {}
    for s in ir.spaces:
        for sl in s.slices:
            extents.setdefault((sl.param, sl.dim), {})[sl.offset] = _slice_extent(sl, spaces[s.id])
    out = {}
    for (param, dim), by_offset in extents.items():
        at = 0
        for old in sorted(by_offset):
            out[(param, dim, old)] = at
            at += by_offset[old]
    return out


def _moved_point(ir: MergeIR, pt: ObsPoint, n: dict[int, int]) -> ObsPoint:
    axis = ir.meta.get("axes", {}).get(pt.node, {}).get(pt.dim)
    if not axis:
        return pt
    old = {s.id: s.n for s in ir.spaces}
    at_old = at_new = 0
    for seg in axis:
        if at_old == pt.offset:
            return replace(pt, offset=at_new)
        at_old += axis_extent((seg,), old)
        at_new += axis_extent((seg,), n)
    return pt
