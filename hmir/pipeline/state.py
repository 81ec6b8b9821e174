"""The merge state: everything a merge knows, filled in pass by pass.

Each pass declares which fields it ``requires`` and which it ``provides``
(:class:`~hmir.pipeline.manager.Pass`); the pass manager hands it the state and replaces the
fields it returns, so what travels between passes is always a named field here, never an
attribute stuck on an IR.

Example::

    >>> import torch
    >>> from hmir.pipeline.state import MergeState, FIELDS
    >>> "matches" in FIELDS and "absent" in FIELDS
    True
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from hmir.ir import MergeIR
from hmir.ir.pairing import SpacePair
from hmir.pipeline.data import Calibration
from hmir.pipeline.report import MergeReport

NO_ABSENT = (frozenset(), frozenset())


@dataclass(frozen=True)
class MergeState:
    """Inputs of a merge (``models`` … ``options``) and what the passes computed.

    - ``irs``: the lowered (after ``align_depth``: inflated) models; ``frontends``: which
      frontend lowered each;
    - ``structure``: ``"same"`` (spaces pair one to one) or ``"depth"`` (stages differ in depth);
    - ``plan``: the :class:`~hmir.passes.depth.DepthPlan` of a depth-heterogeneous merge;
    - ``absent``: per model, the ids of spaces that are an inserted zero block's inner features
      (no signal: matching keeps the other model's features there);
    - ``pairs``: corresponding spaces; ``stats``: their streamed statistics (pair → SpaceStats);
    - ``matches``: merge/unmerge matrices per pair; ``weight_matching``: MAL's result;
    - ``merged``: the merged state dict (A's names); ``widths``: space id → new width;
    - ``module``: the emitted merged module.
    """

    models: tuple[nn.Module, nn.Module]
    names: tuple[str, str]
    calib: Calibration
    example: torch.Tensor
    method: Any                          # the MergeMethod (hmir.pipeline.methods)
    params: dict                         # the method's parameters, defaults filled in
    options: dict                        # per-pass options: pass name → options object
    report: MergeReport
    progress: bool = True
    irs: tuple[MergeIR, MergeIR] | None = None
    frontends: tuple[str, str] | None = None
    structure: str | None = None
    stages: tuple | None = None
    plan: Any = None
    absent: tuple[frozenset, frozenset] = NO_ABSENT
    pairs: list[SpacePair] | None = None
    stats: dict = field(default_factory=dict)
    matches: list | None = None
    weight_matching: Any = None
    merged: dict | None = None
    widths: dict = field(default_factory=dict)
    module: fx.GraphModule | None = None

    def option(self, name: str, default):
        """The options object of pass ``name`` (``default`` when the pipeline set none)."""
        return self.options.get(name, default)


FIELDS = frozenset(f.name for f in fields(MergeState))
# what a pipeline starts with: the merge's inputs, and the fields whose empty default is meaningful
# (no absent spaces, no statistics observed yet, no width changed)
INPUTS = frozenset(("models", "names", "calib", "example", "method", "params", "options", "report",
                    "progress", "absent", "stats", "widths"))
