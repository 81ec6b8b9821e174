"""Streamed linear CKA between the units of two models, with the unbiased HSIC estimator.

Per minibatch of size ``b`` each unit's output is flattened to ``X`` (b × p) and its linear Gram
``K = X Xᵀ`` is formed; the unbiased estimator (Song et al. 2012) is

    HSIC1(K, L) = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((b−1)(b−2)) − 2/(b−2)·1ᵀK̃L̃1] / (b(b−3)),

with ``K̃, L̃`` the Grams with zeroed diagonal. HSIC1 is averaged over minibatches (Nguyen et al.
2021) and ``CKA = mean HSIC1(K, L) / sqrt(mean HSIC1(K, K) · mean HSIC1(L, L))``. HSIC1 is exactly
invariant to centring the features, so each batch is centred first (better float accuracy).
Memory is O(units · b²); activations are never kept.

Example::

    >>> import torch
    >>> x = torch.randn(64, 8, dtype=torch.float64)
    >>> cka = StreamingCKA(1, 2)
    >>> cka.update([x], [x, torch.randn(64, 8)])
    >>> round(cka.matrix()[0, 0].item(), 9)
    1.0
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from hmir.errors import CalibrationError, MergeError

__all__ = ["StreamingCKA", "linear_cka", "plot_cka", "hsic1"]

_TINY = 1e-12   # self-HSIC below _TINY × (mean squared norm)² counts as a constant feature map


def _grams(feats: list[torch.Tensor], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked centred Grams (units × b × b, float64) and each unit's scale (mean ‖x‖²)²."""
    grams, scales = [], []
    for f in feats:
        x = f.detach().reshape(f.shape[0], -1).to(device=device, dtype=torch.float64)
        scales.append((x.square().sum() / x.shape[0]) ** 2)
        x = x - x.mean(0, keepdim=True)
        grams.append(x @ x.T)
    return torch.stack(grams), torch.stack(scales)


def hsic1(K: torch.Tensor, L: torch.Tensor, pairwise: bool = True) -> torch.Tensor:
    """Unbiased HSIC of stacked Grams: every pair ``(u, b, b) × (v, b, b) → (u, v)``, or, with
    ``pairwise=False``, matching pairs ``(u, b, b) × (u, b, b) → (u,)``.

    Example::

        >>> x = torch.randn(10, 3, dtype=torch.float64)
        >>> K = (x @ x.T)[None]
        >>> bool(hsic1(K, K)[0, 0] > 0), hsic1(K, K, pairwise=False).shape
        (True, torch.Size([1]))
    """
    b = K.shape[-1]
    eye = torch.eye(b, dtype=torch.bool, device=K.device)
    K, L = K.masked_fill(eye, 0), L.masked_fill(eye, 0)
    ks, ls, kr, lr = K.sum((1, 2)), L.sum((1, 2)), K.sum(2), L.sum(2)
    if pairwise:
        trace = torch.einsum("akl,ckl->ac", K, L)          # tr(K̃ L̃): Grams are symmetric
        sums, rows = torch.outer(ks, ls), torch.einsum("ak,ck->ac", kr, lr)
    else:
        trace = torch.einsum("akl,akl->a", K, L)
        sums, rows = ks * ls, torch.einsum("ak,ak->a", kr, lr)
    return (trace + sums / ((b - 1) * (b - 2)) - 2.0 / (b - 2) * rows) / (b * (b - 3))


def _batch_size(feats_a, feats_b) -> int:
    sizes = {int(f.shape[0]) for f in list(feats_a) + list(feats_b)}
    if len(sizes) != 1:
        raise CalibrationError(f"all unit outputs of one minibatch need the same batch size, "
                               f"got sizes {sorted(sizes)}")
    b = sizes.pop()
    if b < 4:
        raise CalibrationError(f"batch size {b} is too small for the unbiased HSIC estimator; "
                               f"use batches of >= 4 examples")
    return b


