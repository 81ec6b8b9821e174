"""observe: stream per-space statistics of A and B stacked, over calibration batches.

For each pair of corresponding spaces, the features of A (nA) and B (nB) at paired
observation points are stacked to ``nA + nB`` columns; the pass keeps only their sum,
sum of outer products and count: memory is O((nA+nB)²) per space, never O(samples).

Example::

    >>> import torch
    >>> from hmir.harness import zoo
    >>> from hmir.frontends import lower
    >>> from hmir.ir.pairing import pair_spaces
    >>> x = torch.randn(8, 3, 32, 32)
    >>> ir_a, ir_b = lower(zoo.resnet20(), x, "a"), lower(zoo.resnet20(width=2), x, "b")
    >>> pairs = [p for p in pair_spaces(ir_a, ir_b) if p.points]
    >>> stats = observe(ir_a, ir_b, pairs, [x, x], progress=False)
    >>> stats[0].corr().shape, stats[0].count   # (nA+nB)²; rows: 2 batches x 8 x 32² pixels x 4 points
    (torch.Size([48, 48]), 65536)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from hmir.errors import CalibrationError
from hmir.ir.modes import eval_mode
from hmir.ir import MergeIR, ObsPoint
from hmir.ir.pairing import SpacePair  # noqa: F401  (re-exported: it lived here)
from hmir.ir.pairing import absent_pair
from hmir.algorithms.matching import correlation_rows
from hmir.ir.zeros import ZeroSkipping
from hmir.pipeline.manager import Out, Pass, register_pass


@dataclass
class SpaceStats:
    """Streaming moments of stacked features: sum, sum of outer products, count.

    Features are shifted by ``shift`` (the first batch's mean, so the shifted values are
    nearly centred) and their products are formed in float32, one batch at a time, then
    accumulated in float64: ``total`` = Σ (f − shift), ``outer`` = Σ (f − shift)(f − shift)ᵀ.
    The shift keeps the float32 products free of the cancellation that raw second moments
    suffer (E[x²] − E[x]² for features with large means); correlations agree with a float64
    computation to about 1e-6. Only the entries of ``outer`` on and above the diagonal are
    kept up to date (:func:`_gram_blocks`); :meth:`cov` mirrors them. Example::

        >>> st = SpaceStats.empty(3, "cpu")
        >>> st.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0], [1.0]]))
        >>> st.count, st.cov()[0].tolist()
        (2, [1.0, 1.0, 0.5])
    """

    total: torch.Tensor
    outer: torch.Tensor
    count: int = 0
    shift: torch.Tensor | None = None

    @classmethod
    def empty(cls, n: int, device) -> "SpaceStats":
        z = torch.zeros(n, dtype=torch.float64, device=device)
        return cls(z, torch.zeros(n, n, dtype=torch.float64, device=device))

    def update(self, fa: torch.Tensor, fb: torch.Tensor | None = None) -> None:
        """Add the rows of ``fa`` (m × nA) and ``fb`` (m × nB), side by side (or of ``fa`` alone)."""
        self.update_points([(fa, fa[:, :0] if fb is None else fb)])

    def update_points(self, feats: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Add the rows of every observation point's ``(fa, fb)``, as :meth:`update` on each would.

        Consecutive points whose features are equal (an inserted unit carries its
        predecessor's value forward) are counted once with their multiplicity: their own
        Gram block is scaled, and the cross block is one product with the other side's
        features summed over the run. The result is the same up to float rounding.

        Example::

            >>> st, ref = SpaceStats.empty(3, "cpu"), SpaceStats.empty(3, "cpu")
            >>> fa, fb = torch.randn(5, 2), [torch.randn(5, 1) for _ in range(3)]
            >>> st.update_points([(fa, b) for b in fb]); [ref.update(fa, b) for b in fb] and None
            >>> bool(torch.allclose(st.cov(), ref.cov(), atol=1e-5)), st.count
            (True, 15)
        """
        if not feats:
            return
        na, n = feats[0][0].shape[1], self.total.shape[0]
        if self.shift is None:
            self.shift = torch.cat([feats[0][0].float().mean(0), feats[0][1].float().mean(0)])
        runs_a, runs_b = _runs([fa for fa, _ in feats]), _runs([fb for _, fb in feats])
        ca = [(k, f.float() - self.shift[:na]) for k, f in runs_a]
        cb = [(k, f.float() - self.shift[na:]) for k, f in runs_b]
        prod = torch.zeros(n, n, dtype=torch.float32, device=self.outer.device)
        for (k, f), off in [(x, 0) for x in ca] + [(x, na) for x in cb]:
            w = f.shape[1]
            self.total[off:off + w] += f.sum(0, dtype=torch.float64) * k
            prod[off:off + w, off:off + w] += upper_gram(f, k)
        cross = prod[:na, na:]
        if len(runs_a) <= len(runs_b):          # group the cross block by the side with fewer runs
            for (_, fa), side in zip(ca, _run_sums(runs_a, [f for _, f in cb], [k for k, _ in runs_b])):
                cross.addmm_(fa.T, side)
        else:
            for (_, fb), side in zip(cb, _run_sums(runs_b, [f for _, f in ca], [k for k, _ in runs_a])):
                cross.addmm_(side.T, fb)
        self.outer += prod
        self.count += sum(fa.shape[0] for fa, _ in feats)

    def sum_outer(self) -> torch.Tensor:
        """The full (symmetric) sum of outer products."""
        return torch.triu(self.outer) + torch.triu(self.outer, 1).T

    def _shifted_mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    def mean(self) -> torch.Tensor:
        m = self._shifted_mean()
        return m if self.shift is None else m + self.shift

    def cov(self) -> torch.Tensor:
        m = self._shifted_mean()
        return self.sum_outer() / max(self.count, 1) - torch.outer(m, m)

    def corr(self, eps: float = 1e-8, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Correlation of the stacked features (float64, or ``dtype``).

        A constant (dead) feature has no correlation; it is given similarity 1 with other
        constant features (each predicts the other exactly) and 0 with live ones, so that
        dead twins still pair up (ties are broken by the match pass). Built one block of rows
        at a time (no n × n temporaries; the same values as from :meth:`cov`).
        """
        cnt, m = max(self.count, 1), self._shifted_mean()
        var = self.outer.diagonal() / cnt - m * m            # = cov().diagonal()
        live, dead = var > eps, var <= eps
        std = torch.where(live, var, torch.ones_like(var)).sqrt()
        n = m.shape[0]
        out = torch.empty(n, n, dtype=dtype or torch.float64, device=m.device)
        edges = _edges(n)
        for a in range(len(edges) - 1):
            lo, hi = edges[a], edges[a + 1]
            cov = self._outer_rows(edges, a) / cnt - torch.outer(m[lo:hi], m)
            r = correlation_rows(cov, lo, std, live)
            out[lo:hi] = torch.where(dead[lo:hi, None] & dead[None, :], torch.ones_like(r), r)
        return out

    def _outer_rows(self, edges: list[int], a: int) -> torch.Tensor:
        """Rows of block ``a`` of :meth:`sum_outer`, from the blocks stored on and above the diagonal."""
        ra = slice(edges[a], edges[a + 1])
        parts = []
        for b in range(len(edges) - 1):
            rb = slice(edges[b], edges[b + 1])
            if b < a:
                parts.append(self.outer[rb, ra].T)
            elif b == a:
                d = self.outer[ra, ra]
                parts.append(torch.triu(d) + torch.triu(d, 1).T)
            else:
                parts.append(self.outer[ra, rb])
        return torch.cat(parts, 1)


def upper_gram(f: torch.Tensor, alpha: float = 1) -> torch.Tensor:
    """``alpha · fᵀ f`` valid on and above the diagonal (:func:`_gram_blocks`: no n × n
    product where the matrix is wide), in ``f``'s dtype.

    Example::

        >>> f = torch.randn(6, 3)
        >>> bool(torch.allclose(torch.triu(upper_gram(f)), torch.triu(f.T @ f)))
        True
    """
    blocks = _gram_blocks(f.shape[1])
    if len(blocks) == 1:
        return torch.mm(f.T, f) if alpha == 1 else torch.mm(f.T, f).mul_(alpha)
    out = torch.zeros(f.shape[1], f.shape[1], dtype=f.dtype, device=f.device)
    for ra, rb in blocks:
        out[ra, rb].addmm_(f[:, ra].T, f[:, rb], alpha=alpha)
    return out


def features_at(v: torch.Tensor, dim: int, offset: int, width: int) -> torch.Tensor:
    """The ``width`` features from ``offset`` of axis ``dim`` of ``v``, one row per position
    (a view where the layout allows, else a copy)."""
    return v.narrow(dim, offset, width).movedim(dim, -1).reshape(-1, width)


def _runs(feats: list[torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
    """``(multiplicity, features)`` of each run of consecutive equal feature matrices."""
    runs: list[list] = []
    for f in feats:
        if runs and (runs[-1][1] is f or torch.equal(runs[-1][1], f)):
            runs[-1][0] += 1
        else:
            runs.append([1, f])
    return [(k, f) for k, f in runs]


def _run_sums(runs: list[tuple[int, torch.Tensor]], other: list[torch.Tensor],
              other_k: list[int]) -> list[torch.Tensor]:
    """For each run of one side, the other side's (shifted float32) features summed over the
    run's points; ``other`` holds the other side's runs, ``other_k`` their multiplicities."""
    per_point = [f for f, k in zip(other, other_k) for _ in range(k)]
    out, i = [], 0
    for k, _ in runs:
        acc = per_point[i]
        for f in per_point[i + 1:i + k]:
            acc = acc + f
        out.append(acc)
        i += k
    return out


def _edges(n: int, rows: int = 256) -> list[int]:
    """Block boundaries of an n-wide Gram: up to 8 blocks of >= ``rows`` (one when narrower)."""
    nb = max(1, min(8, n // rows))
    return [k * n // nb for k in range(nb + 1)]


def _gram_blocks(n: int, rows: int = 256) -> list[tuple[slice, slice]]:
    """Pairs of column blocks ``(a, b)``, ``a <= b``, covering the upper triangle of an n × n
    Gram (up to 8 × 8 blocks of >= ``rows``): ~half the flops of the full product and no n × n
    temporary. Each block's product equals the full product's entries bit for bit (same dot
    products; checked with the BLAS here), so the statistics are unchanged."""
    edges = _edges(n, rows)
    nb = len(edges) - 1
    return [(slice(edges[a], edges[a + 1]), slice(edges[b], edges[b + 1]))
            for a in range(nb) for b in range(a, nb)]


class _Recorder(ZeroSkipping):
    """Runs a graph module and keeps the features of watched nodes for one batch.

    Values that are zero by construction (an inserted zero block's layers) are not computed
    (:class:`~hmir.ir.zeros.ZeroSkipping`); where watched, their features are zeros as before.
    """

    def __init__(self, gm: fx.GraphModule, watch: dict[str, list[tuple[ObsPoint, int]]]):
        super().__init__(gm)
        self.watch, self.features = watch, {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        for pt, width in self.watch.get(n.name, ()):
            v = self.value(out)
            g = features_at(v, pt.dim, pt.offset, width)
            shared = v is out and g.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
            self.features[pt] = g.clone() if shared else g  # later in-place ops must not alter it
        return out


def _watch(ir: MergeIR, pts) -> dict[str, list[tuple[ObsPoint, int]]]:
    watch: dict[str, list] = {}
    for pt, sid in pts:
        watch.setdefault(pt.node, []).append((pt, ir.space(sid).n))
    return watch


def observe(ir_a: MergeIR, ir_b: MergeIR, pairs: list[SpacePair], data, *,
            device=None, progress: bool = True) -> list[SpaceStats]:
    """Stream statistics of every pair of spaces over ``data`` (an iterable of input batches)."""
    gm_a, gm_b = ir_a.graph_module, ir_b.graph_module
    device = device or next(gm_a.parameters()).device
    dtype = next(gm_a.parameters()).dtype
    rec_a = _Recorder(gm_a, _watch(ir_a, [(pa, p.a) for p in pairs for pa, _ in p.points]))
    rec_b = _Recorder(gm_b, _watch(ir_b, [(pb, p.b) for p in pairs for _, pb in p.points]))
    stats = [SpaceStats.empty(ir_a.space(p.a).n + ir_b.space(p.b).n, device) for p in pairs]
    with eval_mode(gm_a), eval_mode(gm_b):
        for i, x in enumerate(tqdm(data, desc="observe", disable=not progress, leave=False)):
            x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
            for rec, name in ((rec_a, ir_a.name), (rec_b, ir_b.name)):
                rec.features = {}
                try:
                    rec.run(x)
                except Exception as e:
                    raise CalibrationError(f"calibration batch {i} of shape {tuple(x.shape)} could "
                                           f"not be run by {name}: {e}") from e
            for p, st in zip(pairs, stats):
                st.update_points([(rec_a.features[pa], rec_b.features[pb]) for pa, pb in p.points])
    return stats


class Observe(Pass):
    """Stream the statistics of every pair that has observation points, is not absent, and was
    not observed already (``align_depth`` may have collected some in its forward)."""

    name = "observe"
    requires = ("irs", "pairs", "absent", "stats", "calib")
    provides = ("stats",)

    def skip(self, state):
        return None if state.method.needs_activations else \
            f"method {state.method.name!r} does not match on activations"

    def run(self, state, options) -> Out:
        todo = [p for p in state.pairs
                if p.points and absent_pair(p, state.absent) is None and p not in state.stats]
        stats = dict(state.stats)
        if todo:
            stats.update(zip(todo, observe(*state.irs, todo, state.calib, progress=state.progress)))
        return Out({"stats": stats})


register_pass(Observe())
