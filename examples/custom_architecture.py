"""Adding a custom architecture: register a rule for your own module, then merge.

``TransposedLinear`` is a layer hmir has never seen: its weight is stored (in, out) and
multiplied with ``@``. Without a rule, fx traces into it and lowering stops with an
UnsupportedOpError at the ``x @ self.weight_t`` line, saying how to register a rule. The
rule is data: which weight dim holds the output units, which the input units, and which
other parameters are per output unit. ``Swish`` is an elementwise module.

Run:  python examples/custom_architecture.py
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from hmir import compile_merge
from hmir.frontends import register_module, rules


class TransposedLinear(nn.Module):
    """A linear layer that stores its weight as (in_features, out_features)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(torch.randn(n_in, n_out) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.gain = nn.Parameter(torch.ones(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.weight_t + self.bias) * self.gain


class Swish(nn.Module):
    """An elementwise activation written as a module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class CustomNet(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.fc1 = TransposedLinear(16, width)
        self.act = Swish()
        self.fc2 = TransposedLinear(width, width)
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


def register() -> None:
    """Declare the custom modules: weight dim 1 = output units, dim 0 = input units."""
    register_module(TransposedLinear, rules.ParamOp(in_dim=-1, weight="weight_t", w_out=1, w_in=0,
                                                    bias="bias", extra_out=("gain",)),
                    override=True)
    register_module(Swish, rules.Pointwise(), override=True)


def main() -> float:
    register()
    torch.manual_seed(0)
    a, b = CustomNet(), CustomNet()
    data = [torch.randn(64, 16) for _ in range(4)]
    result = compile_merge(a, b, data, method="zip", progress=False)
    print(result.report)
    same = compile_merge(a, copy.deepcopy(a), data, method="zip", progress=False).module
    x = torch.randn(8, 16)
    with torch.no_grad():
        err = float((same(x) - a(x)).abs().max())
    print(f"merge(A, A) reproduces A: max abs diff {err:.2e}")
    return err


if __name__ == "__main__":
    main()
