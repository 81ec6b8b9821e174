"""insert: inflate the shallower model of each stage with units that compute nothing new.

At every deep position the alignment leaves free, a copy of one of the stage's units is
spliced into the fx graph right after the stream value it must carry forward:

- residual stage: a **zero block** (every parameter of the copy zeroed, BatchNorm variance
  1): its branch adds exactly 0, so ``x + 0 = x``. Its inner spaces carry no signal; their
  parameters are listed in ``Inflation.zero_params`` so matching treats them as absent.
- plain stage: an **identity layer**: the space-creating op becomes the identity (conv:
  centre-tap identity kernel; linear: I), norms become identities, the activation stays.
  Exact when the activation is idempotent on its input (ReLU after ReLU); otherwise the
  measured deviation is reported.

The template is a unit of the same model's stage; a stage with no unit of its own borrows
the deeper model's unit when the stream shapes agree. The inflated model is checked
against the original on the example batch (``Inflation.deviation``).

Example::

    >>> import torch, hmir
    >>> from hmir.harness import zoo
    >>> batches = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    >>> a, b = zoo.resnet20(), zoo.resnet26()
    >>> plan = hmir.depth_plan(a, b, batches, progress=False)
    >>> inflated = inflate(a, plan, side="a", example=batches[0][:2])
    >>> inflated.deviation <= 1e-5, len(inflated.inserted)
    (True, 3)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from hmir.errors import IncompatibleModelsError, MergeError
from hmir.ir.modes import eval_mode
from hmir.ir.units import Piece, Stage


@dataclass
class Inflation:
    """An inflated graph module, what was inserted, and how far its outputs moved."""

    module: fx.GraphModule
    zero_params: set[str] = field(default_factory=set)
    inserted: list[str] = field(default_factory=list)
    deviation: float = 0.0
    new_nodes: set[str] = field(default_factory=set)        # nodes of ``module`` that were spliced in
    carries: dict[str, str] = field(default_factory=dict)   # an inserted unit's output → its input
    carry_error: float = 0.0    # largest relative difference of a carried output from its input


def _conv_identity(m: nn.Module) -> None:
    k = m.weight.shape[2:]
    ok = (m.groups == 1 and m.in_channels == m.out_channels and all(s == 1 for s in m.stride)
          and all(d == 1 for d in m.dilation) and all(x % 2 == 1 for x in k)
          and (m.padding == "same" or tuple(m.padding) == tuple(x // 2 for x in k)))
    if not ok:
        raise MergeError(f"cannot make {m} an identity layer (needs equal in/out channels, groups 1, "
                         f"stride 1, dilation 1, an odd kernel with 'same' padding)")
    centre = (slice(None), slice(None)) + tuple(x // 2 for x in k)
    m.weight.zero_()
    m.weight[centre] = torch.eye(m.out_channels, dtype=m.weight.dtype)
    if m.bias is not None:
        m.bias.zero_()


def _linear_identity(m: nn.Module) -> None:
    if m.in_features != m.out_features:
        raise MergeError(f"cannot make {m} an identity layer (in_features != out_features)")
    m.weight.copy_(torch.eye(m.out_features, dtype=m.weight.dtype))
    if m.bias is not None:
        m.bias.zero_()


def _bn_identity(m: nn.Module) -> None:
    if m.running_var is None or not m.affine:
        raise MergeError(f"cannot make {m} an identity (needs running statistics and affine params)")
    m.running_mean.zero_()
    m.running_var.fill_(1.0)
    m.weight.fill_((1.0 + m.eps) ** 0.5)
    m.bias.zero_()


IDENTITY_RULES = {
    **{t: _conv_identity for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d)},
    nn.Linear: _linear_identity,
    **{t: _bn_identity for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)},
}


def _make_zero(m: nn.Module) -> None:
    for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
        if t is not None and t.is_floating_point():
            t.fill_(1.0 if name == "running_var" else 0.0)


def _make_identity(m: nn.Module) -> None:
    if not any(True for _ in m.parameters(recurse=False)):
        return
    rule = IDENTITY_RULES.get(type(m))
    if rule is None:
        raise MergeError(f"cannot insert an identity layer built from {type(m).__qualname__}: no "
                         f"identity rule (add one to hmir.passes.insert.IDENTITY_RULES)")
    rule(m)


def _short(targets: list[str]) -> dict[str, str]:
    """Module paths without their common prefix, dots made underscores ('layer1.2.conv1' → 'conv1')."""
    parts = [t.split(".") for t in targets]
    k = 0
    while parts and all(len(p) > k + 1 and p[k] == parts[0][k] for p in parts):
        k += 1
    return {t: "_".join(p[k:]) for t, p in zip(targets, parts)}


def _splice(gm: fx.GraphModule, anchor: fx.Node, src: fx.GraphModule, own: bool, piece: Piece,
            prefix: str, make) -> tuple[fx.Node, list[str]]:
    """Copy ``piece`` of the unmodified ``src`` after ``anchor`` in ``gm``.

    ``own``: ``src`` is the original of ``gm``, so values read from outside the piece (shape
    values of the input, say) are found in ``gm`` by name. Returns the new output, the
    names of the copied parameters and buffers, and the new nodes.
    """
    nodes = {n.name: n for n in src.graph.nodes}
    here = {n.name: n for n in gm.graph.nodes}
    env = {nodes[piece.inp]: anchor}
    users = list(anchor.users)
    modules = [nodes[n].target for n in piece.nodes if nodes[n].op == "call_module"]
    short, params, last = _short(modules), [], anchor

    def arg(a: fx.Node) -> fx.Node:
        if a in env:
            return env[a]
        if own and a.op != "get_attr" and a.name in here:
            return here[a.name]
        raise MergeError(f"cannot copy unit '{piece.out}': it reads '{a.name}' ({a.op}) from outside "
                         f"the unit")

    for name in piece.nodes:
        tn = nodes[name]
        for i, a in enumerate(tn.args):       # aten graphs: parameters are get_attr inputs
            if isinstance(a, fx.Node) and a.op == "get_attr" and a not in env:
                if make is not _make_zero:
                    raise MergeError(f"cannot insert an identity layer into an exported (aten) "
                                     f"graph at '{piece.out}': only zero blocks are supported there")
                env[a] = last = _copy_attr(gm, src, a, prefix, _fill(tn, i), last)
                params.append(last.target)
        with gm.graph.inserting_after(last):
            new = gm.graph.node_copy(tn, arg)
        new.meta["hmir_block"] = prefix
        if tn.op == "call_module":
            mod = copy.deepcopy(src.get_submodule(tn.target))
            with torch.no_grad():
                for m in mod.modules():
                    make(m)
            new.target = f"{prefix}.{short[tn.target]}"
            gm.add_submodule(new.target, mod)
            params += [f"{new.target}.{k}" for k in mod.state_dict()]
        env[tn], last = new, new
    out = env[nodes[piece.out]]
    for u in users:
        u.replace_input_with(anchor, out)
    return out, params, [n for n in env.values() if n is not anchor]


# fill of a zero block's tensors read by an aten op at an argument position (default 0): the
# LayerNorm scale 1 keeps a post-norm stream's scale (x + 0 normalised), BatchNorm variance 1
ATTR_FILL = {"layer_norm": {2: 1.0}, "batch_norm": {4: 1.0}}


def _fill(node: fx.Node, index: int) -> float:
    packet = getattr(node.target, "__name__", "").split(".")[0]
    return ATTR_FILL.get(packet, {}).get(index, 0.0)


def _copy_attr(gm: fx.GraphModule, src: fx.GraphModule, a: fx.Node, prefix: str, fill: float,
               after: fx.Node) -> fx.Node:
    """A filled copy of ``src``'s tensor ``a.target`` under ``prefix``, read by a new get_attr."""
    t = src.get_parameter(a.target) if a.target in dict(src.named_parameters()) else \
        src.get_buffer(a.target)
    try:
        holder = gm.get_submodule(prefix)
    except AttributeError:
        holder = nn.Module()
        gm.add_submodule(prefix, holder)
    leaf = a.target.replace(".", "_")
    value = torch.full_like(t.detach(), fill)
    if isinstance(t, nn.Parameter):
        holder.register_parameter(leaf, nn.Parameter(value, requires_grad=t.requires_grad))
    else:
        holder.register_buffer(leaf, value)
    with gm.graph.inserting_after(after):
        return gm.graph.get_attr(f"{prefix}.{leaf}")