class StreamingCKA:
    """Accumulates HSIC statistics of ``n_a`` units of A and ``n_b`` units of B over minibatches.

    Example::

        >>> s = StreamingCKA(2, 1)
        >>> x = torch.randn(32, 4)
        >>> s.update([x, 2 * x], [x]); s.update([x, -x], [x])
        >>> s.batches, s.matrix().shape
        (2, torch.Size([2, 1]))
    """

    def __init__(self, n_a: int, n_b: int):
        if n_a < 1 or n_b < 1:
            raise CalibrationError(f"StreamingCKA needs at least one unit per model, "
                                   f"got {n_a} and {n_b}")
        self.n_a, self.n_b = n_a, n_b
        self._batches = 0
        self._cross = self._self_a = self._self_b = self._scale_a = self._scale_b = None

    @property
    def batches(self) -> int:
        """Number of minibatches seen so far."""
        return self._batches

    def update(self, feats_a: list[torch.Tensor], feats_b: list[torch.Tensor]) -> None:
        """Add one minibatch: ``feats_a[u]`` is A's unit ``u`` output, shape ``(b, ...)``."""
        if len(feats_a) != self.n_a or len(feats_b) != self.n_b:
            raise CalibrationError(f"expected {self.n_a} unit outputs of A and {self.n_b} of B, "
                                   f"got {len(feats_a)} and {len(feats_b)}")
        _batch_size(feats_a, feats_b)
        with torch.no_grad():
            Ka, sa = _grams(feats_a)
            Lb, sb = _grams(feats_b, device=Ka.device)
            stats = (hsic1(Ka, Lb), hsic1(Ka, Ka, False), hsic1(Lb, Lb, False), sa, sb)
        if self._cross is None:
            self._cross, self._self_a, self._self_b, self._scale_a, self._scale_b = stats
        else:
            for acc, new in zip((self._cross, self._self_a, self._self_b, self._scale_a,
                                 self._scale_b), stats):
                acc += new
        self._batches += 1

    def matrix(self) -> torch.Tensor:
        """``(n_a, n_b)`` float64 CPU CKA; units with a constant feature map get 0 everywhere."""
        if self._batches == 0:
            raise CalibrationError("StreamingCKA.matrix() called before any update()")
        ha = self._self_a.cpu().clone()
        hb = self._self_b.cpu().clone()
        dead_a = ha <= _TINY * self._scale_a.cpu()
        dead_b = hb <= _TINY * self._scale_b.cpu()
        ha[dead_a], hb[dead_b] = 1.0, 1.0
        out = self._cross.cpu() / torch.sqrt(torch.outer(ha, hb))
        out[dead_a, :] = 0.0
        out[:, dead_b] = 0.0
        return out


def linear_cka(x: torch.Tensor, y: torch.Tensor, unbiased: bool = True) -> float:
    """Reference linear CKA of one full batch, ``(n, p)`` vs ``(n, q)`` (extra dims flattened).

    Example::

        >>> x = torch.randn(50, 6, dtype=torch.float64)
        >>> round(linear_cka(x, 3 * x), 6), round(linear_cka(x, x, unbiased=False), 6)
        (1.0, 1.0)
    """
    if x.shape[0] != y.shape[0]:
        raise CalibrationError(f"linear_cka needs the same number of examples, got {x.shape[0]} "
                               f"and {y.shape[0]}")
    if not unbiased:
        xs = x.detach().reshape(x.shape[0], -1).double()
        ys = y.detach().reshape(y.shape[0], -1).to(xs.device, torch.float64)
        xs, ys = xs - xs.mean(0), ys - ys.mean(0)
        num = (ys.T @ xs).square().sum()
        den = (xs.T @ xs).norm() * (ys.T @ ys).norm()
        return float(num / den) if den > 0 else 0.0
    _batch_size([x], [y])
    return _reference_unbiased(x, y)


