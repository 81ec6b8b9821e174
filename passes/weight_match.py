"""weight_match: zero-padded generalised permutation of B onto A (Model Assembly Learning).

For every free pair of spaces a partial assignment ``π_s`` gives each of A's ``nA`` units
one of B's ``nB`` units or none (−1). ``P(W_B)`` is B's tensor in A's shape: along every
sliced dim, A's unit i takes B's unit ``π(i)`` (zeros where none). The pass maximises
``Σ ⟨W_A, P(W_B)⟩`` over weights and biases by coordinate descent over spaces: holding the
others fixed the objective is linear in ``π_s``, a rectangular assignment problem, so a
layer wider in A on one dim and narrower on the other (MAL's bidirectional P/Q case) needs
nothing special. Fixed spaces map identity; grouped spaces keep the identity (noted).

Example::

    >>> import torch
    >>> from hmir.harness import zoo
    >>> from hmir.frontends import lower
    >>> a, b, x = zoo.mlp(4, (16, 8), 2), zoo.mlp(4, (16, 8), 2), torch.randn(2, 4)
    >>> ir_a, ir_b = lower(a, x, "a"), lower(b, x, "b")
    >>> pairs = pair_spaces(ir_a, ir_b)
    >>> wm = weight_match(ir_a, ir_b, pairs, a.state_dict(), b.state_dict())
    >>> aligned = align_state(ir_a, ir_b, b.state_dict(), wm)   # A's names and shapes
    >>> wm.history[0] <= wm.history[-1], aligned.keys() == a.state_dict().keys()
    (True, True)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment

from hmir.errors import MergeError
from hmir.ir import MergeIR, Slice
from hmir.ir.pairing import pair_spaces, param_map
from hmir.ir.pairing import SpacePair
from hmir.ir.slicing import slice_index
from hmir.pipeline.manager import Out, Pass, register_pass
from hmir.pipeline.report import SpaceReport


@dataclass
class WeightMatch:
    """The assignments (``perms[A space id][i]`` = B unit or −1) and the objective's history.

    ``history[0]`` is the objective at the identity start, then one entry per space visit.
    """

    perms: dict[int, torch.Tensor]
    history: list[float]
    sweeps: int
    notes: list[str]

    @property
    def objective(self) -> float:
        """The final ``Σ ⟨W_A, P(W_B)⟩``."""
        return self.history[-1]


def identity_partial(n_a: int, n_b: int) -> torch.Tensor:
    """``i ↔ i`` for ``i < min(nA, nB)``, −1 beyond.

    Example: ``identity_partial(3, 2).tolist() == [0, 1, -1]``.
    """
    pm = torch.arange(n_a)
    pm[pm >= n_b] = -1
    return pm


class _Layout:
    """Where each sliced tensor of A and its B counterpart hold every space's units."""

    def __init__(self, ir_a: MergeIR, ir_b: MergeIR, pairs: list[SpacePair]) -> None:
        self.n: dict[int, tuple[int, int]] = {}
        self.entries: dict[str, list[tuple[int, Slice, Slice]]] = {}
        self.identity: dict[int, str] = {}
        for p in pairs:
            sa, sb = ir_a.space(p.a), ir_b.space(p.b)
            self.n[p.a] = (sa.n, sb.n)
            grouped = sa.group_size > 1 or any(x.grouped for x in sa.slices)
            if sa.fixed or grouped:
                self.identity[p.a] = "fixed" if sa.fixed else "grouped"
                if sa.n != sb.n:
                    raise MergeError(f"space '{sa.name}' is {self.identity[p.a]} and has width {sa.n} in "
                                     f"{ir_a.name} but {sb.n} in {ir_b.name}: zero-padding needs equal "
                                     f"widths there")
            for x, y in zip(sa.slices, sb.slices):
                if (x.inner, x.outer) != (y.inner, y.outer):
                    raise MergeError(f"'{x.param}' splits space '{sa.name}' into blocks of {x.inner}×"
                                     f"{x.outer} in {ir_a.name} but {y.inner}×{y.outer} in {ir_b.name}")
                if not x.grouped:            # grouped dims stay identity (equal widths, checked)
                    self.entries.setdefault(x.param, []).append((p.a, x, y))

    def src(self, param: str, dim: int, perms: dict, length: int) -> torch.Tensor:
        """B's index for each of A's entries along ``dim`` (−1: zero)."""
        src = torch.full((length,), -1, dtype=torch.long)
        for sid, x, y in self.entries[param]:
            if x.dim != dim:
                continue
            (n_a, n_b), pm = self.n[sid], perms[sid]
            vals = slice_index(y, n_b)[:, pm.clamp_min(0), :]
            src[slice_index(x, n_a).flatten()] = torch.where((pm >= 0).view(1, -1, 1), vals, -1).flatten()
        return src

    def dims(self, param: str) -> list[int]:
        return sorted({x.dim for _, x, _ in self.entries[param]})

    def map(self, param: str, tb: torch.Tensor, shape: torch.Size, perms: dict) -> torch.Tensor:
        """``P(tb)``: B's tensor in A's ``shape``, zeros where A's unit has no B unit."""
        for dim in self.dims(param):
            src = self.src(param, dim, perms, shape[dim]).to(tb.device)
            pad = torch.cat([tb, tb.new_zeros(tb.shape[:dim] + (1,) + tb.shape[dim + 1:])], dim)
            tb = pad.index_select(dim, torch.where(src < 0, tb.shape[dim], src))
        if tb.shape != shape:
            raise MergeError(f"'{param}' has shape {tuple(tb.shape)} after alignment but A's is "
                             f"{tuple(shape)}: a dim without slices differs in size")
        return tb

    def matched(self, param: str, perms: dict, shape: torch.Size, device) -> dict:
        """Per sliced dim: (A's entries with a B entry, those B entries)."""
        out = {}
        for dim in self.dims(param):
            src = self.src(param, dim, perms, shape[dim])
            keep = (src >= 0).nonzero().flatten()
            out[dim] = (None if len(keep) == len(src) else keep.to(device), src[keep].to(device))
        return out


