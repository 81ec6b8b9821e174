"""Depth-heterogeneous merging: align the stages, inflate the shallower model, and (where it
can) take the observe statistics from the CKA forward.

:func:`align_and_inflate` is what compile_merge runs when the two models' structures differ
only in depth. Without stages that need CKA, the alignment costs no forward at all. With
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

    >>> ir_a, ir_b, plan, stats = align_and_inflate(ir_a, ir_b, calib, x, DepthOptions(),
    ...                                             report, progress=False)   # doctest: +SKIP
"""
from __future__ import annotations

from hmir.frontends.select import relower
from hmir.ir.pairing import pair_spaces
from hmir.passes.depth import DepthOptions, check_stages, measured_stages, plan_from
from hmir.passes.depth import depth as depth_pass
from hmir.passes.insert import absent_spaces, inflate_stages
from hmir.passes.match import absent_pair
from hmir.passes.observe_depth import (assemble, candidates, carried_exactly, joint_forward,
                                       original_names, pair_keys)


MAX_EXTRA = 4       # fused only while the cross blocks to collect are <= 4x those one alignment needs


def _inflate(ir_a, ir_b, stages, plan, x, report, final: bool):
    """Both models inflated for ``plan``: (IRs, Inflations or None where nothing was inserted)."""
    irs, infls = [], []
    for side, ir, other, st, ost in (("a", ir_a, ir_b, *stages), ("b", ir_b, ir_a, *stages[::-1])):
        with report.timed("insert"):
            infl = inflate_stages(ir.graph_module, st, ost, other.graph_module, plan.alignments, side, x)
        if not infl.inserted:
            irs.append(ir)                         # nowhere the shallower model: unchanged
            infls.append(None)
            continue
        if final:
            report.notes += [f"insert ({ir.name}): {s}" for s in infl.inserted]
            report.notes.append(f"insert ({ir.name}): inflated model deviates from the original "
                                f"by {infl.deviation:.2e} (relative max)")
        with report.timed("trace"):
            new = relower(ir, infl.module, x)
        new.meta["absent"] = absent_spaces(new, infl.zero_params)
        irs.append(new)
        infls.append(infl)
    return irs, infls


def _names(irs, infls):
    """Original-value maps of both inflated IRs, or None when the fused path cannot be used."""
    if not all(carried_exactly(inf) for inf in infls):
        return None
    names = [original_names(ir, inf) for ir, inf in zip(irs, infls)]
    return None if None in names else names


def align_and_inflate(ir_a, ir_b, calib, x, opts: DepthOptions, report, progress: bool, err):
    """Depth-align and inflate both models: ``(ir_a, ir_b, plan, stats)``, where ``stats`` maps
    the pairs of spaces whose statistics were collected already (possibly none)."""
    stages = check_stages(ir_a, ir_b)
    if all(len(sa.pieces) == len(sb.pieces) for sa, sb in zip(*stages)):
        raise err                                  # same depth: the structures really differ
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
    irs, _ = _inflate(ir_a, ir_b, stages, plan, x, report, final=True)
    return irs[0], irs[1], plan, {}


def _fused(ir_a, ir_b, calib, x, opts, report, progress, stages, measure):
    graphs = (ir_a.graph_module, ir_b.graph_module)
    provisional = plan_from(*stages, graphs, opts, measure, None)
    irs, infls = _inflate(ir_a, ir_b, stages, provisional, x, report, final=False)
    names = _names(irs, infls)
    if names is None:
        return None
    with report.timed("depth"):
        pairs = pair_spaces(*irs)
        needed = set()
        for p in pairs:
            if p.points and absent_pair(*irs, p) is None:
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
        irs, infls = _inflate(ir_a, ir_b, stages, plan, x, report, final=True)
        names = _names(irs, infls)
    else:
        _note_insertions(irs, infls, report)
    stats = {}
    for p in (pair_spaces(*irs) if names is not None else ()):
        keys_p = pair_keys(p, *irs, names) if p.points and absent_pair(*irs, p) is None else None
        st = keys_p and assemble(keys_p, (irs[0].space(p.a).n, irs[1].space(p.b).n),
                                 (st_a, st_b), crosses)
        if st:
            stats[p] = st
    report.notes.append(f"observe: statistics of {len(stats)} pairs of spaces taken from the "
                        f"depth pass's forward (the models ran once for both)")
    return irs[0], irs[1], plan, stats


def _note_insertions(irs, infls, report) -> None:
    for ir, infl in zip(irs, infls):
        if infl is not None:
            report.notes += [f"insert ({ir.name}): {s}" for s in infl.inserted]
            report.notes.append(f"insert ({ir.name}): inflated model deviates from the original "
                                f"by {infl.deviation:.2e} (relative max)")
