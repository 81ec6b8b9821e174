"""The backend: a standalone merged ``nn.Module`` (fx GraphModule) with the merged weights.

With ``widths`` (space id → new width) the emitted module is A's graph at new layer
widths: every called module whose tensors change shape is resized by its rule in
:data:`hmir.backend.resize.RESIZE_RULES`, and the literal sizes of reshape/view nodes at feature
dims are rewritten to the new extents.

Example::

    >>> from hmir.frontends import lower
    >>> from hmir.harness import zoo
    >>> a, b, x = zoo.mlp(4, (8,), 2), zoo.mlp(4, (16,), 2), torch.randn(3, 4)
    >>> ir_a = lower(a, x)
    >>> merged = emit(ir_a, a.state_dict())              # runs on the device/dtype of the state
    >>> torch.equal(merged(x), a(x)), merged.training
    (True, False)
    >>> wide = emit(ir_a, b.state_dict(), widths={1: 16})     # space 1 now has 16 units
    >>> wide(x).shape, torch.allclose(wide(x), b(x))          # A's graph at B's widths is B
    (torch.Size([3, 2]), True)
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from hmir.errors import MergeError
from hmir.frontends.diagnostics import node_error
from hmir.ir import MergeIR
from hmir.ir.parts import resized_group_sizes
from hmir.backend.resize import RESIZE_RULES, axis_extent, new_widths, resized_ir, set_tensors

_SIZE_KWARGS = ("shape", "size")


def emit(ir: MergeIR, state: dict[str, torch.Tensor],
         widths: dict[int, int] | None = None) -> fx.GraphModule:
    """A fresh GraphModule of ``ir``'s graph holding ``state``, in eval mode.

    ``widths`` maps space ids to new widths (missing ids keep theirs); without it every
    tensor of ``state`` must keep its shape. Neither the user's model nor
    ``ir.graph_module`` is modified.
    """
    merged = copy.deepcopy(ir.graph_module)
    if widths is None:
        own = merged.state_dict()
        bad = [k for k in own if k in state and own[k].shape != state[k].shape]
        if bad:
            shapes = ", ".join(f"{k} {tuple(own[k].shape)}->{tuple(state[k].shape)}"
                               for k in bad[:3])
            raise MergeError(f"{ir.name}: merged tensors changed shape ({shapes}); pass "
                             f"widths={{space id: width}} to emit a model with resized layers")
    else:
        from hmir.ir.verify import verify

        verify(resized_ir(ir, widths), state)
        width = new_widths(ir, widths)
        _resize_modules(ir, merged, state, width)
        _rewrite_shape_args(ir, merged, width)
        _rewrite_size_args(ir, merged, width)
        merged.recompile()
    _to_state_device(merged, state)
    _retie(merged, ir.ties)
    merged.load_state_dict(state, strict=True)
    return merged.eval()


def _retie(module: nn.Module, ties: dict[str, str]) -> None:
    """Every alias of a tied tensor holds its canonical's object again (design property 7:
    resizing replaces each module's tensors one by one, which would leave two copies)."""
    for alias, canon in ties.items():
        prefix, _, leaf = alias.rpartition(".")
        owner = module.get_submodule(prefix) if prefix else module
        if leaf in owner._parameters:
            owner._parameters[leaf] = module.get_parameter(canon)
        elif leaf in owner._buffers:
            owner._buffers[leaf] = module.get_buffer(canon)


def _to_state_device(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    ref = next((t for t in state.values() if t.is_floating_point()), None)
    if ref is not None:
        module.to(device=ref.device, dtype=ref.dtype)


# -- modules ---------------------------------------------------------------------------
def _resize_modules(ir: MergeIR, gm: fx.GraphModule, state: dict[str, torch.Tensor],
                    width: dict[int, int]) -> None:
    """Resize each module that owns a tensor whose shape changes (called ones by rule)."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    changed = {_owner(name, called) for name, t in gm.state_dict().items()
               if name in state and state[name].shape != t.shape}
    for owner in sorted(changed):
        prefix = f"{owner}." if owner else ""
        new = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        module = gm.get_submodule(owner)
        if owner in called:
            _apply_rule(ir, owner, module, new)
        else:            # a container of get_attr tensors: forward() never runs
            _set_own(module, {k: v for k, v in new.items() if "." not in k})
    _resize_affineless_layer_norms(ir, gm, width)


def _owner(name: str, called: set[str]) -> str:
    """The called module that uses tensor ``name``, else the module that holds it."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:i]) in called:
            return ".".join(parts[:i])
    return ".".join(parts[:-1])


def _set_own(module: nn.Module, new: dict[str, torch.Tensor]) -> None:
    set_tensors(module, {k: v for k, v in new.items() if getattr(module, k).shape != v.shape})


def _apply_rule(ir: MergeIR, path: str, module: nn.Module, new: dict[str, torch.Tensor]) -> None:
    own = dict(module.state_dict())
    diff = ", ".join(f"{k} {tuple(own[k].shape)}->{tuple(v.shape)}"
                     for k, v in new.items() if k in own and own[k].shape != v.shape)
    rule = RESIZE_RULES.get(type(module))
    where = f"{ir.name}: module '{path}' ({type(module).__qualname__}) changes shape: {diff}"
    if rule is None:
        raise MergeError(f"{where}\n  what to do: register a resize rule for its type: "
                         f"hmir.backend.resize.register_resize({type(module).__qualname__}, fn) with "
                         f"fn(module, new_tensors) replacing its tensors (hmir.backend.resize.set_tensors) "
                         f"and updating the attributes its forward() reads")
    try:
        rule(module, new)
    except MergeError as e:
        raise MergeError(f"{where}; its resize rule failed: {e}") from e


def _resize_affineless_layer_norms(ir: MergeIR, gm: fx.GraphModule, width: dict[int, int]) -> None:
    """LayerNorms without parameters still read normalized_shape: take it from the axes."""
    axes = ir.meta.get("axes", {})
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.LayerNorm):
            continue
        m = gm.get_submodule(node.target)
        src = node.args[0] if node.args else None
        axis = axes.get(getattr(src, "name", None), {}).get(_ndim(src) - 1)
        if m.weight is None and m.bias is None and axis and len(m.normalized_shape) == 1:
            m.normalized_shape = (axis_extent(axis, width),)


