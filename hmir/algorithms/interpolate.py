"""Linear interpolation of A with aligned B, and the loss along it (linear mode connectivity).

``interpolate`` gives ``(1−λ)·W_A + λ·P(W_B)`` for A's float tensors, optionally only under
some module prefixes (MAL's layer-selective merging); ``loss_along_lambda`` evaluates the
mean loss at evenly spaced λ and the barrier ``max_λ L(λ) − (L(0)+L(1))/2``.

Example::

    >>> import tempfile, torch.nn as nn
    >>> from hmir.frontends import lower
    >>> from hmir.harness import zoo
    >>> from hmir.ir.pairing import pair_spaces
    >>> from hmir.passes.weight_match import align_state, weight_match
    >>> a, b, x = zoo.mlp(4, (8,), 3), zoo.mlp(4, (16,), 3), torch.randn(32, 4)
    >>> ir_a, ir_b = lower(a, x, "a"), lower(b, x, "b")
    >>> wm = weight_match(ir_a, ir_b, pair_spaces(ir_a, ir_b), a.state_dict(), b.state_dict())
    >>> aligned = align_state(ir_a, ir_b, b.state_dict(), wm)       # B's weights in A's shapes
    >>> merged = interpolate(a.state_dict(), aligned, 0.5, layers=["1"])   # the first Linear only
    >>> torch.equal(merged["3.weight"], a[3].weight), merged["1.weight"].shape
    (True, torch.Size([8, 4]))
    >>> batches = [(x, torch.randint(3, (32,)))]
    >>> path = loss_along_lambda(a, a.state_dict(), aligned, batches, nn.functional.cross_entropy)
    >>> len(path.losses), path.barrier >= 0
    (21, True)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     plot(path, f"{d}/lmc.png").name
    'lmc.png'
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn

from hmir.errors import MergeError


def _selected(keys: Iterable[str], layers: Iterable[str] | None) -> set[str]:
    """The keys under any prefix of ``layers`` (all keys when None); unknown prefixes raise."""
    keys = list(keys)
    if layers is None:
        return set(keys)
    out: set[str] = set()
    for prefix in [layers] if isinstance(layers, str) else layers:
        hit = {k for k in keys if k == prefix or k.startswith(prefix + ".")}
        if not hit:
            top = sorted({k.split(".")[0] for k in keys})
            raise MergeError(f"no parameter under {prefix!r}; the model's top-level modules: {top}")
        out |= hit
    return out


def interpolate(state_a: dict, aligned_b: dict, lam: float, *,
                layers: Iterable[str] | None = None) -> dict:
    """``(1−λ)·W_A + λ·P(W_B)`` for float tensors (under ``layers`` only); the rest are A's.

    Example::

        >>> a = {"fc.weight": torch.zeros(2), "n": torch.tensor(3)}
        >>> b = {"fc.weight": torch.ones(2), "n": torch.tensor(5)}
        >>> interpolate(a, b, 0.25)
        {'fc.weight': tensor([0.2500, 0.2500]), 'n': tensor(3)}
    """
    chosen = _selected(state_a, layers)
    out = {}
    for k, a in state_a.items():
        if k in chosen and a.is_floating_point():
            if k not in aligned_b:
                raise MergeError(f"the aligned state has no '{k}': build it with align_state")
            out[k] = torch.lerp(a, aligned_b[k].to(device=a.device, dtype=a.dtype), float(lam))
        else:
            out[k] = a.clone()
    return out


@dataclass
class LambdaPath:
    """Mean loss at each λ; ``barrier = max_λ L(λ) − (L(0)+L(1))/2``."""

    lambdas: list[float]
    losses: list[float]
    barrier: float


def _mean_loss(model: nn.Module, data: list, loss_fn: Callable) -> float:
    p = next(model.parameters())
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in data:
            n = len(x)
            total += float(loss_fn(model(x.to(p.device)), y.to(p.device))) * n
            count += n
    return total / count


def loss_along_lambda(model_a: nn.Module, state_a: dict, aligned_b: dict, data: Iterable,
                      loss_fn: Callable, *, points: int = 21, layers: Iterable[str] | None = None,
                      repair: Callable[[nn.Module], object] | None = None) -> LambdaPath:
    """The mean loss over ``data`` (``(x, y)`` batches) at ``points`` λ evenly spaced in [0, 1].

    Evaluated in eval mode on a deep copy of ``model_a`` (never modified); ``repair``, when
    given, is called on each interpolated copy first (e.g. ``lambda m: repair(m, calib)``
    with :func:`hmir.passes.repair.repair`). Batch losses are weighted by batch size.

    Example::

        >>> import torch.nn as nn, torch.nn.functional as F
        >>> a, b = nn.Linear(4, 3), nn.Linear(4, 3)     # B already in A's basis (same shapes)
        >>> x, y = torch.randn(16, 4), torch.randint(3, (16,))
        >>> path = loss_along_lambda(a, a.state_dict(), b.state_dict(), [(x, y)], F.cross_entropy)
        >>> len(path.losses), path.lambdas[10]
        (21, 0.5)
        >>> path.losses[0] == F.cross_entropy(a(x), y).item()
        True
    """
    if points < 2:
        raise MergeError(f"points must be at least 2, got {points}")
    data = list(data)
    if not data:
        raise MergeError("loss_along_lambda needs at least one (x, y) batch")
    model = copy.deepcopy(model_a)
    lambdas = [i / (points - 1) for i in range(points)]
    losses = []
    for lam in lambdas:
        model.load_state_dict(interpolate(state_a, aligned_b, lam, layers=layers))
        if repair is not None:
            repair(model)
        losses.append(_mean_loss(model.eval(), data, loss_fn))
    return LambdaPath(lambdas, losses, max(losses) - (losses[0] + losses[-1]) / 2)


def plot_paths(paths: dict[str, LambdaPath], file: str | Path, *, title: str = "") -> Path:
    """Write a PNG of loss vs λ, one line per path. Example: ``plot_paths({"A→B": p}, "l.png")``."""
    from matplotlib.figure import Figure          # Agg canvas, no pyplot global state

    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    for label, p in paths.items():
        ax.plot(p.lambdas, p.losses, marker="o", markersize=3,
                label=f"{label} (barrier {p.barrier:.3g})")
    ax.set_xlabel("λ  (0: A, 1: aligned B)")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    file = Path(file)
    fig.savefig(file, format="png", dpi=120)
    return file


def plot(path: LambdaPath, file: str | Path, *, label: str = "merge") -> Path:
    """Write a PNG of one path's loss vs λ. Example: ``plot(path, "lmc.png")``."""
    return plot_paths({label: path}, file)
