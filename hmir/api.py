"""The public entry point: ``compile_merge(a, b, data) -> MergeResult``.

Example::

    >>> from hmir import compile_merge
    >>> from hmir.harness.zoo import resnet20
    >>> a, b = resnet20(), resnet20()
    >>> batches = [torch.randn(16, 3, 32, 32) for _ in range(4)]
    >>> result = compile_merge(a, b, batches, method="zip", progress=False)
    >>> result.module(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> result.to_onnx("merged.onnx").max_abs_diff < 1e-4                  # doctest: +SKIP
    True
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from hmir.backend import emit
from hmir.pipeline.data import Calibration
from hmir.algorithms.dual import check_similarity_alpha
from hmir.errors import CalibrationError, IncompatibleModelsError, MergeError
from hmir.ir.modes import eval_mode
from hmir.frontends.select import check_frontend, lower_pair
from hmir.algorithms.interpolate import interpolate
from hmir.ir import MergeIR
from hmir.ir.pairing import pair_spaces, param_map
from hmir.passes.fuse import fuse
from hmir.passes.align_depth import align_and_inflate
from hmir.passes.depth import DepthOptions
from hmir.passes.depth import depth as depth_pass
from hmir.passes.match import METHODS, MatchOptions, absent_pair, match
from hmir.passes.observe import observe
from hmir.passes.repair import has_norms
from hmir.passes.repair import repair as repair_module
from hmir.passes.weight_match import align_state, weight_match
from hmir.pipeline.report import MergeReport, SpaceReport
from hmir.ir.verify import verify

log = logging.getLogger(__name__)


@dataclass
class MergeResult:
    """The merged model, its IRs and the report."""

    module: fx.GraphModule
    report: MergeReport
    ir_a: MergeIR
    ir_b: MergeIR
    example: torch.Tensor

    def to_onnx(self, path: str | Path, *, example: torch.Tensor | None = None, atol: float = 1e-4):
        """Export the merged module to ONNX with a dynamic batch; checks parity with onnxruntime."""
        from hmir.backend.onnx_export import export_onnx

        return export_onnx(self.module, self.example if example is None else example, path, atol=atol)


def _probe(model: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    p = next(model.parameters(), None)
    if p is not None:
        x = x.to(device=p.device, dtype=p.dtype if x.is_floating_point() else x.dtype)
    try:
        with eval_mode(model):
            return model(x)
    except Exception as e:
        raise CalibrationError(f"calibration batch 0 of shape {tuple(x.shape)} could not be run by "
                               f"{name} ({type(model).__name__}): {e}") from e


def _check_io(a, b, x, names) -> None:
    ya, yb = _probe(a, x, names[0]), _probe(b, x, names[1])
    sa = tuple(ya.shape) if isinstance(ya, torch.Tensor) else type(ya).__name__
    sb = tuple(yb.shape) if isinstance(yb, torch.Tensor) else type(yb).__name__
    if sa != sb:
        raise IncompatibleModelsError(
            f"{names[0]} and {names[1]} give outputs of different shapes on the same input "
            f"{tuple(x.shape)}: {sa} vs {sb}; merged models must share input and output spaces")


def compile_merge(a: nn.Module, b: nn.Module, data, *, method: str = "zip", depth="lma",
                  width="max", alpha: float = 0.5, beta: float = 0.5,
                  similarity_alpha: float | None = None, lam: float = 0.5, layers=None,
                  repair: bool = True, max_batches: int | None = None, progress: bool = True,
                  names: tuple[str, str] = ("model a", "model b"),
                  frontend: str = "auto") -> MergeResult:
    """Merge two trained models, of equal or different depth, into one, without training.

    ``data`` is any iterable of batches (tensors or (input, target) tuples, e.g. a
    DataLoader); it calibrates the feature statistics and, where the merged model has
    BatchNorms, resets their statistics (``repair=False`` switches that off).
    ``method``: ``"avg"`` (plain averaging), ``"permute"`` (Hungarian on correlation) or
    ``"zip"`` (ZipIt-style greedy zipping with ``alpha``, ``beta``). ``depth``: how stages
    of different depth are aligned, ``"lma"``, ``"sma"`` or ``"uniform"``; the shallower
    model is inflated with zero blocks / identity layers first; a
    :class:`~hmir.passes.depth.DepthOptions` instead of the name also sets which stages' CKA is
    measured (``cka="all"`` for a heatmap of stages whose alignment is forced). Neither ``a`` nor ``b`` is
    modified. ``width``: the merged width of spaces whose widths differ (elastic zip):
    ``"max"``, ``"min"``, an int, a ratio of the larger width, or a per-space dict
    (see :func:`hmir.passes.match.target_width`). ``similarity_alpha``: None (default) matches
    on activation correlation; a number α in [0, 1] matches on the dual-space (MuDSC)
    similarity α·activation + (1−α)·weight (see :mod:`hmir.algorithms.dual`) — not ZipIt's ``alpha``,
    which is the decay of merged features' similarity. ``method="mal"``: Model Assembly
    Learning, the zero-padded generalised permutation of B onto A by weight matching, then
    ``(1−λ)·W_A + λ·P(W_B)`` with ``lam`` for the tensors under the module prefixes
    ``layers`` (all when None); the result keeps A's architecture (widths included) and
    needs no activations except for ``repair``. The merged module lives on ``a``'s device
    and dtype. ``frontend``: ``"auto"`` lowers with torch.fx.symbolic_trace and falls back
    to torch.export when either model fails to trace (Hugging Face transformers), ``"fx"``
    or ``"export"`` forces one; the report names the one used.
    """
    _check_merge_method(method, similarity_alpha, lam)
    check_frontend(frontend)
    depth_opts = depth if isinstance(depth, DepthOptions) else DepthOptions(depth)
    calib = Calibration(data, max_batches=max_batches)
    x = calib.example()
    opts = {"alpha": alpha, "beta": beta} if method == "zip" else {}
    if method == "mal":
        opts = {"lam": lam, "layers": layers}
    if similarity_alpha is not None:
        opts["similarity_alpha"] = similarity_alpha
    report = MergeReport(names, (frontend, frontend), method, {**opts, "depth": depth_opts.method, "width": width})
    _check_io(a, b, x, names)
    with report.timed("trace"):
        ir_a, ir_b, used, fe_notes = lower_pair(a, b, x, names, frontend)
    report.frontends, report.notes = (used, used), report.notes + fe_notes
    known = {}
    try:
        pairs = pair_spaces(ir_a, ir_b)
    except IncompatibleModelsError as err:
        opts_d = depth_opts if method != "mal" else DepthOptions(depth_opts.method, depth_opts.cka,
                                                                 fuse_observe=False)
        ir_a, ir_b, plan, known = align_and_inflate(ir_a, ir_b, calib, x, opts_d, report,
                                                    progress, err)
        report.depth = plan
        pairs = pair_spaces(ir_a, ir_b)
    if method == "mal":
        module = _merge_mal(ir_a, ir_b, pairs, lam, layers, report)
    else:
        module = _merge(ir_a, ir_b, pairs, calib, MatchOptions(
            method, alpha, beta, width=width, similarity_alpha=similarity_alpha), report, progress,
            known)
    norms = has_norms(module)
    if repair and norms:
        with report.timed("repair"):
            n = repair_module(module, calib, progress=progress)
        report.notes.append(f"repair: reset the running statistics of {n} norm layers")
    elif norms:
        report.notes.append("repair: off (norm statistics are the merged parents' averages)")
    log.info("merged %s and %s with %s", *names, method)
    return MergeResult(module, report, ir_a, ir_b, x)


def _check_merge_method(method: str, similarity_alpha, lam: float) -> None:
    """Matching methods (:data:`hmir.passes.match.METHODS`) or ``"mal"`` (weight matching)."""
    if method not in METHODS and method != "mal":
        raise MergeError(f"unknown merge method {method!r}; valid methods: "
                         f"{sorted([*METHODS, 'mal'])}")
    if method != "mal":
        check_similarity_alpha(similarity_alpha, method)
        return
    if similarity_alpha is not None:
        raise MergeError("similarity_alpha has no effect with method='mal' (it matches weights "
                         "only): use method='permute' or 'zip' for dual-space similarity")
    if not 0 <= float(lam) <= 1:
        raise MergeError(f"lam must be in [0, 1] (the share of aligned B), got {lam!r}")


def _merge_mal(ir_a, ir_b, pairs, lam, layers, report) -> fx.GraphModule:
    """weight_match → align_state → interpolate → emit, in A's architecture."""
    state_a, state_b = ir_a.graph_module.state_dict(), ir_b.graph_module.state_dict()
    names = param_map(ir_a, ir_b, pairs)
    with report.timed("match"):
        wm = weight_match(ir_a, ir_b, pairs, state_a, state_b, names=names)
    report.notes += wm.notes + [f"mal: weight matching objective {wm.history[0]:.4g} → "
                                f"{wm.objective:.4g} in {wm.sweeps} sweep(s)"]
    with report.timed("fuse"):
        aligned = align_state(ir_a, ir_b, state_b, wm, names=names, state_a=state_a)
        state = interpolate(state_a, aligned, lam, layers=layers)
        verify(ir_a, state)
    with report.timed("emit"):
        module = emit(ir_a, state, None)
    for p in pairs:
        sa, sb = ir_a.space(p.a), ir_b.space(p.b)
        report.spaces.append(SpaceReport(sa.name, sa.n, sb.n, sa.n, float("nan"), sa.fixed))
    return module


