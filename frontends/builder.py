"""State of one lowering: values' feature axes, raw spaces, their unions, and finalisation.

Rules (see :mod:`hmir.frontends.rules`) call the builder to create spaces, join them and
attach parameter slices; :meth:`Builder.finalize` collapses joined spaces into the
canonical :class:`~hmir.ir.Space` list of a :class:`~hmir.ir.MergeIR`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import sympy
import torch.fx as fx
from networkx.utils import UnionFind

from hmir.errors import LoweringError
from hmir.ir import MergeIR, ObsPoint, Segment, Slice, Space, SpaceView
from hmir.ir.parts import cuts_and_pins, make_parts, restrict


@dataclass
class Val:
    """What lowering knows about one tensor value of the graph.

    ``axes`` maps a dim to the :data:`~hmir.ir.Axis` it carries; ``raw`` marks values
    computed from the model input only (their axes are fixed input spaces, created on
    first use); ``param`` names the parameter a ``get_attr`` value is; ``origin`` maps a
    space to the last point where it was seen unflattened (for observation).
    """

    shape: tuple[int, ...]
    axes: dict[int, tuple] = field(default_factory=dict)
    raw: bool = False
    param: str | None = None
    origin: dict[int, ObsPoint] = field(default_factory=dict)

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass
class _RawSpace:
    width: int
    name: str
    fixed: str = ""
    group_size: int = 1
    cuts: set = field(default_factory=set)
    pins: list = field(default_factory=list)


class Builder:
    """Accumulates spaces, unions and slices while the frontend walks the graph."""

    def __init__(self, model_name: str, gm: fx.GraphModule) -> None:
        self.model_name = model_name
        self.gm = gm
        self.raw: list[_RawSpace] = []
        self.uf = UnionFind()
        self.group_links: list[tuple[int, int]] = []
        self.views: list[tuple[int, SpaceView]] = []
        self.slices: list[Slice] = []
        self.points: list[tuple[int, ObsPoint]] = []
        self.joins: list[tuple[int, str]] = []
        self.param_dims: dict[str, set[int]] = {}
        self.unsliced: dict[str, str] = {}
        self.values: dict[fx.Node, object] = {}
        self.node: fx.Node | None = None

    # -- spaces -------------------------------------------------------------------
    def new_space(self, width: int, name: str, fixed: str = "", group_size: int = 1) -> int:
        sid = len(self.raw)
        self.raw.append(_RawSpace(int(width), name, fixed, group_size))
        self.uf[sid]
        return sid

    def union(self, a: int, b: int) -> None:
        ra, rb = self.raw[self.uf[a]], self.raw[self.uf[b]]
        if ra.width != rb.width:
            self.fail(f"joins spaces '{ra.name}' (width {ra.width}) and '{rb.name}' (width {rb.width})")
        if a != b and self.node is not None:
            self.joins.append((a, self.node.name))
        self.uf.union(a, b)

    def union_axes(self, x: tuple, y: tuple) -> tuple:
        """Join two axes segment by segment (they must have the same layout; segments cut at
        different units are cut alike first: :func:`hmir.frontends.subspaces.align_axes`)."""
        if [self.axis_width((s,)) for s in x] != [self.axis_width((s,)) for s in y]:
            from hmir.frontends.subspaces import align_axes
            x, y = align_axes(self, x, y)
        if len(x) != len(y) or any((s.inner, s.outer) != (t.inner, t.outer) for s, t in zip(x, y)):
            self.fail(f"joins two tensors whose feature layouts differ: {x} vs {y}")
        for s, t in zip(x, y):
            self.union(s.space, t.space)
        return x

    def width(self, sid: int) -> int:
        return self.raw[sid].width

    def axis_width(self, axis: tuple) -> int:
        return sum(self.width(s.space) * s.inner * s.outer for s in axis)

    def axis_of(self, val: Val, dim: int, what: str = "this op") -> tuple:
        """The axis ``val`` carries at ``dim``; raw input values get a fixed space."""
        dim = dim % val.ndim
        if dim in val.axes:
            return val.axes[dim]
        if val.raw:
            sid = self.new_space(val.shape[dim], f"input:{self.node.name}:{dim}", fixed="model input")
            val.axes[dim] = (Segment(sid),)
            return val.axes[dim]
        self.fail(f"{what} reads dim {dim} of a tensor of shape {tuple(val.shape)} whose feature "
                  f"layout at that dim is unknown (carried axes: {sorted(val.axes)})")

    # -- slices and points -----------------------------------------------------------
    def add_slice(self, param: str, dim: int, sid: int, role: str, offset: int = 0,
                  inner: int = 1, outer: int = 1, grouped: bool = False) -> None:
        self.slices.append(Slice(param, dim, sid, role, offset, inner, outer, grouped))
        self.param_dims.setdefault(param, set()).add(dim)

    def axis_slices(self, param: str, dim: int, axis: tuple, role: str) -> None:
        """Attach one slice per segment of ``axis`` along ``param``'s ``dim``."""
        off = 0
        for seg in axis:
            self.add_slice(param, dim, seg.space, role, off, seg.inner, seg.outer)
            off += self.width(seg.space) * seg.inner * seg.outer

    def declare(self, param: str, dims: tuple[int, ...] = (), reason: str = "") -> None:
        """Record a parameter with no feature dim (or extra feature dims) explicitly."""
        if dims:
            self.param_dims.setdefault(param, set()).update(dims)
        else:
            self.unsliced[param] = reason

    def observe(self, val: Val, node: fx.Node) -> Val:
        """Register ``node``'s plain segments as observation origins of their spaces."""
        origin = dict(val.origin)
        for dim, axis in val.axes.items():
            off = 0
            for seg in axis:
                if seg.inner == 1 and seg.outer == 1:
                    origin[seg.space] = ObsPoint(node.name, dim, off)
                off += self.width(seg.space) * seg.inner * seg.outer
        val.origin = origin
        return val

    def read_point(self, val: Val, axis: tuple) -> None:
        """A parameter op reads ``axis`` of ``val``: observe each space where last seen plainly."""
        for seg in axis:
            pt = val.origin.get(seg.space)
            if pt is not None:
                self.points.append((seg.space, pt))

    # -- structure -------------------------------------------------------------------
    def set_group(self, sid: int, size: int) -> None:
        rs = self.raw[sid]
        if rs.width % size:
            self.fail(f"groups of {size} do not divide space '{rs.name}' of width {rs.width}")
        if rs.group_size not in (1, size):
            self.fail(f"space '{rs.name}' would need groups of both {rs.group_size} and {size}")
        rs.group_size = size

    def cut(self, sid: int, *positions: int) -> None:
        """Units of each group of ``sid`` never move across these positions (a head sliced)."""
        self.raw[sid].cuts.update(positions)

    def pin(self, sid: int, lo: int, hi: int) -> None:
        """Units ``lo..hi`` of each group of ``sid`` never move (rotary position embedding)."""
        self.raw[sid].pins.append((lo, hi))

    def view(self, sid: int, base: int, rep: int = 1, lo: int = 0) -> None:
        """``sid`` permutes as a view of ``base`` (see :class:`~hmir.ir.parts.SpaceView`)."""
        self.views.append((sid, SpaceView(base, rep, lo)))
        self.group_links.append((sid, base))

    def fix(self, sid: int, reason: str) -> None:
        self.raw[sid].fixed = self.raw[sid].fixed or reason

    def fail(self, msg: str):
        from hmir.frontends.diagnostics import node_error

        raise node_error(LoweringError, self.model_name, self.node, msg)

    # -- finalisation ----------------------------------------------------------------
    def _tie_shared_params(self) -> None:
        """A tensor read by several ops or held under several names is one: one canonical
        name, and one space per region of each dim whatever the reader's role
        (:mod:`hmir.frontends.ties`)."""
        from hmir.frontends.ties import tie_shared

        tie_shared(self)

    def finalize(self, frontend: str) -> MergeIR:
        self._tie_shared_params()
        members: dict[int, list[int]] = {}
        for i in range(len(self.raw)):
            members.setdefault(self.uf[i], []).append(i)
        roots = sorted(members, key=lambda r: members[r][0])
        new_id = {r: k for k, r in enumerate(roots)}
        remap = {i: new_id[self.uf[i]] for i in range(len(self.raw))}
        spaces = [self._make_space(k, members[r]) for k, r in enumerate(roots)]
        for sl in dict.fromkeys(self.slices):
            spaces[remap[sl.space]].slices.append(replace(sl, space=remap[sl.space]))
        for sid, pt in dict.fromkeys(self.points):
            if pt not in spaces[remap[sid]].points:
                spaces[remap[sid]].points.append(pt)
        for sid, node in self.joins:
            if node not in spaces[remap[sid]].joins:
                spaces[remap[sid]].joins.append(node)
        self._assign_group_classes(spaces, remap)
        self._within_structure(spaces, members, remap)
        dims = {p: tuple(sorted(d)) for p, d in self.param_dims.items()}
        ir = MergeIR(self.model_name, self.gm, spaces, dims, dict(self.unsliced), frontend)
        ir.meta["axes"] = self._node_axes(remap)
        return ir

    def _node_axes(self, remap: dict[int, int]) -> dict[str, dict[int, tuple]]:
        """Per graph value (node name): {dim: axis} with canonical space ids."""
        out = {}
        for node, v in self.values.items():
            if isinstance(v, Val) and v.axes:
                out[node.name] = {d: tuple(replace(s, space=remap[s.space]) for s in axis)
                                  for d, axis in v.axes.items()}
        return out

    def _make_space(self, k: int, ids: list[int]) -> Space:
        members = [self.raw[i] for i in ids]
        fixed = "; ".join(sorted({m.fixed for m in members if m.fixed}))
        gsize = math.lcm(*[m.group_size for m in members])
        if any(m.group_size not in (1, gsize) for m in members):
            self.node = None
            self.fail(f"space '{members[0].name}' joins incompatible group sizes "
                      f"{sorted({m.group_size for m in members})}")
        return Space(k, members[0].name, sympy.Integer(members[0].width), bool(fixed), fixed, gsize)

    def _within_structure(self, spaces: list[Space], members: dict, remap: dict) -> None:
        """Parts of every space from its members' cuts and pins; views share parts with bases."""
        cuts = {s.id: set() for s in spaces}
        pins = {s.id: [] for s in spaces}
        for ids in members.values():
            for i in ids:
                cuts[remap[i]] |= self.raw[i].cuts
                pins[remap[i]] += self.raw[i].pins
        views = [(remap[sid], replace(v, base=remap[v.base])) for sid, v in self.views]
        for _ in range(2):                   # parts flow base -> view and view -> base
            for sid, v in views:
                k = spaces[sid].group_size
                cuts[v.base] |= {v.lo, v.lo + k} | {c + v.lo for c in cuts[sid]}
                pins[v.base] += [(a + v.lo, b + v.lo) for a, b in pins[sid]]
                base = make_parts(spaces[v.base].group_size, cuts[v.base], pins[v.base])
                c, p = cuts_and_pins(restrict(base, spaces[v.base].group_size, v.lo, v.lo + k))
                cuts[sid] |= c
                pins[sid] += p
        for s in spaces:
            s.parts = make_parts(s.group_size, cuts[s.id], pins[s.id])
        for sid, v in views:
            if spaces[sid].view not in (None, v):
                self.node = None
                self.fail(f"space '{spaces[sid].name}' is a view of two different spaces")
            spaces[sid].view = v

    def _assign_group_classes(self, spaces: list[Space], remap: dict[int, int]) -> None:
        guf = UnionFind(range(len(spaces)))
        for a, b in self.group_links:
            guf.union(remap[a], remap[b])
        first: dict[int, int] = {}
        for s in spaces:
            s.group_class = first.setdefault(guf[s.id], s.id)