def _select(t: torch.Tensor, sel: dict, side: int, skip: int | None = None) -> torch.Tensor:
    """``t`` restricted to the matched entries of every sliced dim but ``skip`` (None: all)."""
    for dim, idx in sel.items():
        if dim != skip and idx[side] is not None:
            t = t.index_select(dim, idx[side])
    return t


def _units(t: torch.Tensor, sl: Slice, n: int) -> torch.Tensor:
    """Each unit's slab of ``t`` as one row: (n, everything else)."""
    t = t.movedim(sl.dim, 0)
    if sl.offset == 0 and sl.outer * n * sl.inner == t.shape[0]:
        return t.reshape(sl.outer, n, -1).transpose(0, 1).reshape(n, -1)
    idx = slice_index(sl, n).transpose(0, 1).reshape(-1).to(t.device)
    return t[idx].reshape(n, -1)


class _Problem:
    """The objective ``Σ_p ⟨A_p, P(B_p)⟩`` and its linear cost in one space's assignment."""

    def __init__(self, layout: _Layout, ta: dict, tb: dict) -> None:
        self.layout, self.ta, self.tb = layout, ta, tb
        self.by_space: dict[int, list[tuple[str, Slice, Slice]]] = {}
        for p in ta:
            for sid, x, y in layout.entries[p]:
                self.by_space.setdefault(sid, []).append((p, x, y))
        self.terms: dict[str, float] = {}

    def _sel(self, p: str, perms: dict) -> dict:
        return self.layout.matched(p, perms, self.ta[p].shape, self.ta[p].device)

    def term(self, p: str, perms: dict) -> float:
        """``⟨A_p, P(B_p)⟩``, from the matched entries only (the rest of P(B_p) is zero)."""
        sel, a, b = self._sel(p, perms), self.ta[p], self.tb[p]
        if any(b.shape[d] != a.shape[d] for d in range(a.dim()) if d not in sel):
            raise MergeError(f"'{p}' has shape {tuple(b.shape)} in B and {tuple(a.shape)} in A: a "
                             f"dim without slices differs in size")
        return float(torch.dot(_select(a, sel, 0).reshape(-1), _select(b, sel, 1).reshape(-1)))

    def value(self, perms: dict, changed: int | None = None) -> tuple[float, dict]:
        """The full objective and its terms; with ``changed``, only that space's terms are redone."""
        todo = self.ta if changed is None else {p for p, _, _ in self.by_space.get(changed, [])}
        terms = {**self.terms, **{p: self.term(p, perms) for p in todo}}
        return float(sum(terms.values())), terms

    def cost(self, sid: int, perms: dict) -> torch.Tensor:
        n_a, n_b = self.layout.n[sid]
        any_t = next(iter(self.ta.values()))
        c = torch.zeros(n_a, n_b, dtype=torch.float64, device=any_t.device)
        for p, x, y in self.by_space.get(sid, []):
            sel = self._sel(p, perms)
            a, b = _select(self.ta[p], sel, 0, x.dim), _select(self.tb[p], sel, 1, x.dim)
            c += _units(a, x, n_a) @ _units(b, y, n_b).T
        return c


