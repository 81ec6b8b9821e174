"""depth: align the units of two models stage by stage (SMA, LMA or uniform) from linear CKA.

The stages of A and B (:func:`hmir.ir.units.find_stages`) must correspond one to one (same
count, compatible kinds); this is checked right after lowering, before any calibration.
Where a stage has different unit counts, the outputs of every piece of those stages are
compared by streamed, unbiased linear CKA over the calibration batches, and the stage's
alignment places the shallower model's units among the deeper model's positions.

An alignment keeps both ends (``G[0] = 0``, ``G[n-1] = m-1``), so a stage whose shallower
model has one or two pieces has exactly one alignment, and ``"uniform"`` needs no
similarity at all. With ``DepthOptions(cka="needed")`` (compile_merge's default) CKA is
measured only for the stages that have a choice, and each model runs only as far as the
last unit output measured (a truncated copy of its graph); ``cka="all"`` measures every
stage whose depths differ (for heatmaps; :func:`hmir.api.depth_plan` does this).

Example::

    >>> import torch
    >>> from hmir.harness import zoo
    >>> from hmir.frontends import lower
    >>> from hmir.pipeline.data import Calibration
    >>> calib = Calibration([torch.randn(8, 3, 32, 32) for _ in range(2)])
    >>> x = calib.example()
    >>> ir_a, ir_b = lower(zoo.resnet20(), x, "a"), lower(zoo.resnet26(), x, "b")
    >>> plan = depth(ir_a, ir_b, calib, DepthOptions("lma"), progress=False)
    >>> [(al.n, al.m, al.deeper) for al in plan.alignments if al is not None]
    [(4, 5, 'b'), (3, 4, 'b'), (3, 4, 'b')]
    >>> len(plan.alignments[1].positions)     # where the shallower model's units sit
    3
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from hmir.algorithms.alignment import METHODS, Alignment, align, uniform_positions
from hmir.algorithms.cka import StreamingCKA
from hmir.errors import CalibrationError, IncompatibleModelsError, MergeError
from hmir.ir.modes import eval_mode
from hmir.ir import MergeIR
from hmir.ir.units import Stage, find_stages, stage_table


CKA_MODES = ("needed", "all")
SMALL_BATCHES = ("depth alignment needs calibration batches of at least 4 examples (linear CKA "
                 "uses the unbiased HSIC estimator); every batch was smaller")


@dataclass(frozen=True)
class DepthOptions:
    """``method``: ``"lma"``, ``"sma"`` or ``"uniform"`` (see :mod:`hmir.algorithms.alignment`);
    ``cka``: ``"needed"`` (only stages whose alignment has a choice) or ``"all"``;
    ``fuse_observe``: let compile_merge take the observe statistics from the CKA forward
    (:mod:`hmir.passes.observe_depth`) instead of running the models a second time."""

    method: str = "lma"
    cka: str = "needed"
    fuse_observe: bool = True
    name: str = "align_depth"      # the pass these options are for

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise MergeError(f"unknown depth alignment {self.method!r}; valid: {list(METHODS)}")
        if self.cka not in CKA_MODES:
            raise MergeError(f"unknown cka mode {self.cka!r}; valid: {list(CKA_MODES)}")


@dataclass
class DepthPlan:
    """Corresponding stages of A and B, the CKA of their units and each stage's alignment.

    ``cka`` is (units of A × units of B) over the stages listed in ``measured`` (those whose
    depths differ and, with ``cka="needed"``, whose alignment is not forced), with row and
    column labels ``labels_a``/``labels_b`` (node names); empty when none is measured.
    """

    stages_a: list[Stage]
    stages_b: list[Stage]
    alignments: list[Alignment | None]
    graphs: tuple = ()          # the traced graph modules of A and B the stages refer to
    cka: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    labels_a: list[str] = field(default_factory=list)
    labels_b: list[str] = field(default_factory=list)
    measured: tuple[int, ...] = ()

    @property
    def heterogeneous(self) -> bool:
        return any(al is not None and al.m != al.n for al in self.alignments)

    def summary(self) -> list[str]:
        out = []
        for sa, al in zip(self.stages_a, self.alignments):
            if al is not None and al.m != al.n:
                how = (f"score {al.score:.4f}" if sa.index in self.measured else
                       "the only alignment" if forced(al.m, al.n) else "no CKA measured")
                out.append(f"depth: stage {sa.index} ({sa.kind}): {al.method} places the shallower "
                           f"model ({'b' if al.deeper == 'a' else 'a'}, {al.n} pieces) at positions "
                           f"{list(al.positions)} of {al.m}; {how}")
        return out


def _compatible(sa: Stage, sb: Stage) -> bool:
    kinds_ok = sa.kind == sb.kind or "none" in (sa.kind, sb.kind)
    entry_a, entry_b = sa.pieces[0], sb.pieces[0]
    return kinds_ok and entry_a.kind == entry_b.kind and len(entry_a.shape_out) == len(entry_b.shape_out)


def check_stages(ir_a: MergeIR, ir_b: MergeIR) -> tuple[list[Stage], list[Stage]]:
    """The stages of both models; raises IncompatibleModelsError saying which stages differ."""
    st_a, st_b = find_stages(ir_a), find_stages(ir_b)
    bad = [k for k, (sa, sb) in enumerate(zip(st_a, st_b)) if not _compatible(sa, sb)]
    if len(st_a) != len(st_b) or bad:
        where = (f"they have {len(st_a)} and {len(st_b)} stages" if len(st_a) != len(st_b)
                 else f"stage {bad[0]} differs ({st_a[bad[0]].describe()} vs {st_b[bad[0]].describe()})")
        raise IncompatibleModelsError(
            f"{ir_a.name} and {ir_b.name} cannot be depth-aligned: {where}.\n  {ir_a.name}:\n"
            f"{stage_table(st_a)}\n  {ir_b.name}:\n{stage_table(st_b)}\n  what to do: depth alignment "
            f"inserts units inside stages; both models need the same sequence of stages (the same "
            f"downsampling and width changes, units of the same kind: residual blocks or plain layers)")
    return st_a, st_b


def forced(m: int, n: int) -> bool:
    """Whether placing ``n`` units among ``m`` positions has one alignment only (ends are kept).

    Example::

        >>> forced(6, 2), forced(4, 3), forced(5, 5)
        (True, False, True)
    """
    return min(m, n) <= 2 or m == n


def truncated(gm: fx.GraphModule, watch: list[str]) -> fx.GraphModule:
    """A copy of ``gm``'s graph that returns (clones of) the watched nodes' values and stops
    there: nodes after the last watched one, and any not needed for them, are removed.

    A value that a later in-place op may change (:func:`may_mutate`) is returned as a clone.
    The copy shares ``gm``'s submodules and parameters (nothing is copied).

    Example::

        >>> gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Tanh()))
        >>> truncated(gm, ["_0"])(torch.tensor([-1.0, 2.0]))
        (tensor([0., 2.]),)
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    todo, outs = set(watch), {}
    for node in gm.graph.nodes:
        if not todo:
            break
        if node.op == "output":
            break
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node.name in todo:
            todo.discard(node.name)
            outs[node.name] = (graph.call_method("clone", (env[node],)) if may_mutate(gm, node)
                               else env[node])
    if todo:
        raise MergeError(f"truncated(): nodes {sorted(todo)} are not in the graph")
    graph.output(tuple(outs[n] for n in watch))
    out = fx.GraphModule(gm, graph, f"{type(gm).__name__}_upto_{watch[-1]}")
    out.graph.eliminate_dead_code(lambda n: n.is_impure() or _writes_first(gm, n))  # keep writes
    out.recompile()
    return out