def _template(stage: Stage, other: Stage, j: int, src: int, gm, other_gm) -> tuple[fx.GraphModule, Piece]:
    if len(stage.pieces) > 1:
        return gm, stage.pieces[max(src, 1)]
    piece = other.pieces[j]
    if piece.shape_in != stage.pieces[0].shape_out:
        raise IncompatibleModelsError(
            f"stage {stage.index} has no unit of its own to copy, and the deeper model's unit "
            f"'{piece.out}' works on shape {piece.shape_in}, not {stage.pieces[0].shape_out}")
    return other_gm, piece


def inflate_stages(gm: fx.GraphModule, stages: list[Stage], other_stages: list[Stage],
                   other_gm: fx.GraphModule, alignments: list, side: str,
                   example: torch.Tensor) -> Inflation:
    """Insert units into ``gm``'s stages where ``side`` is the shallower model (``gm`` untouched).

    Where ``side`` is nowhere the shallower model, ``gm`` itself is returned (nothing inserted,
    deviation 0). Otherwise the new module has a copy of ``gm``'s graph and *shares* its
    submodules and parameters (no pass writes to them; only the inserted units are new
    modules).
    """
    todo = [(st, other, al) for st, other, al in zip(stages, other_stages, alignments)
            if al is not None and al.deeper not in ("equal", side)]
    if not todo:
        return Inflation(gm)
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph), type(gm).__name__)
    info = Inflation(new)
    for st, other, al in todo:
        kind = other.kind if st.kind == "none" else st.kind
        make = _make_zero if kind == "residual" else _make_identity
        nodes = {n.name: n for n in new.graph.nodes}
        tails = [nodes[p.out] for p in st.pieces]
        for j in al.inserted():
            i = al.source(j)
            src, piece = _template(st, other, j, i, gm, other_gm)
            anchor = tails[i]
            tails[i], params, spliced = _splice(new, anchor, src, src is gm, piece,
                                                f"hmir_inserted.stage{st.index}_pos{j}", make)
            info.new_nodes.update(n.name for n in spliced)
            info.carries[tails[i].name] = anchor.name
            if kind == "residual":
                info.zero_params.update(params)
        what = "zero block(s)" if kind == "residual" else "identity layer(s)"
        info.inserted.append(f"stage {st.index}: {len(al.inserted())} {what} at positions "
                             f"{list(al.inserted())}")
    new.graph.lint()
    new.recompile()
    info.deviation, info.carry_error = _deviation(gm, new, example, info.carries)
    return info


