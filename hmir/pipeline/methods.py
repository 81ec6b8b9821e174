"""Merge methods as a registry: each declares its parameters, its passes and what it needs.

A :class:`MergeMethod` names its parameters (:class:`Param`: default, allowed range, doc), whether
it is elastic (merges spaces of different widths to any width), whether it matches on
activations, whether grouped spaces are aligned as whole groups first, and the pipeline of passes
it runs. ``solve(sim, nA, nB, params, r) -> Match`` matches one free space from its similarity
matrix. :func:`resolve` checks a user's options against the chosen method: an option the method
does not use is an error that names the methods that do; a typo in a name lists the valid ones.

Example::

    >>> from hmir.pipeline.methods import get_method, resolve
    >>> get_method("zip").elastic, sorted(get_method("zip").params)
    (True, ['alpha', 'beta', 'similarity_alpha'])
    >>> resolve("permute", {})
    {'similarity_alpha': None}
    >>> resolve("avg", {"alpha": 0.3})          # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    hmir.errors.MergeError: alpha has no effect with method='avg'; it is a parameter of method(s) ['zip']...
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from hmir.algorithms.matching import Match, match_avg, match_permute, match_zip
from hmir.errors import HMIRError, MergeError

ACTIVATION_PASSES = ("lower", "structure", "align_depth", "pair", "observe", "match", "fuse",
                     "emit", "repair")
WEIGHT_PASSES = ("lower", "structure", "align_depth", "pair", "weight_match", "interpolate", "emit",
                 "repair")


@dataclass(frozen=True)
class Param:
    """One parameter of a method: ``default``, an inclusive numeric range ``(lo, hi)`` or None,
    whether ``None`` is allowed, and a one-line doc."""

    default: Any
    range: tuple[float, float] | None = None
    doc: str = ""
    optional: bool = False
    check: Callable[[Any], str | None] | None = None     # extra check: an error text or None

    def validate(self, method: str, name: str, value) -> None:
        if value is None and self.optional:
            return
        if self.range is not None:
            lo, hi = self.range
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise MergeError(f"{name} must be {'None or a number ' if self.optional else ''}in "
                                 f"[{lo:g}, {hi:g}], got {value!r} ({self.doc}; method {method!r})")
        if self.check is not None and (msg := self.check(value)):
            raise MergeError(f"{name}={value!r} (method {method!r}): {msg}")


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: its name, parameters, pipeline and how it matches one free space."""

    name: str
    doc: str
    params: dict[str, Param] = field(default_factory=dict)
    passes: tuple[str, ...] = ACTIVATION_PASSES
    elastic: bool = False
    needs_activations: bool = True
    group_align: bool = True
    solve: Callable[..., Match] | None = None


METHODS: dict[str, MergeMethod] = {}


def register_method(m: MergeMethod, *, override: bool = False) -> MergeMethod:
    """Add a merge method (``compile_merge(..., method=m.name)`` then uses it)."""
    if m.name in METHODS and not override:
        raise HMIRError(f"a merge method named {m.name!r} is already registered; pass "
                        f"override=True to replace it")
    if "match" in m.passes and m.solve is None:
        raise HMIRError(f"method {m.name!r} runs the match pass but has no solve function")
    METHODS[m.name] = m
    return m


def unregister_method(name: str) -> None:
    get_method(name)
    del METHODS[name]


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise MergeError(f"unknown merge method {name!r}; valid methods: {sorted(METHODS)}")
    return METHODS[name]


def users_of(option: str) -> list[str]:
    """The methods that declare a parameter named ``option``."""
    return sorted(n for n, m in METHODS.items() if option in m.params)


def resolve(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """The parameters of method ``name``: ``given`` checked, defaults filled in."""
    m = get_method(name)
    for key, value in given.items():
        if key not in m.params:
            users = users_of(key)
            if users:
                raise MergeError(f"{key} has no effect with method={name!r}; it is a "
                                 f"parameter of method(s) {users}, use one of those or drop it")
            valid = sorted({p for mm in METHODS.values() for p in mm.params})
            raise MergeError(f"unknown option {key!r} for compile_merge; method parameters: "
                             f"{valid} (method {name!r} takes {sorted(m.params)})")
        m.params[key].validate(name, key, value)
    return {k: given.get(k, p.default) for k, p in m.params.items()}


SIMILARITY_ALPHA = Param(None, (0, 1), "the activation share of the dual-space similarity; "
                         "ZipIt's decay is 'alpha'", optional=True)


def _layers(value) -> str | None:
    ok = value is None or (not isinstance(value, str) and all(isinstance(v, str) for v in value))
    return None if ok else "layers must be None or a list of module-name prefixes"


register_method(MergeMethod(
    "avg", "plain averaging of corresponding units (no alignment)",
    solve=lambda sim, nA, nB, params, r: match_avg(nA, nB, corr=sim), group_align=False))
register_method(MergeMethod(
    "permute", "Hungarian matching on activation correlation (git re-basin's activation matching)",
    params={"similarity_alpha": SIMILARITY_ALPHA},
    solve=lambda sim, nA, nB, params, r: match_permute(sim, nA, nB)))
register_method(MergeMethod(
    "zip", "ZipIt-style greedy zipping, elastic to any merged width",
    params={"alpha": Param(0.5, (0, 1), "decay of a merged feature's similarity"),
            "beta": Param(0.5, (0, 1), "budget of within-model merges"),
            "similarity_alpha": SIMILARITY_ALPHA},
    elastic=True,
    solve=lambda sim, nA, nB, params, r: match_zip(sim, nA, nB, r, alpha=params["alpha"],
                                                   beta=params["beta"])))
register_method(MergeMethod(
    "mal", "Model Assembly Learning: zero-padded weight matching of B onto A, then "
    "(1-lam)*W_A + lam*P(W_B) in A's architecture",
    params={"lam": Param(0.5, (0, 1), "the share of aligned B"),
            "layers": Param(None, None, "module-name prefixes to merge (None: all)", optional=True,
                            check=_layers)},
    passes=WEIGHT_PASSES, needs_activations=False))