_INPLACE_OPS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                operator.ilshift, operator.irshift, operator.imatmul}
_VIEWS = {"view", "reshape", "flatten", "narrow", "transpose", "permute", "t", "squeeze",
          "unsqueeze", "expand", "expand_as", "view_as", "split", "chunk", "unbind", "movedim",
          "select", "contiguous", "getitem", "detach", "unflatten", "swapaxes", "as_strided"}


def _name(target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", "")


def _writes_first(gm: fx.GraphModule, user: fx.Node) -> bool:
    """Whether ``user`` writes in place to its first argument."""
    name = _name(user.target)
    if user.op == "call_module":
        return bool(getattr(gm.get_submodule(user.target), "inplace", False))
    return user.op in ("call_function", "call_method") and bool(
        user.target in _INPLACE_OPS or user.kwargs.get("inplace")
        or (name.endswith("_") and not name.startswith("_")))


def may_mutate(gm: fx.GraphModule, node: fx.Node, _skip: fx.Node | None = None) -> bool:
    """Whether some op may write in place to ``node``'s value after it is computed: a user
    (or a user of a view of it) that writes to its first argument (an ``inplace=True``
    module, an augmented assignment, a ``*_`` method or function, an ``inplace=True``
    argument), or, when ``node`` itself is such an op, a later writer of the tensor it
    aliases. Conservative: views are followed, anything else that reads is taken as pure.

    Example::

        >>> gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.ReLU(True)))
        >>> [may_mutate(gm, n) for n in gm.graph.nodes][:3]
        [False, True, False]
    """
    for user in node.users:
        if user is _skip:
            continue
        first = bool(user.args) and user.args[0] is node
        if first and _writes_first(gm, user):
            return True
        if user.op != "call_module" and _name(user.target) in _VIEWS and may_mutate(gm, user):
            return True
    src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    return src is not None and _writes_first(gm, node) and may_mutate(gm, src, _skip=node)


def unit_cka(ir_a: MergeIR, ir_b: MergeIR, labels_a: list[str], labels_b: list[str], data, *,
             progress: bool = True) -> torch.Tensor:
    """Streamed linear CKA between the outputs of nodes ``labels_a`` of A and ``labels_b`` of B.

    Each model runs as a truncated copy of its graph (:func:`truncated`) that stops at the
    last watched node.
    """
    gm_a, gm_b = ir_a.graph_module, ir_b.graph_module
    p = next(gm_a.parameters())
    run_a, run_b = truncated(gm_a, labels_a), truncated(gm_b, labels_b)
    cka = StreamingCKA(len(labels_a), len(labels_b))
    with eval_mode(gm_a), eval_mode(gm_b):
        for i, x in enumerate(tqdm(data, desc="depth: CKA", disable=not progress, leave=False)):
            if x.shape[0] < 4:              # the unbiased HSIC needs 4 examples (a short last batch)
                continue
            x = x.to(device=p.device, dtype=p.dtype if x.is_floating_point() else x.dtype)
            outs = []
            for run, name in ((run_a, ir_a.name), (run_b, ir_b.name)):
                try:
                    outs.append(run(x))
                except Exception as e:
                    raise CalibrationError(f"calibration batch {i} of shape {tuple(x.shape)} could "
                                           f"not be run by {name}: {e}") from e
            cka.update(list(outs[0]), list(outs[1]))
    if not cka.batches:
        raise CalibrationError(SMALL_BATCHES)
    return cka.matrix()


def measured_stages(st_a: list[Stage], st_b: list[Stage], opts: DepthOptions) -> list[int]:
    """The stages whose CKA is measured: depths differ and (``cka="needed"``) there is a choice."""
    differ = [k for k, (sa, sb) in enumerate(zip(st_a, st_b)) if len(sa.pieces) != len(sb.pieces)]
    return [k for k in differ if opts.cka == "all" or (
        opts.method != "uniform" and not forced(len(st_a[k].pieces), len(st_b[k].pieces)))]


def plan_from(st_a: list[Stage], st_b: list[Stage], graphs: tuple, opts: DepthOptions,
              measure: list[int], cka: torch.Tensor | None) -> DepthPlan:
    """The plan of every stage from the CKA of the ``measure`` stages; ``cka=None`` gives a
    provisional plan (uniform positions where CKA would decide)."""
    plan = DepthPlan(st_a, st_b, [None] * len(st_a), graphs)
    if cka is not None and measure:
        plan.measured = tuple(measure)
        plan.labels_a = [n for k in measure for n in st_a[k].outputs]
        plan.labels_b = [n for k in measure for n in st_b[k].outputs]
        plan.cka = cka
    ra = rb = 0
    for k, (sa, sb) in enumerate(zip(st_a, st_b)):
        ma, mb = len(sa.pieces), len(sb.pieces)
        if ma == mb:
            continue
        if k in measure and cka is not None:
            plan.alignments[k] = align(cka[ra:ra + ma, rb:rb + mb], opts.method)
            ra, rb = ra + ma, rb + mb
        else:
            plan.alignments[k] = align_unmeasured(ma, mb, "uniform" if k in measure else opts.method)
    return plan


def depth(ir_a: MergeIR, ir_b: MergeIR, data, opts: DepthOptions, *, progress: bool = True,
          stages: tuple[list[Stage], list[Stage]] | None = None) -> DepthPlan:
    """Align every stage; CKA is measured only for the stages that need it (see the module)."""
    st_a, st_b = stages or check_stages(ir_a, ir_b)
    measure = measured_stages(st_a, st_b, opts)
    cka = None
    if measure:
        cka = unit_cka(ir_a, ir_b, [n for k in measure for n in st_a[k].outputs],
                       [n for k in measure for n in st_b[k].outputs], data, progress=progress)
    return plan_from(st_a, st_b, (ir_a.graph_module, ir_b.graph_module), opts, measure, cka)


def align_unmeasured(ma: int, mb: int, method: str) -> Alignment:
    """The alignment of a stage without CKA: forced, or ``"uniform"``; its score is NaN.

    Example::

        >>> align_unmeasured(2, 5, "lma").positions
        (0, 4)
    """
    m, n = max(ma, mb), min(ma, mb)
    if not forced(m, n) and method != "uniform":
        raise MergeError(f"a stage of {ma} and {mb} pieces has several alignments: {method} "
                         f"needs its CKA")
    G = uniform_positions(m, n)        # the only alignment when forced
    return Alignment(method, "a" if ma > mb else "b", G, m=m, n=n, score=float("nan"))
