"""Units and stages of a lowered model, found from its graph (design.md: "Unit and stage").

The *cuts* of a graph are the values every path from the input to the output passes
through: the immediate-dominator chain of the output (networkx). Between two consecutive
cuts lies a *segment*. A segment that creates a new feature space (a conv, a linear, a
whole residual block) starts a *piece*; the shape-preserving, space-preserving segments
after it (norm, activation, dropout) are absorbed into it. A piece whose input and output
have the same shape is a **unit**: ``"residual"`` when its output carries the input's space
(a join), ``"plain"`` when it writes a new space of the same width. A **stage** is an
*entry* piece followed by the maximal run of units of one kind; depth alignment keeps the
entries paired and inserts units among the rest.

Example::

    >>> from hmir.harness import zoo
    >>> from hmir.frontends import lower
    >>> stages = find_stages(lower(zoo.resnet20(), torch.randn(2, 3, 32, 32)))
    >>> [(s.kind, len(s.pieces)) for s in stages][:3]
    [('residual', 4), ('residual', 3), ('residual', 3)]
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch.fx as fx

from hmir.errors import LoweringError
from hmir.ir import MergeIR


@dataclass(frozen=True)
class Piece:
    """A run of graph nodes from cut value ``inp`` to cut value ``out`` (node names).

    ``nodes`` are the piece's nodes in graph order (``out`` last, ``inp`` excluded);
    ``kind`` is ``"residual"``, ``"plain"`` or ``"transition"`` (shape or width changes,
    or no new space at all, e.g. pooling).
    """

    inp: str
    out: str
    nodes: tuple[str, ...]
    kind: str
    shape_in: tuple[int, ...]
    shape_out: tuple[int, ...]

    @property
    def is_unit(self) -> bool:
        return self.kind != "transition"


@dataclass(frozen=True)
class Stage:
    """An entry piece then units of one kind (``kind`` is ``"none"`` for a stage of only an entry)."""

    index: int
    pieces: tuple[Piece, ...]
    kind: str

    @property
    def outputs(self) -> list[str]:
        """The node of each piece's output, in order (the features CKA compares)."""
        return [p.out for p in self.pieces]

    def describe(self) -> str:
        units = len(self.pieces) - 1
        return f"stage {self.index}: entry '{self.pieces[0].out}' + {units} {self.kind} unit(s)"


def _is_tensor(tm) -> bool:
    """A tensor value, or a tuple of them (a split's pieces, read by getitem)."""
    return hasattr(tm, "shape") or (isinstance(tm, (tuple, list)) and
                                    any(hasattr(t, "shape") for t in tm))


def _tensor_graph(gm: fx.GraphModule) -> tuple[nx.DiGraph, fx.Node, fx.Node]:
    """Tensor-valued nodes (and tuples of tensors) and their data edges; shape-only values
    (x.size()) are left out."""
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    out = next(n for n in nodes if n.op == "output")
    tensor = {n for n in nodes if _is_tensor(n.meta.get("tensor_meta")) or n is out}
    g = nx.DiGraph()
    g.add_nodes_from(n for n in nodes if n in tensor)
    for n in g.nodes:
        for user in n.users:
            if user in tensor:
                g.add_edge(n, user)
    if len(inputs) != 1:
        raise LoweringError(f"{gm.__class__.__name__}: depth alignment needs a model with one "
                            f"input, found {len(inputs)}")
    return g, inputs[0], out


def cut_chain(gm: fx.GraphModule) -> list[fx.Node]:
    """The cut values from the input to the last value before the output, in graph order."""
    g, src, out = _tensor_graph(gm)
    idom = nx.immediate_dominators(g, src)
    if out not in idom:
        raise LoweringError("the model's output does not depend on its input")
    chain, n = [], idom[out]
    while True:
        chain.append(n)
        if n is src:
            break
        n = idom[n]
    return [n for n in chain[::-1]               # a tuple of pieces (chunk) is not a value
            if n is src or hasattr(n.meta.get("tensor_meta"), "shape")]


def _spaces(ir: MergeIR, name: str) -> tuple:
    axes = ir.meta["axes"].get(name, {})
    return tuple(sorted((d, tuple(s.space for s in a)) for d, a in axes.items()))


