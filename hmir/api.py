"""The public entry point: ``compile_merge(a, b, data) -> MergeResult``, and the pipeline behind it.

``compile_merge`` checks the options against the chosen method (:mod:`hmir.pipeline.methods`),
builds a :class:`~hmir.pipeline.state.MergeState` and runs the method's passes with the pass
manager (:func:`~hmir.pipeline.manager.run_passes`). :func:`run_pipeline` does the same and
returns the state, for custom pipelines or to stop after a pass.

Example::

    >>> import torch
    >>> from hmir import compile_merge, run_pipeline
    >>> from hmir.harness import zoo
    >>> a, b = zoo.resnet20(), zoo.resnet20()
    >>> batches = [torch.randn(16, 3, 32, 32) for _ in range(2)]
    >>> result = compile_merge(a, b, batches, method="zip", progress=False)
    >>> result.module(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> state = run_pipeline(a, b, batches, stop_after="match", progress=False)
    >>> state.module is None, len(state.matches) == len(state.pairs)
    (True, True)
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

import hmir.passes.align_depth  # noqa: F401  (each pass module registers its pass)
import hmir.passes.emit  # noqa: F401
import hmir.passes.fuse  # noqa: F401
import hmir.passes.interpolate  # noqa: F401
import hmir.passes.lower  # noqa: F401
import hmir.passes.match  # noqa: F401
import hmir.passes.observe  # noqa: F401
import hmir.passes.pair  # noqa: F401
import hmir.passes.repair  # noqa: F401
import hmir.passes.structure  # noqa: F401
import hmir.passes.weight_match  # noqa: F401
from hmir.errors import MergeError
from hmir.frontends.select import lower_pair
from hmir.ir import MergeIR
from hmir.passes.depth import DepthOptions
from hmir.passes.depth import depth as depth_pass
from hmir.passes.lower import LowerOptions
from hmir.passes.match import MatchOptions
from hmir.passes.repair import RepairOptions
from hmir.pipeline.data import Calibration
from hmir.pipeline.manager import run_passes
from hmir.pipeline.methods import get_method, resolve
from hmir.pipeline.report import MergeReport
from hmir.pipeline.state import MergeState

log = logging.getLogger(__name__)
MATCH_KEYS = ("alpha", "beta", "similarity_alpha")


@dataclass
class MergeResult:
    """The merged model, its IRs, the report and the final merge state."""

    module: fx.GraphModule
    report: MergeReport
    ir_a: MergeIR
    ir_b: MergeIR
    example: torch.Tensor
    state: MergeState | None = None

    def to_onnx(self, path: str | Path, *, example: torch.Tensor | None = None, rtol: float = 1e-4,
                atol: float = 1e-6):
        """Export the merged module to ONNX with a dynamic batch; checks parity with onnxruntime,
        each output within ``atol + rtol * max|output|`` (:func:`~hmir.backend.onnx_export.export_onnx`)."""
        from hmir.backend.onnx_export import export_onnx

        return export_onnx(self.module, self.example if example is None else example, path,
                           rtol=rtol, atol=atol)

    def to_pretrained(self, *, rtol: float = 1e-4):
        """The merged model as an instance of model A's Hugging Face class with a new config
        (hidden/intermediate sizes, heads, layers from the merged weights), in eval mode, checked
        to match ``self.module`` on ``self.example``; ``generate()``/``save_pretrained()`` work.
        Raises :class:`hmir.backend.hf.RebuildError` where no config of A's class expresses
        the merge (then ``self.module`` is the merged model). See
        :func:`hmir.backend.hf.rebuild_pretrained`."""
        from hmir.backend.hf import rebuild_pretrained

        return rebuild_pretrained(self, rtol=rtol)


def compile_merge(a: nn.Module, b: nn.Module, data, *, method: str = "zip", depth="lma",
                  width=None, repair: bool = True, max_batches: int | None = None,
                  progress: bool = True, names: tuple[str, str] = ("model a", "model b"),
                  frontend: str = "auto", verify: bool | None = None, **params) -> MergeResult:
    """Merge two trained models, of equal or different depth, into one, without training.

    ``data`` is any iterable of batches (tensors or (input, target) tuples, e.g. a
    DataLoader); it calibrates the feature statistics and, where the merged model has
    BatchNorms, resets their statistics (``repair=False`` switches that off).
    ``method`` is a registered merge method (:func:`hmir.pipeline.methods.get_method`):
    ``"avg"`` (plain averaging), ``"permute"`` (Hungarian on correlation), ``"zip"`` (ZipIt-style
    greedy zipping, elastic) or ``"mal"`` (Model Assembly Learning: zero-padded weight matching of
    B onto A, then ``(1−λ)·W_A + λ·P(W_B)`` in A's architecture). Its parameters come as
    keywords (``**params``) and are checked against the method: ``alpha``/``beta`` (zip: decay
    and within-model budget), ``similarity_alpha`` (permute, zip: None matches on activation
    correlation, α in [0, 1] on the MuDSC dual-space similarity α·activation + (1−α)·weight),
    ``lam``/``layers`` (mal). An option the method does not use is an error naming the methods
    that do. ``depth``: how stages of different depth are aligned, ``"lma"``, ``"sma"`` or
    ``"uniform"``, or a :class:`~hmir.passes.depth.DepthOptions`; the shallower model is
    inflated with zero blocks / identity layers first. ``width``: the merged width of spaces
    whose widths differ (elastic methods): ``"max"`` (default), ``"min"``, an int, a ratio of the
    larger width, or a per-space dict (:func:`hmir.passes.match.target_width`). ``frontend``:
    ``"auto"`` (torch.fx, then torch.export when tracing fails), ``"fx"`` or ``"export"``.
    ``verify``: check the IR invariants after every pass (default: the ``HMIR_VERIFY``
    environment variable, set in the test suite). Neither ``a`` nor ``b`` is modified; the merged
    module lives on ``a``'s device and dtype.
    """
    state = run_pipeline(a, b, data, method=method, depth=depth, width=width, repair=repair,
                         max_batches=max_batches, progress=progress, names=names,
                         frontend=frontend, verify=verify, **params)
    log.info("merged %s and %s with %s", *names, method)
    return MergeResult(state.module, state.report, *state.irs, state.example, state)


def run_pipeline(a: nn.Module, b: nn.Module, data, *, method: str = "zip", depth="lma",
                 width=None, repair: bool = True, max_batches: int | None = None,
                 progress: bool = True, names: tuple[str, str] = ("model a", "model b"),
                 frontend: str = "auto", verify: bool | None = None,
                 passes: list[str] | None = None, stop_after: str | None = None,
                 keep: tuple[str, ...] = (), **params) -> MergeState:
    """The merge state after running ``passes`` (default: the method's pipeline) up to
    ``stop_after``; the options are :func:`compile_merge`'s. ``hmir.list_passes()`` names the
    registered passes. The statistics are released once no later pass needs them
    (``keep=("stats",)`` keeps them for inspection)."""
    state = prepare(a, b, data, method=method, depth=depth, width=width, repair=repair,
                    max_batches=max_batches, progress=progress, names=names, frontend=frontend,
                    **params)
    if verify is None:
        verify = os.environ.get("HMIR_VERIFY", "") not in ("", "0")
    return run_passes(state, list(passes or state.method.passes), verify=verify,
                      stop_after=stop_after, keep=keep)


def prepare(a, b, data, *, method="zip", depth="lma", width=None, repair=True, max_batches=None,
            progress=True, names=("model a", "model b"), frontend="auto", **params) -> MergeState:
    """The initial merge state: the method and its parameters checked, every pass's options."""
    m = get_method(method)
    params = resolve(method, params)
    if width is not None and "match" not in m.passes:
        raise MergeError(f"width has no effect with method={method!r} (it keeps A's widths); "
                         f"elastic widths need an elastic method, e.g. method='zip'")
    depth_opts = depth if isinstance(depth, DepthOptions) else DepthOptions(depth)
    if not m.needs_activations:         # nothing to observe: no point fusing it with the CKA forward
        depth_opts = replace(depth_opts, fuse_observe=False)
    options = [LowerOptions(frontend), depth_opts, RepairOptions(repair)]
    if "match" in m.passes:
        options.append(MatchOptions(
            method, params.get("alpha", 0.5), params.get("beta", 0.5), width=width or "max",
            similarity_alpha=params.get("similarity_alpha"),
            params={k: v for k, v in params.items() if k not in MATCH_KEYS}))
    calib = Calibration(data, max_batches=max_batches)
    shown = {k: v for k, v in params.items() if not (k == "similarity_alpha" and v is None)}
    shown["depth"] = depth_opts.method
    if "match" in m.passes:
        shown["width"] = width or "max"
    report = MergeReport(names, (frontend, frontend), method, shown)
    return MergeState(models=(a, b), names=names, calib=calib, example=calib.example(), method=m,
                      params=params, options={o.name: o for o in options}, report=report, progress=progress)


def depth_plan(a: nn.Module, b: nn.Module, data, *, depth: str = "lma", progress: bool = True,
               names: tuple[str, str] = ("model a", "model b"), frontend: str = "auto",
               cka: str = "all"):
    """Depth alignment of two models alone: stages, CKA of their units, per-stage alignment.

    ``cka="all"`` measures the CKA of every stage whose depths differ, also where the
    alignment is forced; ``"needed"`` only where it has a choice (what compile_merge does).

    Example::

        >>> import torch
        >>> from hmir import depth_plan, inflate
        >>> from hmir.harness import zoo
        >>> batches = [torch.randn(8, 3, 32, 32) for _ in range(2)]
        >>> a, b = zoo.resnet20(), zoo.resnet26()
        >>> plan = depth_plan(a, b, batches, progress=False)
        >>> len(plan.alignments[1].positions), plan.alignments[1].deeper
        (3, 'b')
        >>> deep = inflate(a, plan, "a", batches[0]).module      # as deep as b, same function as a
    """
    calib = Calibration(data)
    x = calib.example()
    ir_a, ir_b, _, _ = lower_pair(a, b, x, names, frontend)
    return depth_pass(ir_a, ir_b, calib, DepthOptions(depth, cka=cka), progress=progress)
