"""Passes and the pass manager.

A :class:`Pass` has a ``name``, the :class:`~hmir.pipeline.state.MergeState` fields it
``requires`` and ``provides``, an ``options`` type, and ``run(state, options)`` returning a
:class:`Out` (the provided fields and report notes). Passes are registered by name
(:func:`register_pass` rejects duplicates, :func:`get_pass` lists the valid names on a typo);
:func:`run_passes` runs a pipeline: it checks every pass's inputs are there before running
anything, times each pass (a pass's own sub-steps timed with ``state.report.timed`` are not
counted twice), attaches its notes, and, with ``verify=True``, checks the IR invariants of
every field a pass provided, naming the pass and the property that broke.

Example::

    >>> from hmir.pipeline.manager import list_passes
    >>> import hmir                                   # registers the built-in passes
    >>> {"lower", "align_depth", "match", "fuse", "emit", "repair"} <= set(list_passes())
    True
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar

from hmir.errors import HMIRError, MergeError, VerificationError
from hmir.ir.verify import verify as verify_ir
from hmir.pipeline.state import FIELDS, INPUTS, MergeState


@dataclass(frozen=True)
class NoOptions:
    """The options of a pass that has none."""


@dataclass
class Out:
    """What a pass returns: new values of (some of) its ``provides`` fields, and report notes."""

    values: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Pass:
    """Base class of a pass. Subclasses set ``name``, ``requires``, ``provides`` and ``options``
    and implement :meth:`run`; :meth:`skip` says why a pass does nothing on a state (None: it runs).
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[type] = NoOptions
    doc: ClassVar[str] = ""

    def skip(self, state: MergeState) -> str | None:
        return None

    def run(self, state: MergeState, options) -> Out:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<pass {self.name}: {', '.join(self.requires)} -> {', '.join(self.provides)}>"


PASSES: dict[str, Pass] = {}


def register_pass(p: Pass, *, override: bool = False) -> Pass:
    """Add a pass to the registry (an instance of a :class:`Pass` subclass)."""
    if not p.name:
        raise HMIRError(f"{type(p).__name__} has no name")
    if p.name in PASSES and not override:
        raise HMIRError(f"a pass named {p.name!r} is already registered "
                        f"({type(PASSES[p.name]).__name__}); pass override=True to replace it")
    unknown = sorted(set(p.requires + p.provides) - FIELDS)
    if unknown:
        raise HMIRError(f"pass {p.name!r} names fields MergeState does not have: {unknown}; "
                        f"valid fields: {sorted(FIELDS)}")
    PASSES[p.name] = p
    return p


def get_pass(name: str) -> Pass:
    if name not in PASSES:
        raise MergeError(f"unknown pass {name!r}; registered passes: {list_passes()}")
    return PASSES[name]


def list_passes() -> list[str]:
    """Names of the registered passes, in registration order."""
    return list(PASSES)


def check_pipeline(names: list[str]) -> list[Pass]:
    """The passes of a pipeline, checked before anything runs: every field a pass requires is an
    input of the merge or provided by an earlier pass."""
    passes = [get_pass(n) for n in names]
    have = set(INPUTS)
    for p in passes:
        missing = [f for f in p.requires if f not in have]
        if missing:
            by = {f: [q.name for q in PASSES.values() if f in q.provides] for f in missing}
            raise MergeError(f"pipeline {names}: pass {p.name!r} requires {missing}, which no "
                             f"earlier pass provides (provided by: {by})")
        have.update(p.provides)
    return passes


RELEASED = {"stats": {}, "merged": None}   # large fields dropped once no later pass requires them


