"""The public entry point: ``compile_merge(a, b, data) -> MergeResult``.

Example::

    >>> from hmir import compile_merge
    >>> from hmir.zoo import resnet20
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
from hmir.data import Calibration
from hmir.errors import CalibrationError, IncompatibleModelsError
from hmir.frontends.fx import eval_mode, lower
from hmir.ir import MergeIR
from hmir.pairing import pair_spaces
from hmir.passes.fuse import fuse
from hmir.passes.match import MatchOptions, check_method, match
from hmir.passes.observe import observe
from hmir.passes.repair import has_norms
from hmir.passes.repair import repair as repair_module
from hmir.report import MergeReport, SpaceReport
from hmir.verify import verify

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
        from hmir.onnx_export import export_onnx

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


def compile_merge(a: nn.Module, b: nn.Module, data, *, method: str = "zip", alpha: float = 0.5,
                  beta: float = 0.5, repair: bool = True,
                  max_batches: int | None = None, progress: bool = True,
                  names: tuple[str, str] = ("model a", "model b")) -> MergeResult:
    """Merge two trained models of one architecture into one, without training.

    ``data`` is any iterable of batches (tensors or (input, target) tuples, e.g. a
    DataLoader); it calibrates the feature statistics and, where the merged model has
    BatchNorms, resets their statistics (``repair=False`` switches that off).
    ``method``: ``"avg"`` (plain averaging), ``"permute"`` (Hungarian on correlation) or
    ``"zip"`` (ZipIt-style greedy zipping with ``alpha``, ``beta``). Neither ``a`` nor
    ``b`` is modified. The merged module lives on ``a``'s device and dtype.
    """
    check_method(method)
    calib = Calibration(data, max_batches=max_batches)
    x = calib.example()
    opts = {"alpha": alpha, "beta": beta} if method == "zip" else {}
    report = MergeReport(names, ("fx", "fx"), method, opts)
    _check_io(a, b, x, names)
    with report.timed("trace"):
        ir_a, ir_b = lower(a, x, names[0]), lower(b, x, names[1])
    pairs = pair_spaces(ir_a, ir_b)
    free = [p for p in pairs if p.points]
    with report.timed("observe"):
        stats_free = observe(ir_a, ir_b, free, calib, progress=progress)
    stats = {p: s for p, s in zip(free, stats_free)}
    state_a, state_b = a.state_dict(), b.state_dict()
    with report.timed("match"):
        matches, notes = match(ir_a, ir_b, pairs, [stats.get(p) for p in pairs],
                               MatchOptions(method, alpha, beta), state_a, state_b)
    report.notes += notes
    with report.timed("fuse"):
        state = fuse(ir_a, ir_b, pairs, matches, state_a, state_b)
        verify(ir_a, state)                 # the merged tensors still fit the IR exactly
    with report.timed("emit"):
        module = emit(ir_a, state)
    norms = has_norms(module)
    if repair and norms:
        with report.timed("repair"):
            n = repair_module(module, calib, progress=progress)
        report.notes.append(f"repair: reset the running statistics of {n} norm layers")
    elif norms:
        report.notes.append("repair: off (norm statistics are the merged parents' averages)")
    for p, m in zip(pairs, matches):
        sa, sb = ir_a.space(p.a), ir_b.space(p.b)
        report.spaces.append(SpaceReport(sa.name, sa.n, sb.n, m.r, m.score, sa.fixed))
    log.info("merged %s and %s with %s", *names, method)
    return MergeResult(module, report, ir_a, ir_b, x)

