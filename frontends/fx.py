"""The torch.fx frontend: ``symbolic_trace`` + shape propagation + rule-driven lowering.

Example::

    >>> import torch, torch.nn as nn
    >>> from hmir.frontends.fx import lower
    >>> ir = lower(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(2, 4))
    >>> [(s.name, s.n, s.fixed) for s in ir.spaces]
    [('input:_0:1', 4, True), ('_0', 8, False), ('_2', 2, True)]
"""
from __future__ import annotations

import linecache
import sys

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from hmir.errors import TraceError, UnsupportedOpError
from hmir.frontends.builder import Builder, Val
from hmir.frontends.diagnostics import node_error, user_frame
from hmir.frontends.registry import MODULE_RULES, lookup
from hmir.frontends.rules import Ctx
from hmir.ir import MergeIR
from hmir.ir.modes import eval_mode  # noqa: F401  (re-exported: it lived here)

_HERE = __file__.replace("\\", "/")
_HINTS = {
    "call_module": ("register a rule for it: hmir.frontends.register_module({key}, rule) with "
                    "rules.Pointwise() for elementwise modules, rules.Affine(dim, params) for "
                    "per-channel parameters, rules.ParamOp(...) for a weighted layer "
                    "(see examples/custom_architecture.py)"),
    "call_function": "register a rule for it: hmir.frontends.register_function({key}, rule)",
    "call_method": "register a rule for it: hmir.frontends.register_method('{key}', rule)",
}


class _Tracer(fx.Tracer):
    """symbolic_trace that keeps registered module types as leaves and records source lines.

    Each node's ``stack_trace`` is the one user frame that created it (the innermost frame
    outside torch), found by walking the interpreter's frames: fx's own
    ``record_stack_traces`` captures and symbolises the whole stack for every node, which
    costs ~0.2 s on the first trace of a process (resnet18) for the one line errors quote.
    """

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m) in MODULE_RULES or super().is_leaf_module(m, qualname)

    def create_proxy(self, *args, **kwargs):
        proxy = super().create_proxy(*args, **kwargs)
        if not proxy.node.stack_trace:
            proxy.node.stack_trace = _user_frame(sys._getframe(1))
        return proxy


def _user_frame(frame) -> str:
    """``File "...", line N, in f`` and the code of the innermost frame outside torch."""
    while frame is not None:
        path = frame.f_code.co_filename.replace("\\", "/")
        if "/torch/" not in path and path != _HERE:
            code = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
            return (f'  File "{frame.f_code.co_filename}", line {frame.f_lineno}, in '
                    f'{frame.f_code.co_name}\n    {code}\n')
        frame = frame.f_back
    return ""


def trace(model: nn.Module, name: str = "model") -> fx.GraphModule:
    """Trace ``model`` with torch.fx; a failure raises :class:`TraceError` naming the line."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises many types; all mean "cannot trace"
        where = user_frame(e.__traceback__)
        raise TraceError(
            f"{name}: torch.fx.symbolic_trace cannot trace {type(model).__name__}: {e}"
            + (f"\n  at {where}" if where else "")
            + "\n  what to do: remove data-dependent Python control flow from forward(), or "
              "register the submodule that contains it as a leaf with "
              "hmir.frontends.register_module(Type, rule)") from e
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def propagate_shapes(gm: fx.GraphModule, model: nn.Module, example: torch.Tensor) -> None:
    """Record every node's output shape in ``node.meta['tensor_meta']`` (model left unchanged)."""
    with eval_mode(model):
        ShapeProp(gm).propagate(example)


def lower(model: nn.Module, example: torch.Tensor, name: str = "model") -> MergeIR:
    """Lower ``model`` to the merge IR, using ``example`` (a batch of inputs) for shapes.

    Raises :class:`~hmir.errors.UnsupportedOpError` for ops no rule covers, naming the
    node, its source line and how to register a rule.
    """
    from hmir.ir.verify import verify

    gm = trace(model, name)
    propagate_shapes(gm, model, example)
    b = Builder(name, gm)
    modules = dict(gm.named_modules())
    state = set(gm.state_dict().keys())
    for node in gm.graph.nodes:
        b.node = node
        b.values[node] = _lower_node(b, node, modules, state)
    b.node = None
    ir = b.finalize("fx")
    verify(ir)
    return ir


def _shape(node: fx.Node):
    tm = node.meta.get("tensor_meta")
    return tuple(int(s) for s in tm.shape) if hasattr(tm, "shape") else None


def _lower_node(b: Builder, node: fx.Node, modules: dict, state: set):
    if node.op == "placeholder":
        shape = _shape(node)
        return Val(shape, raw=True) if shape is not None else None
    if node.op == "get_attr":
        shape = _shape(node)
        return Val(shape, param=node.target if node.target in state else None) if shape else None
    if node.op == "output":
        _fix_outputs(b, node)
        return None
    module = modules.get(node.target) if node.op == "call_module" else None
    rule = lookup(node.op, node.target, module)
    if rule is None:
        key = type(module).__qualname__ if module is not None else getattr(
            node.target, "__name__", str(node.target))
        raise node_error(UnsupportedOpError, b.model_name, node, "has no lowering rule",
                         hint=_HINTS[node.op].format(key=key))
    return rule.apply(Ctx(b, node, module))


def _fix_outputs(b: Builder, node: fx.Node) -> None:
    def fix(n):
        v = b.values.get(n)
        if isinstance(v, Val):
            for axis in v.axes.values():
                for seg in axis:
                    b.fix(seg.space, "model output")
        return n

    fx.node.map_arg(node.args, fix)