def run_passes(state: MergeState, names: list[str], *, verify: bool = False,
               stop_after: str | None = None, keep: tuple[str, ...] = ()) -> MergeState:
    """Run the passes ``names`` in order on ``state``; returns the final state.

    ``stop_after``: the name of the last pass to run (to inspect, e.g., the matches). The
    statistics (O(width²) per space) and the merged state dict (held by the module once emitted)
    are released as soon as no later pass of ``names``
    requires them, unless ``keep`` names them.
    """
    passes = check_pipeline(names)
    if stop_after is not None and stop_after not in names:
        raise MergeError(f"stop_after={stop_after!r} is not in the pipeline {names}")
    for k, p in enumerate(passes):
        why = p.skip(state)
        if why is not None:
            state.report.passes.append((p.name, f"skipped: {why}"))
        else:
            state = _run_one(p, state, verify)
        later = {f for q in passes[k + 1:] for f in q.requires}
        drop = {f: v for f, v in RELEASED.items() if f not in later and f not in keep}
        if drop:
            state = replace(state, **drop)
        if p.name == stop_after:
            break
    return state


def _run_one(p: Pass, state: MergeState, verify: bool) -> MergeState:
    timings = state.report.timings
    before = sum(timings.values())
    t0 = time.perf_counter()
    opts = state.option(p.name, None)
    if opts is None:
        opts = p.options()
    elif not isinstance(opts, p.options):
        raise MergeError(f"pass {p.name!r} takes {p.options.__name__}, got {type(opts).__name__}")
    out = p.run(state, opts)
    spent = time.perf_counter() - t0 - (sum(timings.values()) - before)
    timings[p.name] = timings.get(p.name, 0.0) + spent
    extra = sorted(set(out.values) - set(p.provides))
    if extra:
        raise MergeError(f"pass {p.name!r} returned {extra}, which it does not declare in "
                         f"provides {list(p.provides)}")
    state.report.notes.extend(out.notes)
    state.report.passes.append((p.name, "ran"))
    state = replace(state, **out.values)
    if verify:
        check_state(state, p.name, out.values)
    return state


def _check_irs(state: MergeState) -> None:
    for ir in state.irs:
        verify_ir(ir)


def _check_pairs(state: MergeState) -> None:
    ir_a, ir_b = state.irs
    ids_a, ids_b = {s.id for s in ir_a.spaces}, {s.id for s in ir_b.spaces}
    for p in state.pairs:
        if p.a not in ids_a or p.b not in ids_b:
            raise VerificationError(f"pair {p} names a space that is not in the IRs")


def _check_matches(state: MergeState) -> None:
    ir_a, ir_b = state.irs
    for p, m in zip(state.pairs, state.matches, strict=True):
        n = ir_a.space(p.a).n + ir_b.space(p.b).n
        if tuple(m.M.shape) != (m.r, n) or tuple(m.U.shape) != (n, m.r):
            raise VerificationError(f"space '{ir_a.space(p.a).name}': merge matrix {tuple(m.M.shape)}"
                                    f" and unmerge {tuple(m.U.shape)} do not fit r={m.r}, nA+nB={n}")


def _check_merged(state: MergeState) -> None:
    if not state.widths:
        verify_ir(state.irs[0], state.merged)


def _check_absent(state: MergeState) -> None:
    for ir, ids in zip(state.irs, state.absent):
        bad = set(ids) - {s.id for s in ir.spaces}
        if bad:
            raise VerificationError(f"{ir.name}: absent spaces {sorted(bad)} are not in its IR")


CHECKS: dict[str, Callable[[MergeState], None]] = {  # field → the property checked after a pass
    "irs": _check_irs, "pairs": _check_pairs, "matches": _check_matches, "merged": _check_merged,
    "absent": _check_absent,
}


def check_state(state: MergeState, after: str, provided) -> None:
    """Run the checks of every field the pass ``after`` provided; names the pass on a failure."""
    for f in provided:
        if f in CHECKS and getattr(state, f) is not None:
            try:
                CHECKS[f](state)
            except VerificationError as e:
                raise VerificationError(f"after pass {after!r}, the {f!r} check failed: {e}") from e
