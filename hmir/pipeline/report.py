"""The merge report: per-space widths and similarity, time per pass, notes.

Example::

    >>> print(result.report)          # doctest: +SKIP
    hmir merge: model a (fx) + model b (fx), method zip
    space                width A  width B  merged  similarity
    ...
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from hmir.errors import HMIRError


@dataclass(frozen=True)
class SpaceReport:
    name: str
    width_a: int
    width_b: int
    width: int
    similarity: float
    fixed: bool


@dataclass
class MergeReport:
    """What a merge did and what it cost."""

    models: tuple[str, str]
    frontends: tuple[str, str]
    method: str
    options: dict = field(default_factory=dict)
    spaces: list[SpaceReport] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    passes: list[tuple[str, str]] = field(default_factory=list)   # (pass, "ran" | "skipped: why")
    depth: Any = None          # the DepthPlan of a depth-heterogeneous merge (CKA, alignments)

    def plot_cka(self, path, title: str = ""):
        """Heatmap of the CKA between the units of A and B that depth alignment compared.

        Example: ``result.report.plot_cka("cka.png")`` (seed Fig. 3); the aligned cells are marked.
        """
        from hmir.algorithms.cka import plot_cka

        if self.depth is None or not self.depth.labels_a:
            raise HMIRError("this merge measured no CKA (no stage depths differ, or every differing "
                            "stage has a single alignment): hmir.depth_plan(a, b, data) measures "
                            "every differing stage; plot its .cka with hmir.algorithms.cka.plot_cka")
        return plot_cka(self.depth.cka, path, labels_a=self.depth.labels_a,
                        labels_b=self.depth.labels_b, alignment=_cka_blocks(self.depth),
                        title=title or " + ".join(self.models))

    @contextmanager
    def timed(self, name: str):
        t0 = time.perf_counter()
        yield
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    @property
    def mean_similarity(self) -> float:
        vals = [s.similarity for s in self.spaces if not s.fixed and not math.isnan(s.similarity)]
        return sum(vals) / len(vals) if vals else math.nan

    def __str__(self) -> str:
        a, b = self.models
        lines = [f"hmir merge: {a} ({self.frontends[0]}) + {b} ({self.frontends[1]}), "
                 f"method {self.method} {self.options}",
                 f"{'space':32s} {'width A':>8s} {'width B':>8s} {'merged':>7s} {'similarity':>10s}"]
        for s in self.spaces:
            sim = "fixed" if s.fixed else f"{s.similarity:10.4f}"
            lines.append(f"{s.name[:32]:32s} {s.width_a:8d} {s.width_b:8d} {s.width:7d} {sim:>10s}")
        lines.append(f"mean similarity of free spaces: {self.mean_similarity:.4f}")
        lines.append("time per pass: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _cka_blocks(plan) -> list:
    """``(alignment, row_offset, col_offset)`` of each stage in the plan's stacked CKA matrix."""
    blocks, ra, rb = [], 0, 0
    for sa, sb, al in zip(plan.stages_a, plan.stages_b, plan.alignments):
        if sa.index in plan.measured:
            blocks.append((al, ra, rb))
            ra, rb = ra + len(sa.pieces), rb + len(sb.pieces)
    return blocks
