"""depth: align the units of two models stage by stage (SMA, LMA or uniform) from linear CKA.

The stages of A and B (:func:`hmir.units.find_stages`) must correspond one to one (same
count, compatible kinds); this is checked right after lowering, before any calibration.
Where a stage has different unit counts, the outputs of every piece of those stages are
compared by streamed, unbiased linear CKA over the calibration batches, and the stage's
alignment places the shallower model's units among the deeper model's positions.

Example::

    >>> plan = depth(ir_a, ir_b, calibration, DepthOptions("lma"), progress=False)
    >>> plan.alignments[0].positions          # where the shallower model's units sit
    (0, 1, 3)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from hmir.alignment import METHODS, Alignment, align
from hmir.cka import StreamingCKA
from hmir.errors import CalibrationError, IncompatibleModelsError, MergeError
from hmir.frontends.fx import eval_mode
from hmir.ir import MergeIR
from hmir.units import Stage, find_stages, stage_table


@dataclass(frozen=True)
class DepthOptions:
    """``method``: ``"lma"``, ``"sma"`` or ``"uniform"`` (see :mod:`hmir.alignment`)."""

    method: str = "lma"
    name: str = "depth"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise MergeError(f"unknown depth alignment {self.method!r}; valid: {list(METHODS)}")


@dataclass
class DepthPlan:
    """Corresponding stages of A and B, the CKA of their units and each stage's alignment.

    ``cka`` is (units of A × units of B) over the stages whose depths differ, with row
    and column labels ``labels_a``/``labels_b`` (node names); empty when no stage differs.
    """

    stages_a: list[Stage]
    stages_b: list[Stage]
    alignments: list[Alignment | None]
    graphs: tuple = ()          # the traced graph modules of A and B the stages refer to
    cka: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    labels_a: list[str] = field(default_factory=list)
    labels_b: list[str] = field(default_factory=list)

    @property
    def heterogeneous(self) -> bool:
        return any(al is not None and al.m != al.n for al in self.alignments)

    def summary(self) -> list[str]:
        out = []
        for sa, al in zip(self.stages_a, self.alignments):
            if al is not None and al.m != al.n:
                out.append(f"depth: stage {sa.index} ({sa.kind}): {al.method} places the shallower "
                           f"model ({'b' if al.deeper == 'a' else 'a'}, {al.n} pieces) at positions "
                           f"{list(al.positions)} of {al.m}; score {al.score:.4f}")
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


class _Capture(fx.Interpreter):
    """Runs a graph module and keeps the outputs of the watched nodes for one batch."""

    def __init__(self, gm: fx.GraphModule, watch: list[str]):
        super().__init__(gm)
        self.watch, self.out = set(watch), {}

    def run_node(self, n: fx.Node):
        val = super().run_node(n)
        if n.name in self.watch:
            self.out[n.name] = val
        return val


def unit_cka(ir_a: MergeIR, ir_b: MergeIR, labels_a: list[str], labels_b: list[str], data, *,
             progress: bool = True) -> torch.Tensor:
    """Streamed linear CKA between the outputs of nodes ``labels_a`` of A and ``labels_b`` of B."""
    gm_a, gm_b = ir_a.graph_module, ir_b.graph_module
    p = next(gm_a.parameters())
    cap_a, cap_b = _Capture(gm_a, labels_a), _Capture(gm_b, labels_b)
    cka = StreamingCKA(len(labels_a), len(labels_b))
    with eval_mode(gm_a), eval_mode(gm_b):
        for i, x in enumerate(tqdm(data, desc="depth: CKA", disable=not progress, leave=False)):
            if x.shape[0] < 4:              # the unbiased HSIC needs 4 examples (a short last batch)
                continue
            x = x.to(device=p.device, dtype=p.dtype if x.is_floating_point() else x.dtype)
            for cap, name in ((cap_a, ir_a.name), (cap_b, ir_b.name)):
                cap.out = {}
                try:
                    cap.run(x)
                except Exception as e:
                    raise CalibrationError(f"calibration batch {i} of shape {tuple(x.shape)} could "
                                           f"not be run by {name}: {e}") from e
            cka.update([cap_a.out[n] for n in labels_a], [cap_b.out[n] for n in labels_b])
    if not cka.batches:
        raise CalibrationError("depth alignment needs calibration batches of at least 4 examples "
                               "(linear CKA uses the unbiased HSIC estimator); every batch was smaller")
    return cka.matrix()


def depth(ir_a: MergeIR, ir_b: MergeIR, data, opts: DepthOptions, *, progress: bool = True,
          stages: tuple[list[Stage], list[Stage]] | None = None) -> DepthPlan:
    """Align every stage; CKA is measured only when some stage's depths differ."""
    st_a, st_b = stages or check_stages(ir_a, ir_b)
    differ = [k for k, (sa, sb) in enumerate(zip(st_a, st_b)) if len(sa.pieces) != len(sb.pieces)]
    plan = DepthPlan(st_a, st_b, [None] * len(st_a), (ir_a.graph_module, ir_b.graph_module))
    if not differ:
        return plan
    plan.labels_a = [n for k in differ for n in st_a[k].outputs]
    plan.labels_b = [n for k in differ for n in st_b[k].outputs]
    plan.cka = unit_cka(ir_a, ir_b, plan.labels_a, plan.labels_b, data, progress=progress)
    ra = rb = 0
    for k in differ:
        ma, mb = len(st_a[k].pieces), len(st_b[k].pieces)
        plan.alignments[k] = align(plan.cka[ra:ra + ma, rb:rb + mb], opts.method)
        ra, rb = ra + ma, rb + mb
    return plan