def _solve(cost: torch.Tensor, cur: torch.Tensor) -> torch.Tensor | None:
    """The best rectangular assignment, or None when it does not beat ``cur``."""
    c = cost.cpu().numpy()
    rows, cols = linear_sum_assignment(c, maximize=True)
    live = (cur >= 0).numpy()
    old = float(c[live.nonzero()[0], cur[live].numpy()].sum())
    new = float(c[rows, cols].sum())
    if new <= old + 1e-12 * max(abs(old), abs(new), 1e-30):
        return None
    out = torch.full_like(cur, -1)
    out[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return out


def _tensors(ir_a, state_a, state_b, names, layout, include_buffers) -> tuple[dict, dict]:
    buffers = {n for n, _ in ir_a.graph_module.named_buffers()}
    ta, tb = {}, {}
    for k, t in state_a.items():
        if k not in layout.entries or (k in buffers and not include_buffers):
            continue
        other = names.get(k, k)
        if other not in state_b:
            raise MergeError(f"{ir_a.name}'s '{k}' has no counterpart '{other}' in B's state dict")
        ta[k] = t.detach().to(torch.float64)
        tb[k] = state_b[other].detach().to(dtype=torch.float64, device=t.device)
    return ta, tb


def weight_match(ir_a: MergeIR, ir_b: MergeIR, pairs: list[SpacePair], state_a: dict, state_b: dict,
                 *, names: dict[str, str] | None = None, max_iter: int = 50, seed: int = 0,
                 include_buffers: bool = False) -> WeightMatch:
    """Coordinate descent over spaces for ``max Σ ⟨W_A, P(W_B)⟩`` (see the module docstring).

    Spaces are visited in a seeded random order per sweep; sweeps stop when no assignment
    changes or after ``max_iter``. ``history`` never decreases.
    """
    names = param_map(ir_a, ir_b, pairs) if names is None else names
    layout = _Layout(ir_a, ir_b, pairs)
    prob = _Problem(layout, *_tensors(ir_a, state_a, state_b, names, layout, include_buffers))
    if not prob.ta:
        raise MergeError(f"{ir_a.name} has no sliced parameters in state_a: nothing to match")
    perms = {sid: identity_partial(*n) for sid, n in layout.n.items()}
    free = [sid for sid in layout.n if sid not in layout.identity]
    notes = [f"space '{ir_a.space(s).name}' is grouped: kept the identity"
             for s, why in layout.identity.items() if why == "grouped"]
    first, prob.terms = prob.value(perms)
    history, g, sweeps, reverted = [first], torch.Generator().manual_seed(seed), 0, 0
    while sweeps < max_iter:
        sweeps, changed = sweeps + 1, False
        for k in torch.randperm(len(free), generator=g).tolist():
            new = _solve(prob.cost(free[k], perms), perms[free[k]])
            if new is not None:
                trial = {**perms, free[k]: new}
                value, terms = prob.value(trial, changed=free[k])
                if value >= history[-1]:
                    perms, prob.terms, changed = trial, terms, True
                else:                         # only when a tensor holds one space on two dims
                    reverted += 1
            history.append(float(sum(prob.terms.values())))
        if not changed:
            break
    if reverted:
        notes.append(f"{reverted} updates reverted (a space on two dims of one tensor: not linear)")
    return WeightMatch(perms, history, sweeps, notes)


def align_state(ir_a: MergeIR, ir_b: MergeIR, state_b: dict, wm: WeightMatch, *,
                names: dict[str, str] | None = None, state_a: dict | None = None) -> dict:
    """``P(W_B)`` for every tensor of A's state dict: A's names, shapes, dtypes and device.

    Sliced tensors (running statistics included) are mapped with ``wm.perms``; A's units
    with no B unit get zeros. Unsliced tensors (``num_batches_tracked``) are copied from
    B's tensor of the same name when the shapes agree, else A's are kept; every name of a
    tied tensor holds one aligned tensor (:mod:`hmir.ir.ties`). ``state_a``
    defaults to the state of ``ir_a.graph_module`` (only its names and shapes are needed).

    Example::

        >>> import torch
        >>> from hmir.harness import zoo
        >>> from hmir.frontends import lower
        >>> a, b, x = zoo.mlp(4, (8,), 2), zoo.mlp(4, (8,), 2), torch.randn(2, 4)
        >>> ir_a, ir_b = lower(a, x, "a"), lower(b, x, "b")
        >>> wm = weight_match(ir_a, ir_b, pair_spaces(ir_a, ir_b), a.state_dict(), b.state_dict())
        >>> aligned = align_state(ir_a, ir_b, b.state_dict(), wm)
        >>> all(aligned[k].shape == v.shape for k, v in a.state_dict().items())
        True
    """
    pairs = pair_spaces(ir_a, ir_b)
    names = param_map(ir_a, ir_b, pairs) if names is None else names
    layout = _Layout(ir_a, ir_b, pairs)
    state_a = ir_a.graph_module.state_dict() if state_a is None else state_a
    out = {}
    for k, a in state_a.items():
        if k in ir_a.ties:
            continue                      # an alias of a tied tensor: its canonical's, below
        if k in layout.entries:
            b = state_b[names.get(k, k)].detach().to(a.device)
            out[k] = layout.map(k, b, a.shape, wm.perms).to(a.dtype)
        elif k in state_b and state_b[k].shape == a.shape:
            out[k] = state_b[k].detach().to(device=a.device, dtype=a.dtype).clone()
        else:
            out[k] = a.detach().clone()
    for alias, canon in ir_a.ties.items():
        if alias in state_a:
            out[alias] = out[canon] if canon in out else state_a[alias].detach().clone()
    return {k: out[k] for k in state_a}


class WeightMatchPass(Pass):
    """MAL's zero-padded weight matching of B onto A (no activations needed)."""

    name = "weight_match"
    requires = ("irs", "pairs")
    provides = ("weight_matching",)

    def run(self, state, options) -> Out:
        ir_a, ir_b = state.irs
        state_a, state_b = ir_a.graph_module.state_dict(), ir_b.graph_module.state_dict()
        wm = weight_match(ir_a, ir_b, state.pairs, state_a, state_b,
                          names=param_map(ir_a, ir_b, state.pairs))
        for p in state.pairs:
            sa, sb = ir_a.space(p.a), ir_b.space(p.b)
            state.report.spaces.append(SpaceReport(sa.name, sa.n, sb.n, sa.n, float("nan"), sa.fixed))
        return Out({"weight_matching": wm},
                   wm.notes + [f"mal: weight matching objective {wm.history[0]:.4g} → "
                               f"{wm.objective:.4g} in {wm.sweeps} sweep(s)"])


register_pass(WeightMatchPass())
