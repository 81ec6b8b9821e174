"""align_depth: align the stages, inflate the shallower model, and (where it can) take the
observe statistics from the CKA forward.

The pass runs when the ``structure`` pass found models whose stages differ only in depth
(:func:`align_and_inflate` does the work). Without stages that need CKA, the alignment costs no forward at all. With
them, the plain way runs the models twice (CKA, then statistics of the inflated models);
the fused way (:mod:`hmir.passes.observe_depth`, on by default) runs the originals once:

1. inflate with a provisional alignment (uniform where CKA decides) to learn the inflated
   spaces and which original value each of their observation points holds;
2. one forward: CKA of the deciding stages, statistics of every original observation point
   and cross statistics of every pair of points some alignment can put side by side;
3. align, re-inflate if the alignment differs from the provisional one, and assemble each
   pair of inflated spaces' statistics from the collected blocks.

It falls back to the plain way when an inserted unit does not carry its input exactly (an
identity layer before a non-idempotent activation) or the graphs do not line up.

Example::

    >>> import torch
    >>> from hmir.harness import zoo
    >>> from hmir.frontends import lower
    >>> from hmir.pipeline.data import Calibration
    >>> from hmir.pipeline.report import MergeReport
    >>> from hmir.passes.depth import check_stages
    >>> calib = Calibration([torch.randn(8, 3, 32, 32) for _ in range(2)])
    >>> x = calib.example()
    >>> ir_a, ir_b = lower(zoo.resnet20(), x, "a"), lower(zoo.resnet26(), x, "b")
    >>> report = MergeReport(("a", "b"), ("fx", "fx"), "zip")
    >>> d = align_and_inflate(ir_a, ir_b, calib, x, DepthOptions(), report, False,
    ...                       check_stages(ir_a, ir_b))
    >>> len(d.irs[0].spaces) == len(d.irs[1].spaces), d.plan.heterogeneous, len(d.absent[0]) > 0
    (True, True, True)
"""
from __future__ import annotations

from typing import NamedTuple

from hmir.frontends.select import relower
from hmir.pipeline.manager import Out, Pass, register_pass
from hmir.ir.pairing import pair_spaces
from hmir.passes.depth import DepthOptions, measured_stages, plan_from
from hmir.passes.depth import depth as depth_pass
from hmir.passes.insert import absent_spaces, inflate_stages
from hmir.ir.pairing import absent_pair
from hmir.passes.observe_depth import (assemble, candidates, carried_exactly, joint_forward,
                                       original_names, pair_keys)


MAX_EXTRA = 4       # fused only while the cross blocks to collect are <= 4x those one alignment needs


class Aligned(NamedTuple):
    """What :func:`align_and_inflate` found: the inflated IRs, the plan, per model the ids of its
    absent spaces (inserted zero blocks' inner features) and the statistics of the pairs
    already observed (possibly none)."""

    irs: tuple
    plan: object
    absent: tuple[frozenset, frozenset]
    stats: dict


def _inflate(ir_a, ir_b, stages, plan, x, report, final: bool):
    """Both models inflated for ``plan``: (IRs, Inflations or None where nothing was inserted,
    absent space ids per model)."""
    irs, infls, absent = [], [], []
    for side, ir, other, st, ost in (("a", ir_a, ir_b, *stages), ("b", ir_b, ir_a, *stages[::-1])):
        with report.timed("insert"):
            infl = inflate_stages(ir.graph_module, st, ost, other.graph_module, plan.alignments, side, x)
        if not infl.inserted:
            irs.append(ir)                         # nowhere the shallower model: unchanged
            infls.append(None)
            absent.append(frozenset())
            continue
        if final:
            report.notes += [f"insert ({ir.name}): {s}" for s in infl.inserted]
            report.notes.append(f"insert ({ir.name}): inflated model deviates from the original "
                                f"by {infl.deviation:.2e} (relative max)")
        with report.timed("trace"):
            new = relower(ir, infl.module, x)
        irs.append(new)
        infls.append(infl)
        absent.append(frozenset(absent_spaces(new, infl.zero_params)))
    return irs, infls, tuple(absent)


def _names(irs, infls):
    """Original-value maps of both inflated IRs, or None when the fused path cannot be used."""
    if not all(carried_exactly(inf) for inf in infls):
        return None
    names = [original_names(ir, inf) for ir, inf in zip(irs, infls)]
    return None if None in names else names