def _ndim(node) -> int:
    tm = getattr(node, "meta", {}).get("tensor_meta")
    return len(tm.shape) if hasattr(tm, "shape") else 0


# -- shape constants -----------------------------------------------------------------
def _rewrite_shape_args(ir: MergeIR, gm: fx.GraphModule, width: dict[int, int]) -> None:
    """Rewrite literal sizes of marked reshape/view nodes at feature dims to the new extents."""
    old = {s.id: s.n for s in ir.spaces}
    for node in gm.graph.nodes:
        if not node.meta.get("hmir_shape_args"):
            continue
        where, sizes = _sizes(node)
        if sizes is None or not any(type(v) is int and v != -1 for v in sizes):
            continue
        if "axes" not in ir.meta:
            raise node_error(MergeError, ir.name, node, "has literal sizes but the IR has no "
                             "meta['axes'] to rewrite them with", hint="lower the model again")
        new = list(sizes)
        for dim, axis in ir.meta["axes"].get(node.name, {}).items():
            d = dim % len(sizes)
            if type(sizes[d]) is not int or sizes[d] == -1:
                continue
            if sizes[d] != axis_extent(axis, old):
                raise node_error(MergeError, ir.name, node,
                                 f"has the literal size {sizes[d]} at dim {d}, which carries "
                                 f"features of extent {axis_extent(axis, old)}; hmir cannot tell "
                                 f"what it becomes at the new widths",
                                 hint="compute the size from the tensor (x.size(d)) or use -1")
            new[d] = axis_extent(axis, width)
        _set_sizes(node, where, new)


def _rewrite_size_args(ir: MergeIR, gm: fx.GraphModule, width: dict[int, int]) -> None:
    """Literal sizes the frontend listed in ``ir.meta["size_args"]`` ({node: [(arg, index, kind,
    what)]}): kind "extent" is an axis's extent (layer_norm's shape), "units" a space's units
    per group (a head's size in ``view(B, S, H, d)``), "groups" its group count (heads)."""
    gsize = resized_group_sizes(ir, width)
    todo = ir.meta.get("size_args", {})
    split_sizes: dict[tuple[str, int], int] = {}
    for node in gm.graph.nodes:
        for arg, index, kind, what in todo.get(node.name, ()):
            new = (axis_extent(what, width) if kind == "extent" else gsize[what] if kind == "units"
                   else width[what] // gsize[what])
            if index is None:                    # split(x, n): every piece must keep one size
                if split_sizes.setdefault((node.name, arg), new) != new:
                    raise MergeError(f"{ir.name}: node '{node.name}' splits into pieces of one "
                                     f"size, but the merged pieces have different widths; give "
                                     f"the pieces' spaces equal widths (width=...)")
                node.update_arg(arg, new)
                continue
            sizes = list(node.args[arg])
            sizes[index] = new
            node.update_arg(arg, type(node.args[arg])(sizes))


def _sizes(node: fx.Node):
    """Where a reshape's size list sits ('kw:<name>', 'tuple' or 'varargs') and the list."""
    for k in _SIZE_KWARGS:
        if k in node.kwargs:
            v = node.kwargs[k]
            return (f"kw:{k}", list(v)) if isinstance(v, (tuple, list)) else (None, None)
    rest = node.args[1:]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        return "tuple", list(rest[0])
    return "varargs", list(rest)


def _set_sizes(node: fx.Node, where: str, sizes: list) -> None:
    if where.startswith("kw:"):
        node.update_kwarg(where[3:], tuple(sizes))
    elif where == "tuple":
        node.update_arg(1, tuple(sizes))
    else:
        node.args = (node.args[0], *sizes)