def _merge(ir_a, ir_b, pairs, calib, opts, report, progress, known=None) -> fx.GraphModule:
    """observe → match → fuse → emit for two IRs of one structure (``known``: statistics of
    pairs observed already, by the depth pass's forward)."""
    stats = dict(known or {})
    todo = [p for p in pairs if p.points and absent_pair(ir_a, ir_b, p) is None and p not in stats]
    if todo:
        with report.timed("observe"):
            stats.update(zip(todo, observe(ir_a, ir_b, todo, calib, progress=progress)))
    state_a, state_b = ir_a.graph_module.state_dict(), ir_b.graph_module.state_dict()
    with report.timed("match"):
        matches, notes = match(ir_a, ir_b, pairs, [stats.get(p) for p in pairs], opts,
                               state_a, state_b)
    report.notes += notes
    widths = {p.a: m.r for p, m in zip(pairs, matches) if m.r != ir_a.space(p.a).n}
    with report.timed("fuse"):
        state = fuse(ir_a, ir_b, pairs, matches, state_a, state_b, param_map(ir_a, ir_b, pairs))
        if not widths:
            verify(ir_a, state)             # the merged tensors still fit the IR exactly
    with report.timed("emit"):
        module = emit(ir_a, state, widths or None)     # with widths, emit verifies them first
    for p, m in zip(pairs, matches):
        sa, sb = ir_a.space(p.a), ir_b.space(p.b)
        report.spaces.append(SpaceReport(sa.name, sa.n, sb.n, m.r, m.score, sa.fixed))
    return module


def depth_plan(a: nn.Module, b: nn.Module, data, *, depth: str = "lma", progress: bool = True,
               names: tuple[str, str] = ("model a", "model b"), frontend: str = "auto",
               cka: str = "all"):
    """Depth alignment of two models alone: stages, CKA of their units, per-stage alignment.

    ``cka="all"`` measures the CKA of every stage whose depths differ, also where the
    alignment is forced; ``"needed"`` only where it has a choice (what compile_merge does).

    Example::

        >>> plan = depth_plan(zoo.resnet20(), zoo.resnet26(), batches, progress=False)
        >>> plan.alignments[0].positions, plan.alignments[0].deeper
        ((0, 2, 3, 4), 'b')
        >>> inflate(a, plan, "a", batches[0]).module      # as deep as b, same function as a
    """
    calib = Calibration(data)
    x = calib.example()
    ir_a, ir_b, _, _ = lower_pair(a, b, x, names, frontend)
    return depth_pass(ir_a, ir_b, calib, DepthOptions(depth, cka=cka), progress=progress)