class _Carried(fx.Interpreter):
    """Runs the inflated module and keeps the values of the named nodes."""

    def __init__(self, gm: fx.GraphModule, names: set[str]):
        super().__init__(gm)
        self.names, self.seen = names, {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.names:
            self.seen[n.name] = out.clone() if isinstance(out, torch.Tensor) else out
        return out


def _deviation(old: fx.GraphModule, new: fx.GraphModule, x: torch.Tensor,
               carries: dict[str, str]) -> tuple[float, float]:
    """Relative max deviation of the outputs, and of each inserted unit's output from the
    value it carries (inf where the shapes differ), on ``x``."""
    run = _Carried(new, set(carries) | set(carries.values()))
    with eval_mode(old), eval_mode(new):
        y0, y1 = _flat(old(x)), _flat(run.run(x))
    carry = 0.0
    for out, inp in carries.items():
        a, b = run.seen[out], run.seen[inp]
        carry = max(carry, float("inf") if a.shape != b.shape else
                    float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)))
    return float((y0 - y1).abs().max() / y0.abs().max().clamp_min(1e-12)), carry


def _flat(y) -> torch.Tensor:
    """All output tensors (a tensor, a tuple or a dict such as a transformers ModelOutput)."""
    if isinstance(y, torch.Tensor):
        return y.flatten()
    items = y.values() if isinstance(y, dict) else y
    return torch.cat([_flat(t) for t in items if t is not None])


def absent_spaces(ir, zero_params: set[str]) -> set[int]:
    """Free spaces written only by zeroed parameters: a zero block's inner features (and the
    views of those: a zero block's attention output, its query heads under GQA)."""
    out = {s.id for s in ir.free_spaces
           if s.producers() and all(sl.param in zero_params for sl in s.producers())}
    return out | {s.id for s in ir.free_spaces if s.view is not None and s.view.base in out}


def inflate(model: nn.Module, plan, side: str, example: torch.Tensor) -> Inflation:
    """Inflate ``model`` (side ``"a"`` or ``"b"`` of ``plan``, a :class:`~hmir.passes.depth.DepthPlan`).

    Returns an :class:`Inflation` whose ``module`` is runnable and computes ``model``'s function
    (``deviation`` measured on ``example``); ``model`` itself is not modified.

    Example::

        >>> import torch, hmir
        >>> from hmir.harness import zoo
        >>> batches = [torch.randn(8, 3, 32, 32) for _ in range(2)]
        >>> resnet20, resnet26 = zoo.resnet20().eval(), zoo.resnet26()
        >>> plan = hmir.depth_plan(resnet20, resnet26, batches, depth="lma", progress=False)
        >>> deep = inflate(resnet20, plan, "a", batches[0]).module.eval()  # as deep as resnet26
        >>> with torch.no_grad():
        ...     bool(torch.allclose(deep(batches[1]), resnet20(batches[1]), atol=1e-5))
        True
    """
    from hmir.frontends.fx import propagate_shapes, trace

    if side not in ("a", "b"):
        raise MergeError(f"side must be 'a' or 'b', got {side!r}")
    k = 0 if side == "a" else 1
    stages = (plan.stages_a, plan.stages_b)
    gm = trace(model, f"model {side}")
    propagate_shapes(gm, model, example)
    names = {n.name for n in gm.graph.nodes}
    if not {n for st in stages[k] for p in st.pieces for n in p.nodes} <= names:
        raise MergeError(f"this depth plan was computed for another model than the {type(model).__name__} "
                         f"given as side {side!r}")
    return inflate_stages(gm, stages[k], stages[1 - k], plan.graphs[1 - k], plan.alignments, side,
                          example)