def _reference_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased formula written out on uncentred Grams, independent of :func:`hsic1`."""
    n = x.shape[0]
    xs = x.detach().reshape(n, -1).double()
    ys = y.detach().reshape(n, -1).to(xs.device, torch.float64)
    one = torch.ones(n, dtype=torch.float64, device=xs.device)

    def h(K, L):
        K, L = K - torch.diag(torch.diag(K)), L - torch.diag(torch.diag(L))
        return float((torch.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
                      - 2.0 / (n - 2) * (one @ K @ L @ one)) / (n * (n - 3)))

    K, L = xs @ xs.T, ys @ ys.T
    hk, hl = h(K, K), h(L, L)
    if hk <= _TINY * float(K.diag().mean()) ** 2 or hl <= _TINY * float(L.diag().mean()) ** 2:
        return 0.0
    return h(K, L) / math.sqrt(hk * hl)


def plot_cka(C, path, *, labels_a=None, labels_b=None, alignment=None, title="") -> Path:
    """Heatmap of ``C`` (A units as rows, B units as columns), aligned cells marked; a PNG.

    ``alignment``: one :class:`~hmir.algorithms.alignment.Alignment` of the whole matrix, or a list of
    ``(alignment, row_offset, col_offset)`` blocks (one per stage). Circles mark where the
    shallower model's units are placed, crosses the inserted units (and whose output they carry).

    Example::

        >>> import tempfile
        >>> from hmir.algorithms.alignment import align
        >>> C = torch.tensor([[1.0, 0.2], [0.9, 0.3], [0.1, 1.0]])    # A has 3 units, B 2
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = plot_cka(C, f"{d}/cka.png", alignment=align(C.numpy(), "lma"))
        ...     path.name, path.read_bytes()[1:4]
        ('cka.png', b'PNG')
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    C = torch.as_tensor(C, dtype=torch.float64).detach().cpu().numpy()
    mA, mB = C.shape
    fig = Figure(figsize=(1.5 + 0.45 * mB, 1.2 + 0.45 * mA))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(C, vmin=0.0, vmax=1.0, cmap="viridis", origin="lower", aspect="auto")
    fig.colorbar(im, ax=ax, label="linear CKA")
    ax.set_xticks(range(mB), labels_b if labels_b is not None else range(mB), rotation=90)
    ax.set_yticks(range(mA), labels_a if labels_a is not None else range(mA))
    ax.set_xlabel("model B units")
    ax.set_ylabel("model A units")
    blocks = alignment if isinstance(alignment, (list, tuple)) else [(alignment, 0, 0)]
    for al, ra, rb in blocks:
        if al is not None:
            _mark_alignment(ax, al, ra, rb, mA, mB)
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png", dpi=100)
    return path


def _mark_alignment(ax, alignment, ra: int, rb: int, mA: int, mB: int) -> None:
    """Mark placed cells (deep ``G[i]``, shallow ``i``) with circles, inserted ones with crosses."""
    rows_n, cols_n = ((alignment.m, alignment.n) if alignment.deeper == "a" else
                      (alignment.n, alignment.m))
    if ra + rows_n > mA or rb + cols_n > mB:
        raise MergeError(f"alignment of {rows_n}×{cols_n} units at ({ra}, {rb}) does not fit a "
                         f"{mA}×{mB} CKA matrix")
    placed = [(g, i) for i, g in enumerate(alignment.positions)]
    carried = [(j, alignment.source(j)) for j in alignment.inserted()]
    for cells, marker in ((placed, "o"), (carried, "x")):
        if not cells:
            continue
        deep, shallow = zip(*cells)
        rows, cols = (deep, shallow) if alignment.deeper != "b" else (shallow, deep)
        rows, cols = [r + ra for r in rows], [c + rb for c in cols]
        style = {"facecolors": "none", "edgecolors": "red"} if marker == "o" else {"c": "red"}
        ax.scatter(cols, rows, marker=marker, s=60, linewidths=1.5, **style)
