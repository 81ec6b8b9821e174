"""Frontend selection: symbolic_trace first, torch.export when tracing or lowering fails.

Example::

    >>> from hmir.harness import zoo
    >>> x = torch.randn(2, 4)
    >>> a, b = zoo.mlp(4, (8,), 2), zoo.mlp(4, (16,), 2)
    >>> ir_a, ir_b, used, notes = lower_pair(a, b, x, ("a", "b"))
    >>> used, notes, ir_b.spaces[1].n
    ('fx', [], 16)
    >>> class Clamp(nn.Module):          # symbolic_trace records ``clamp`` as an op with no rule
    ...     def __init__(self):
    ...         super().__init__(); self.fc = nn.Linear(4, 2)
    ...     def forward(self, x):
    ...         return self.fc(x.clamp(min=0))
    >>> ir_a, ir_b, used, notes = lower_pair(Clamp(), Clamp(), x, ("a", "b"))
    >>> used, ir_a.frontend
    ('export', 'export')
    >>> print(notes[0])
    frontend: torch.export (symbolic_trace failed: a: node 'clamp'
    (call_method clamp) has no lowering rule)
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from hmir.errors import HMIRError, LoweringError
from hmir.ir import MergeIR

FRONTENDS = ("auto", "fx", "export")


def check_frontend(frontend: str) -> None:
    if frontend not in FRONTENDS:
        raise HMIRError(f"unknown frontend {frontend!r}; valid: {list(FRONTENDS)} ('auto' tries "
                        f"torch.fx.symbolic_trace first and torch.export when it fails)")


def lower_with(frontend: str, model: nn.Module, example: torch.Tensor, name: str) -> MergeIR:
    """Lower ``model`` with the named frontend (``"fx"`` or ``"export"``)."""
    if frontend == "export":
        from hmir.frontends.export import lower
    else:
        from hmir.frontends.fx import lower
    return lower(model, example, name)


def relower(ir: MergeIR, gm: fx.GraphModule, example: torch.Tensor) -> MergeIR:
    """Lower a graph module hmir derived from ``ir``'s graph (e.g. inflated) with ``ir``'s frontend."""
    if ir.frontend == "export":
        from hmir.frontends.export import lower_graph

        return lower_graph(gm, example, ir.name)
    from hmir.frontends.fx import lower

    return lower(gm, example, ir.name)


def lower_pair(a: nn.Module, b: nn.Module, example: torch.Tensor, names: tuple[str, str],
               frontend: str = "auto") -> tuple[MergeIR, MergeIR, str, list[str]]:
    """Both models lowered with one frontend; returns the IRs, the frontend used and notes.

    ``"auto"``: symbolic_trace for both; if either fails to trace or lower, torch.export
    for both (two models of one structure must be lowered alike), and a note says why.
    """
    check_frontend(frontend)
    if frontend != "auto":
        return (lower_with(frontend, a, example, names[0]),
                lower_with(frontend, b, example, names[1]), frontend, [])
    try:
        return (lower_with("fx", a, example, names[0]), lower_with("fx", b, example, names[1]),
                "fx", [])
    except LoweringError as e:
        why = str(e).splitlines()[0][:300]
    try:
        irs = lower_with("export", a, example, names[0]), lower_with("export", b, example, names[1])
    except LoweringError as e:
        raise type(e)(f"{e}\n  (frontend='auto': symbolic_trace failed first: {why})") from e
    return (*irs, "export", [f"frontend: torch.export (symbolic_trace failed: {why})"])


def lower(model: nn.Module, example: torch.Tensor, name: str = "model", *,
          frontend: str = "auto") -> MergeIR:
    """Lower one model as :func:`~hmir.compile_merge` would: ``"auto"`` tries symbolic_trace
    and falls back to torch.export when it fails (``ir.frontend`` says which was used).

    Example::

        >>> from hmir.harness import zoo
        >>> lower(zoo.mlp(4, (8,), 2), torch.randn(2, 4)).frontend
        'fx'
    """
    check_frontend(frontend)
    if frontend != "auto":
        return lower_with(frontend, model, example, name)
    try:
        return lower_with("fx", model, example, name)
    except LoweringError as e:
        why = str(e).splitlines()[0][:300]
    try:
        return lower_with("export", model, example, name)
    except LoweringError as e:
        raise type(e)(f"{e}\n  (frontend='auto': symbolic_trace failed first: {why})") from e