def align_and_inflate(ir_a, ir_b, calib, x, opts: DepthOptions, report, progress: bool,
                      stages) -> Aligned:
    """Depth-align and inflate both models (``stages``: both models' stages, which differ in
    depth; :func:`hmir.passes.depth.check_stages`)."""
    measure = measured_stages(*stages, opts)
    if measure and opts.fuse_observe:
        fused = _fused(ir_a, ir_b, calib, x, opts, report, progress, stages, measure)
        if fused is not None:
            return fused
        report.notes.append("observe: not taken from the depth pass's forward (an inserted unit "
                            "does not carry its input exactly, or too many alignments are "
                            "possible): the models run twice")
    with report.timed("depth"):
        plan = depth_pass(ir_a, ir_b, calib, opts, progress=progress, stages=stages)
    report.notes += plan.summary()
    irs, _, absent = _inflate(ir_a, ir_b, stages, plan, x, report, final=True)
    return Aligned(tuple(irs), plan, absent, {})


def _fused(ir_a, ir_b, calib, x, opts, report, progress, stages, measure):
    graphs = (ir_a.graph_module, ir_b.graph_module)
    provisional = plan_from(*stages, graphs, opts, measure, None)
    irs, infls, absent = _inflate(ir_a, ir_b, stages, provisional, x, report, final=False)
    names = _names(irs, infls)
    if names is None:
        return None
    with report.timed("depth"):
        pairs = pair_spaces(*irs)
        needed = set()
        for p in pairs:
            if p.points and absent_pair(p, absent) is None:
                needed.update(pair_keys(p, *irs, names) or ())
        cross = candidates(ir_a, ir_b, *stages, measure) | needed
        if len(cross) > MAX_EXTRA * len(needed):
            return None     # too many alignments to prepare for: observe the inflated models
        keys = (sorted({a for a, _ in cross}), sorted({b for _, b in cross}))
        labels = ([n for k in measure for n in stages[0][k].outputs],
                  [n for k in measure for n in stages[1][k].outputs])
    with report.timed("observe"):
        cka, st_a, st_b, crosses = joint_forward((ir_a, ir_b), keys, cross, labels, calib,
                                                 progress=progress)
    with report.timed("depth"):
        plan = plan_from(*stages, graphs, opts, measure, cka)
    report.notes += plan.summary()
    if [al and al.positions for al in plan.alignments] != \
            [al and al.positions for al in provisional.alignments]:
        irs, infls, absent = _inflate(ir_a, ir_b, stages, plan, x, report, final=True)
        names = _names(irs, infls)
    else:
        _note_insertions(irs, infls, report)
    stats = {}
    for p in (pair_spaces(*irs) if names is not None else ()):
        keys_p = pair_keys(p, *irs, names) if p.points and absent_pair(p, absent) is None else None
        st = keys_p and assemble(keys_p, (irs[0].space(p.a).n, irs[1].space(p.b).n),
                                 (st_a, st_b), crosses)
        if st:
            stats[p] = st
    report.notes.append(f"observe: statistics of {len(stats)} pairs of spaces taken from the "
                        f"depth pass's forward (the models ran once for both)")
    return Aligned(tuple(irs), plan, absent, stats)


def _note_insertions(irs, infls, report) -> None:
    for ir, infl in zip(irs, infls):
        if infl is not None:
            report.notes += [f"insert ({ir.name}): {s}" for s in infl.inserted]
            report.notes.append(f"insert ({ir.name}): inflated model deviates from the original "
                                f"by {infl.deviation:.2e} (relative max)")


class AlignDepth(Pass):
    """Depth-align models whose stages differ in depth and inflate the shallower one; runs only
    when the ``structure`` pass found ``"depth"``. Options: :class:`~hmir.passes.depth.DepthOptions`."""

    name = "align_depth"
    requires = ("irs", "structure", "stages", "calib", "example")
    provides = ("irs", "plan", "absent", "stats")
    options = DepthOptions

    def skip(self, state):
        return None if state.structure == "depth" else "the models have the same depth"

    def run(self, state, options: DepthOptions) -> Out:
        done = align_and_inflate(*state.irs, state.calib, state.example, options, state.report,
                                 state.progress, state.stages)
        state.report.depth = done.plan
        return Out({"irs": done.irs, "plan": done.plan, "absent": done.absent,
                    "stats": {**state.stats, **done.stats}})


register_pass(AlignDepth())
