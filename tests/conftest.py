"""Shared helpers: random-but-nontrivial weights, real architectures, error metrics."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn

# every merge in the suite checks the IR invariants after every pass (hmir.run_pipeline's verify)
os.environ.setdefault("HMIR_VERIFY", "1")


def slow_except(values, *fast) -> list:
    """``values`` for ``pytest.mark.parametrize``, each marked ``slow`` unless it is in ``fast``.

    ``pytest -m "not slow"`` (the fast tier) then runs only the ``fast`` cases. A value that is a
    tuple (several argnames) is named by its first item.
    """
    values = list(values)
    key = [v[0] if isinstance(v, tuple) else v for v in values]
    unknown = [f for f in fast if f not in key]
    assert not unknown, f"slow_except: {unknown} are not among {key}"
    return [v if k in fast else pytest.param(*(v if isinstance(v, tuple) else (v,)),
                                             marks=pytest.mark.slow)
            for k, v in zip(key, values)]


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` in eval mode whose norm affine params and running stats are random.

    Default inits (BN weight 1, bias 0, mean 0, var 1) would hide a wrongly permuted norm.
    """
    g = torch.Generator().manual_seed(seed)
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, t in m.state_dict().items():
            if not t.dtype.is_floating_point:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean") or (name.endswith("bias") and t.dim() == 1):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif name.endswith("weight") and t.dim() == 1:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    return m.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


def torchvision_model(name: str, **kw) -> nn.Module:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return getattr(tv.models, name)(weights=None, **kw)


def state_snapshot(model: nn.Module):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: m.training for n, m in model.named_modules()})


def assert_unchanged(model: nn.Module, snap) -> None:
    state, flags = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert torch.equal(now[k], state[k]), f"{k} was modified"
    assert {n: m.training for n, m in model.named_modules()} == flags