def _creates(ir: MergeIR, node: fx.Node) -> bool:
    """Whether ``node`` writes a space none of its tensor inputs carries (conv, linear...)."""
    mine = {sp for _, a in _spaces(ir, node.name) for sp in a}
    seen = {sp for i in node.all_input_nodes for _, a in _spaces(ir, i.name) for sp in a}
    return bool(mine - seen)


def _segments(ir: MergeIR, chain: list[fx.Node]) -> list[list[fx.Node]]:
    """Nodes between consecutive cuts (each list ends with its closing cut)."""
    gm = ir.graph_module
    g, src, _ = _tensor_graph(gm)
    idom = nx.immediate_dominators(g, src)
    pos = {c: k for k, c in enumerate(chain)}
    segs: list[list[fx.Node]] = [[] for _ in chain[1:]]
    for n in gm.graph.nodes:
        if n not in idom or n is src or n.op == "output":
            continue
        d = idom[n]
        while d not in pos:
            d = idom[d]
        if pos[d] < len(segs):
            segs[pos[d]].append(n)
    return segs


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(int(s) for s in node.meta["tensor_meta"].shape)


def find_pieces(ir: MergeIR) -> list[Piece]:
    """The model's pieces in order (see the module docstring).

    Where the frontend labels nodes with their block (``ir.meta["unit_labels"]``: node →
    e.g. ``"encoder.layer.3"``), the segments of one block form one piece, and a segment of
    no block never joins a block's piece (a final LayerNorm after the last layer).
    """
    gm = ir.graph_module
    chain = cut_chain(gm)
    by_name = {n.name: n for n in gm.graph.nodes}
    labels = ir.meta.get("unit_labels", {})
    groups: list[list] = []         # [inp, [nodes], block label]
    for k, seg in enumerate(_segments(ir, chain)):
        inp, out = chain[k], chain[k + 1]
        heavy = any(_creates(ir, n) for n in seg)
        keeps = _shape(inp) == _shape(out) and _spaces(ir, inp.name) == _spaces(ir, out.name)
        label = next((labels[n.name] for n in seg if labels.get(n.name)), None)
        same = not groups or groups[-1][2] is None or groups[-1][2] == label
        if groups and label is not None and groups[-1][2] == label:
            groups[-1][1].extend(seg)       # one block (a transformer layer) is one piece
        elif groups and not heavy and keeps and same:
            groups[-1][1].extend(seg)
        else:
            groups.append([inp, list(seg), label])
    pieces = []
    for inp, nodes, _ in groups:
        out = nodes[-1]
        pieces.append(Piece(inp.name, out.name, tuple(n.name for n in nodes),
                            _kind(ir, inp, out, nodes), _shape(inp), _shape(by_name[out.name])))
    return pieces


def _kind(ir: MergeIR, inp: fx.Node, out: fx.Node, nodes: list[fx.Node]) -> str:
    if _shape(inp) != _shape(out) or not any(_creates(ir, n) for n in nodes):
        return "transition"
    s_in, s_out = _spaces(ir, inp.name), _spaces(ir, out.name)
    if s_in == s_out:
        return "residual"
    widths_in = [ir.space(sp).n for _, a in s_in for sp in a]
    widths_out = [ir.space(sp).n for _, a in s_out for sp in a]
    return "plain" if widths_in == widths_out and len(s_in) == len(s_out) else "transition"


def find_stages(ir: MergeIR) -> list[Stage]:
    """Group the pieces into stages: an entry, then the maximal run of units of one kind."""
    stages: list[list[Piece]] = []
    for p in find_pieces(ir):
        run = stages[-1] if stages else None
        if run is not None and p.is_unit and _run_kind(run) in (None, p.kind):
            run.append(p)
        else:
            stages.append([p])
    return [Stage(k, tuple(ps), _run_kind(ps) or "none") for k, ps in enumerate(stages)]


def _run_kind(pieces: list[Piece]) -> str | None:
    return pieces[1].kind if len(pieces) > 1 else None


def stage_table(stages: list[Stage]) -> str:
    """A one-line-per-stage summary, for error messages and reports."""
    return "\n".join("    " + s.describe() for s in stages)


__all__ = ["Piece", "Stage", "cut_chain", "find_pieces", "find_stages", "stage_table"]
