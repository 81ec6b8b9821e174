"""The torch.export frontend: an aten-level graph of the model lowered to the same merge IR.

Hugging Face transformers models do not trace with ``torch.fx.symbolic_trace``;
``torch.export.export(..., strict=False)`` does. The exported program is unlifted to a
GraphModule whose parameters are ``get_attr`` nodes named as in the model's state dict,
its shapes recorded with a dynamic batch, and each aten op is lowered by its rule in
:data:`hmir.frontends.aten_table.ATEN_RULES` (a dict keyed by overload packet).

Example::

    >>> import transformers
    >>> cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                               intermediate_size=64, vocab_size=100)
    >>> ir = lower(transformers.BertForSequenceClassification(cfg), torch.randint(0, 100, (2, 12)))
    >>> ir.frontend, sorted({s.group_size for s in ir.spaces})          # heads of 16 units
    ('export', [1, 16])
"""
from __future__ import annotations

import copy
import re
from dataclasses import replace

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from hmir.errors import TraceError, UnsupportedOpError
from hmir.frontends.aten_rules import ACtx, AVal
from hmir.frontends.builder import Builder
from hmir.frontends.diagnostics import node_error, user_frame
from hmir.frontends.fx import _fix_outputs
from hmir.ir.modes import eval_mode
from hmir.ir import MergeIR, Segment


class ExportBuilder(Builder):
    """A :class:`Builder` that also records literal sizes to rewrite and fused-projection chunks."""

    def __init__(self, model_name: str, gm: fx.GraphModule) -> None:
        super().__init__(model_name, gm)
        self.sizes: list[tuple[str, int, int, str, object]] = []
        self.split: dict[int, list[int]] = {}

    def size_arg(self, node: fx.Node, arg: int | None, index: int, kind: str, what) -> None:
        """Record that literal ``node.args[arg][index]`` (or ``node.args[arg]`` itself, an int:
        every piece of ``split(x, n)`` records one) is ``kind`` ("extent" of an axis, or
        "units" per group of a space, or its "groups") so the backend rewrites it when widths
        change."""
        if arg is not None and arg < len(node.args) and type(node.args[arg]) is int:
            self.sizes.append((node.name, arg, None, kind, what))     # split(x, n): one size
            return
        if arg is None or arg >= len(node.args) or not isinstance(node.args[arg], (list, tuple)):
            return
        sizes = node.args[arg]
        if 0 <= index < len(sizes) and type(sizes[index]) is int and sizes[index] != -1:
            self.sizes.append((node.name, arg, index, kind, what))

    def chunks(self, sid: int) -> list[int]:
        """Split a fresh fused space (``in_proj``: q, k, v rows) into one space per head-chunk."""
        if sid in self.split:
            return self.split[sid]
        rs = self.raw[sid]
        if any(self.uf[i] == self.uf[sid] for i in range(len(self.raw)) if i != sid) or \
                any(sl.space == sid and (sl.role != "out" or sl.inner != 1 or sl.outer != 1)
                    for sl in self.slices):
            self.fail("selects one chunk of a projection whose features are used elsewhere")
        k, d = rs.width // rs.group_size, rs.group_size
        rs.width, rs.group_size = d, 1
        new = [sid] + [self.new_space(d, f"{rs.name}:{c}") for c in range(1, k)]
        self.slices = [s for sl in self.slices for s in self._split_slice(sl, sid, new, d)]
        for v in self.values.values():
            for dim, axis in getattr(v, "axes", {}).items():
                if axis == (Segment(sid),):
                    v.axes[dim] = tuple(Segment(s) for s in new)
        self.split[sid] = new
        return new

    @staticmethod
    def _split_slice(sl, sid, new, d):
        if sl.space != sid:
            return [sl]
        return [replace(sl, space=s, offset=sl.offset + c * d) for c, s in enumerate(new)]

    def finalize(self, frontend: str) -> MergeIR:
        ir = super().finalize(frontend)
        members: dict[int, int] = {}
        for i in range(len(self.raw)):
            members.setdefault(self.uf[i], i)
        roots = sorted(members, key=lambda r: members[r])
        new_id = {r: k for k, r in enumerate(roots)}
        canon = {i: new_id[self.uf[i]] for i in range(len(self.raw))}
        ir.meta["size_args"] = {}
        for name, arg, index, kind, what in self.sizes:
            what = canon[what] if kind in ("units", "groups") else tuple(
                Segment(canon[s.space], s.inner, s.outer) for s in what)
            ir.meta["size_args"].setdefault(name, []).append((arg, index, kind, what))
        return ir


def export_graph(model: nn.Module, example: torch.Tensor, name: str = "model") -> fx.GraphModule:
    """``torch.export`` ``model`` (eval mode, batch dim dynamic) and unlift it to a GraphModule.

    A failure raises :class:`~hmir.errors.TraceError` naming the model's source line.
    """
    m = copy.deepcopy(model)
    _no_generation_cache(m)
    dyn = ({0: torch.export.Dim("batch")},)
    try:
        with eval_mode(m):
            ep = torch.export.export(m, (example,), strict=False, dynamic_shapes=dyn)
    except Exception as e:  # export raises many types; all mean "cannot export"
        where = user_frame(e.__traceback__)
        raise TraceError(
            f"{name}: torch.export cannot export {type(model).__name__}: {str(e)[:600]}"
            + (f"\n  at {where}" if where else "")
            + "\n  what to do: make forward() exportable (no data-dependent control flow, the "
              "batch size not hard-coded), or try frontend='fx'") from e
    gm = ep.module()            # its class refuses eval()/train(): rebuild a plain GraphModule
    gm = fx.GraphModule(gm, gm.graph, type(model).__name__)
    _hoist_shape_nodes(gm)
    return gm


