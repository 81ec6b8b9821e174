"""The merge IR: spaces, parameter slices, observation points and joins of one model.

A :class:`Space` is a feature axis whose units can be reordered without changing the
model's function, provided every :class:`Slice` that touches it is reordered alike.
A graph value's feature axis is an :data:`Axis`: a tuple of :class:`Segment` s laid end
to end (a concat is several segments; a flatten of ``C×H×W`` is one segment whose
units each expand to ``inner = H·W`` consecutive entries).

Example::

    >>> import torch.nn as nn
    >>> from hmir.frontends import lower
    >>> ir = lower(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(2, 4))
    >>> [s.width for s in ir.spaces]
    [4, 8, 2]
    >>> [s.fixed for s in ir.spaces], ir.free_spaces[0].producers()[0]
    ([True, False, True],
     Slice(param='0.weight', dim=0, space=1, role='out', offset=0, inner=1, outer=1, grouped=False))
    >>> print(ir)            # the printer's text form (hmir.ir.printer)
    MergeIR 'model' (fx): 3 spaces, 2 fixed
    ...
      %1 _0  width 8
          out 0.weight[0]  0.bias[0]
          in  2.weight[1]
          observe _1@1
    ...
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy
import torch.fx as fx

from hmir.ir.parts import SpaceView


@dataclass(frozen=True)
class Segment:
    """A run of a space inside a tensor axis: entry ``o·(n·inner) + u·inner + i`` for unit u."""

    space: int
    inner: int = 1
    outer: int = 1


Axis = tuple  # tuple[Segment, ...]


@dataclass(frozen=True)
class Slice:
    """The part of one parameter (or buffer) dimension that belongs to a space.

    ``offset`` is where the segment starts along ``dim``; ``inner``/``outer`` as in
    :class:`Segment`. ``role`` is ``"out"`` (written by the op: conv/linear rows, norm
    affine, biases) or ``"in"`` (read: conv/linear columns). ``grouped`` marks the
    input dim of a grouped conv, which holds only the units of one group per row.
    """

    param: str
    dim: int
    space: int
    role: str
    offset: int = 0
    inner: int = 1
    outer: int = 1
    grouped: bool = False


@dataclass(frozen=True)
class ObsPoint:
    """A graph value (node name) where a space can be observed at ``dim`` from ``offset``."""

    node: str
    dim: int
    offset: int


@dataclass
class Space:
    """One permutation group. ``width`` is a sympy expression; ``group_size`` units per group.

    ``parts`` and ``view`` restrict how units move inside a group (pinned rotary units,
    grouped-query heads, fused q|k|v heads): see :mod:`hmir.ir.parts`.
    """

    id: int
    name: str
    width: sympy.Expr
    fixed: bool = False
    fixed_reason: str = ""
    group_size: int = 1
    group_class: int = -1
    parts: tuple = ()
    view: SpaceView | None = None
    slices: list[Slice] = field(default_factory=list)
    points: list[ObsPoint] = field(default_factory=list)
    joins: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        """The concrete width."""
        return int(self.width)

    @property
    def groups(self) -> int:
        return self.n // self.group_size

    @property
    def class_groups(self) -> int:
        """Groups as the group class counts them (a view's ``rep`` copies count once)."""
        return self.groups // (self.view.rep if self.view else 1)

    def producers(self) -> list[Slice]:
        return [s for s in self.slices if s.role == "out"]

    def consumers(self) -> list[Slice]:
        return [s for s in self.slices if s.role == "in"]


@dataclass
class MergeIR:
    """The lowered form of one model: its traced graph and its spaces.

    ``param_dims`` lists, per parameter or buffer, which dims are feature dims (the
    ones slices must cover exactly once); ``unsliced`` names tensors with no feature
    dim and why (e.g. ``num_batches_tracked``). ``meta`` holds what passes compute;
    the frontend fills ``meta["axes"]``: per graph value (node name), ``{dim: Axis}``.
    ``ties`` maps every other name of a tensor the module holds under several names
    (tied weights) to the one name the IR slices (:mod:`hmir.ir.ties`); by default it is
    found from ``graph_module``.
    """

    name: str
    graph_module: fx.GraphModule
    spaces: list[Space]
    param_dims: dict[str, tuple[int, ...]]
    unsliced: dict[str, str]
    frontend: str = "fx"
    meta: dict[str, Any] = field(default_factory=dict)
    ties: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.ties is None:
            from hmir.ir.ties import find_ties

            self.ties = find_ties(self.graph_module, self.param_dims, self.unsliced)

    def space(self, sid: int) -> Space:
        return self.spaces[sid]

    @property
    def free_spaces(self) -> list[Space]:
        """The spaces that may be permuted and merged (all but the fixed ones)."""
        return [s for s in self.spaces if not s.fixed]

    def slices_of(self, param: str) -> list[Slice]:
        return [sl for s in self.spaces for sl in s.slices if sl.param == param]

    def __str__(self) -> str:
        from hmir.ir.printer import format_ir

        return format_ir(self)
