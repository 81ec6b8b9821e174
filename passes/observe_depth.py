"""observe_depth: the depth pass's CKA and the observe pass's statistics from one forward.

Where a stage's alignment has a choice, compile_merge needs CKA before it can inflate the
models and the inflated models' statistics after: two forwards over the calibration data.
This pass runs the *original* models once and collects both:

- the CKA of the unit outputs of the stages with a choice (as :func:`~hmir.passes.depth.unit_cka`);
- for every observation point of either original model (a *key*: node, dim, offset, width)
  the shifted sum and Gram of its features, and for every pair of keys of A and B that some
  alignment puts side by side, their cross Gram.

Every observation point of an inflated model holds an original point's value: original nodes
keep theirs, and an inserted unit's output carries its input (exactly for zero blocks; the
pass checks it on the example batch and declines otherwise). After the alignment, the
statistics of each pair of inflated spaces are sums of collected blocks
(:func:`assemble`); a pair whose blocks were not all collected is left to the observe pass.

Example::

    >>> keys = KeyStats()                      # filled by joint_forward(...)
    >>> keys.count
    {}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product

import torch
from tqdm.auto import tqdm

from hmir.algorithms.cka import StreamingCKA
from hmir.errors import CalibrationError
from hmir.ir.modes import eval_mode
from hmir.ir import MergeIR
from hmir.passes.depth import SMALL_BATCHES, truncated
from hmir.passes.observe import SpaceStats, features_at, upper_gram
from hmir.ir.units import Stage

Key = tuple  # (node, dim, offset, width) of an original model's observation point


@dataclass
class KeyStats:
    """Per key of one model: its shift (the first batch's mean), the shifted feature sum and
    Gram (entries i <= j valid), and the row count."""

    total: dict = field(default_factory=dict)
    outer: dict = field(default_factory=dict)
    count: dict = field(default_factory=dict)
    shift: dict = field(default_factory=dict)


def original_names(ir: MergeIR, infl) -> dict[str, str] | None:
    """Node of ``ir`` (lowered from ``infl.module``) → the original node whose value it holds.

    Inserted units' inner nodes have no original (left out); their outputs map to what they
    carry. None when the two graphs do not line up node by node. ``infl=None``: identity.
    """
    lowered = list(ir.graph_module.graph.nodes)
    if infl is None:
        return {n.name: n.name for n in lowered}
    built = list(infl.module.graph.nodes)
    if len(built) != len(lowered):
        return None
    out = {}
    for a, b in zip(lowered, built):
        if a.op != b.op or (a.op.startswith("call") and a.target != b.target):
            return None
        name = b.name
        while name in infl.carries:
            name = infl.carries[name]
        if name not in infl.new_nodes:
            out[a.name] = name
    return out


def carried_exactly(infl, rtol: float = 1e-6) -> bool:
    """Whether every inserted unit's output equalled the value it carries on the example
    batch (measured by the insert pass: ``Inflation.carry_error``)."""
    return infl is None or infl.carry_error <= rtol


def _piece_keys(ir: MergeIR, nodes: tuple[str, ...]) -> list[Key]:
    """Keys of the observation points at ``nodes``, in graph order."""
    pos = {n: k for k, n in enumerate(nodes)}
    keys = [(pt.node, pt.dim, pt.offset, s.n) for s in ir.free_spaces for pt in s.points
            if pt.node in pos]
    return sorted(keys, key=lambda k: (pos[k[0]], k[1], k[2], k[3]))


def candidates(ir_a: MergeIR, ir_b: MergeIR, st_a: list[Stage], st_b: list[Stage],
               free: list[int]) -> set[tuple[Key, Key]]:
    """(A key, B key) pairs that some alignment of the ``free`` stages puts side by side.

    Shallow piece i sits (or is carried) only at deep positions i .. m−n+i; its t-th point
    meets the t-th point of the deep piece there (every pair when the pieces differ).
    """
    out = set()
    for k in free:
        pa, pb = st_a[k].pieces, st_b[k].pieces
        a_deep = len(pa) > len(pb)
        deep, shallow, ir_d, ir_s = (pa, pb, ir_a, ir_b) if a_deep else (pb, pa, ir_b, ir_a)
        m, n = len(deep), len(shallow)
        for i in range(n):
            ks = _piece_keys(ir_s, shallow[i].nodes)
            for j in range(i, m - n + i + 1):
                kd = _piece_keys(ir_d, deep[j].nodes)
                for s, d in (zip(ks, kd) if len(ks) == len(kd) else product(ks, kd)):
                    out.add((d, s) if a_deep else (s, d))
    return out


def pair_keys(pair, ir_a: MergeIR, ir_b: MergeIR, names: tuple[dict, dict]) -> list | None:
    """The (A key, B key) of each point pair of ``pair`` (inflated IRs), or None."""
    na, nb = ir_a.space(pair.a).n, ir_b.space(pair.b).n
    out = []
    for pa, pb in pair.points:
        a, b = names[0].get(pa.node), names[1].get(pb.node)
        if a is None or b is None:
            return None
        out.append(((a, pa.dim, pa.offset, na), (b, pb.dim, pb.offset, nb)))
    return out


def _accumulate(ks: KeyStats, key: Key, c: torch.Tensor) -> None:
    w = c.shape[1]
    if key not in ks.total:
        ks.total[key] = torch.zeros(w, dtype=torch.float64, device=c.device)
        ks.outer[key] = torch.zeros(w, w, dtype=torch.float64, device=c.device)
        ks.count[key] = 0
    ks.outer[key] += upper_gram(c)
    ks.total[key] += c.sum(0, dtype=torch.float64)
    ks.count[key] += c.shape[0]


def joint_forward(irs: tuple[MergeIR, MergeIR], keys: tuple[list, list], cross: set, labels, data,
                  *, progress: bool = True):
    """One pass over ``data``: CKA of ``labels`` (unit outputs, or None) and the key statistics.

    Returns ``(cka matrix or None, KeyStats of A, KeyStats of B, {(ka, kb): cross Gram})``.
    """
    stats, runs = (KeyStats(), KeyStats()), []
    for ir, ks, lab in zip(irs, keys, labels or ([], [])):
        want = {k[0] for k in ks} | set(lab)
        order = [n.name for n in ir.graph_module.graph.nodes if n.name in want]
        runs.append((truncated(ir.graph_module, order), order))
    cka = StreamingCKA(len(labels[0]), len(labels[1])) if labels else None
    crosses = {c: None for c in cross}
    p = next(irs[0].graph_module.parameters())
    with eval_mode(irs[0].graph_module), eval_mode(irs[1].graph_module):
        for i, x in enumerate(tqdm(data, desc="observe + depth", disable=not progress, leave=False)):
            x = x.to(device=p.device, dtype=p.dtype if x.is_floating_point() else x.dtype)
            vals, feats = [], []
            for (run, order), ir in zip(runs, irs):
                try:
                    vals.append(dict(zip(order, run(x))))
                except Exception as e:
                    raise CalibrationError(f"calibration batch {i} of shape {tuple(x.shape)} could "
                                           f"not be run by {ir.name}: {e}") from e
            if cka is not None and x.shape[0] >= 4:
                cka.update([vals[0][n] for n in labels[0]], [vals[1][n] for n in labels[1]])
            for side in (0, 1):
                ks, fs = stats[side], {}
                for key in keys[side]:
                    f = features_at(vals[side][key[0]], *key[1:]).float()
                    if key not in ks.shift:
                        ks.shift[key] = f.mean(0)
                    fs[key] = f - ks.shift[key]
                    _accumulate(ks, key, fs[key])
                feats.append(fs)
            for (ka, kb), acc in crosses.items():
                prod = feats[0][ka].T @ feats[1][kb]
                crosses[(ka, kb)] = prod.double() if acc is None else acc.add_(prod)
    if cka is not None and not cka.batches:
        raise CalibrationError(SMALL_BATCHES)
    return (cka.matrix() if cka is not None else None), stats[0], stats[1], crosses


def assemble(keys: list, widths: tuple[int, int], stats: tuple[KeyStats, KeyStats],
             crosses: dict) -> SpaceStats | None:
    """The :class:`SpaceStats` of a pair of inflated spaces from its points' keys, or None.

    Each key's blocks are shifted by its own mean; they are moved to the pair's shift (the
    first key's of each side) exactly: with d = s_key − s, Σ(f−s) = T + N·d and
    Σ(f−s)(f−s)ᵀ = G + T·dᵀ + d·Tᵀ + N·d·dᵀ (and alike for the cross block).
    """
    A, B = stats
    if (any(ka not in A.total or kb not in B.total for ka, kb in keys)
            or any(crosses.get(c) is None for c in keys)):
        return None
    na, nb = widths
    dev = A.total[keys[0][0]].device
    st = SpaceStats.empty(na + nb, dev)
    st.shift = torch.cat([A.shift[keys[0][0]], B.shift[keys[0][1]]])
    s_a, s_b = st.shift[:na].double(), st.shift[na:].double()
    for ka, kb in keys:
        n, ta, tb = A.count[ka], A.total[ka], B.total[kb]
        da, db = A.shift[ka].double() - s_a, B.shift[kb].double() - s_b
        st.total[:na] += ta + n * da
        st.total[na:] += tb + n * db
        st.outer[:na, :na] += A.outer[ka] + _sym(ta, da, n)
        st.outer[na:, na:] += B.outer[kb] + _sym(tb, db, n)
        st.outer[:na, na:] += (crosses[(ka, kb)] + torch.outer(ta, db) + torch.outer(da, tb)
                               + n * torch.outer(da, db))
        st.count += n
    return st


def _sym(t: torch.Tensor, d: torch.Tensor, n: int) -> torch.Tensor:
    """T·dᵀ + d·Tᵀ + N·d·dᵀ: moving a shifted Gram by d."""
    return torch.outer(t, d) + torch.outer(d, t) + n * torch.outer(d, d)


__all__ = ["KeyStats", "assemble", "candidates", "carried_exactly", "joint_forward",
           "original_names", "pair_keys"]