def _no_generation_cache(model: nn.Module) -> None:
    """A Hugging Face decoder returns its key/value cache (not a tensor) unless
    ``config.use_cache`` is False: turn it off on hmir's copy, which only computes outputs."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "use_cache", False):
        cfg.use_cache = False


def _hoist_shape_nodes(gm: fx.GraphModule) -> None:
    """Move nodes computed from shapes and constants only (sizes, masks, position ids) to the
    top, so that a copied layer never reads one defined later (export defines each at first use)."""
    nodes = list(gm.graph.nodes)
    anchor = [n for n in nodes if n.op in ("placeholder", "get_attr")][-1]
    shape: set[fx.Node] = set()
    for n in nodes:
        ins = n.all_input_nodes
        if n.op == "call_function" and (n.target is torch.ops.aten.sym_size.int or all(
                i.op == "get_attr" or i in shape for i in ins)):
            shape.add(n)
            anchor.append(n)
            anchor = n
    gm.graph.lint()
    gm.recompile()


def lower(model: nn.Module, example: torch.Tensor, name: str = "model") -> MergeIR:
    """Lower ``model`` through torch.export (see the module docstring)."""
    return lower_graph(export_graph(model, example, name), example, name)


def lower_graph(gm: fx.GraphModule, example: torch.Tensor, name: str = "model") -> MergeIR:
    """Lower an already exported (aten) GraphModule, e.g. one hmir inflated with units."""
    from hmir.frontends.aten_table import lookup
    from hmir.ir.verify import verify

    with eval_mode(gm):
        ShapeProp(gm).propagate(example)
    b = ExportBuilder(name, gm)
    state = gm.state_dict()
    for node in gm.graph.nodes:
        b.node = node
        b.values[node] = _lower_node(b, node, state, lookup)
    b.node = None
    for p, t in state.items():
        if p not in b.param_dims and p not in b.unsliced and (
                not t.is_floating_point() or p.endswith("num_batches_tracked")):
            b.declare(p, reason="integer buffer (no feature dim)")
    ir = b.finalize("export")
    ir.meta["unit_labels"] = block_labels(gm)
    verify(ir)
    return ir


_NUMBERED = re.compile(r"(^|[._])\d+$")
_PARAM_OPS = ("linear", "conv1d", "conv2d", "conv3d", "addmm")


def block_labels(gm: fx.GraphModule) -> dict[str, str]:
    """Node → its block: the outermost numbered submodule (``encoder.layer.3``) holding at
    least two linear/conv ops; nodes hmir inserted carry ``meta["hmir_block"]``."""
    stacks = {}
    for n in gm.graph.nodes:
        if n.op == "call_function":
            paths = [p for p, _ in (n.meta.get("nn_module_stack") or {}).values()]
            stacks[n] = [p for p in paths if _NUMBERED.search(p)]
    heavy: dict[str, int] = {}
    for n, paths in stacks.items():
        if getattr(n.target, "__name__", "").split(".")[0] in _PARAM_OPS:
            for p in paths:
                heavy[p] = heavy.get(p, 0) + 1
    out = {}
    for n, paths in stacks.items():
        label = n.meta.get("hmir_block") or next((p for p in paths if heavy.get(p, 0) >= 2), None)
        if label:
            out[n.name] = label
    return out


def _shape(node: fx.Node):
    tm = node.meta.get("tensor_meta")
    return tuple(int(s) for s in tm.shape) if hasattr(tm, "shape") else None


def _index_only(b: ExportBuilder, node: fx.Node) -> bool:
    """Computed only from index values (or from no tensor at all): carries no feature space.

    Dataflow, not an op list: mask builders, position ids, rotary tables and bucket
    computations use many ops (diff, index, cos, cumsum...) but never read a feature tensor.
    """
    tensors = [v for v in (b.values.get(n) for n in node.all_input_nodes) if isinstance(v, AVal)]
    if tensors:
        return all(v.index for v in tensors)
    return (node.target is not torch.ops.aten.sym_size.int and _shape(node) is not None) \
        or isinstance(node.meta.get("tensor_meta"), (tuple, list))


def _index_value(b: ExportBuilder, node: fx.Node) -> AVal:
    for n in node.all_input_nodes:          # an integer buffer read only here: declared
        v = b.values.get(n)
        if isinstance(v, AVal) and v.param is not None:
            b.declare(v.param, reason="read only by index computation (no feature dim)")
    return AVal(_shape(node) or (), index=True)


def _lower_node(b: ExportBuilder, node: fx.Node, state: dict, lookup):
    if node.op == "placeholder":
        shape, tm = _shape(node), node.meta.get("tensor_meta")
        if shape is None:
            return None
        return AVal(shape, index=True) if not tm.dtype.is_floating_point else AVal(shape, raw=True)
    if node.op == "get_attr":
        shape = _shape(node)
        if shape is None:
            return None
        if node.target not in state:                  # a constant (non-persistent buffer)
            return AVal(shape, index=True)
        return AVal(shape, param=node.target, index=not state[node.target].is_floating_point())
    if node.op == "output":
        _fix_outputs(b, node)
        return None
    if node.op == "call_module":          # torch.export's shape guards: no tensors
        return None
    if _index_only(b, node):
        return _index_value(b, node)
    rule = lookup(node.target)
    if rule is None:
        raise node_error(UnsupportedOpError, b.model_name, node,
                         f"is the aten op '{node.target}', which has no lowering rule",
                         hint="register a rule for its overload packet: "
                              "hmir.frontends.aten_table.register_aten(torch.ops.aten.<op>, rule), "
                              "or merge with frontend='fx' if the model traces")
    return rule.apply(ACtx(b, node))
