"""Values of a graph that are exactly zero whatever the (finite) input, and an interpreter that
does not compute them.

An inserted zero block (:mod:`hmir.passes.insert`) runs convolutions with all-zero weights:
their outputs are zeros, yet they cost as much as real ones. :func:`zero_nodes` finds such
values from the parameters alone: a conv / linear / norm layer whose parameters are all zero
(its output is 0, a norm's because its scale and shift are 0), and an op that keeps zeros
(ReLU, pooling, dropout, an add of zeros, ...) applied to zeros only.
:class:`ZeroSkipping` runs a graph module like :class:`torch.fx.Interpreter` but gives those
nodes a lazy zero (its shape from a run on the ``meta`` device), made into a real zero tensor
only where a computed node reads it. The values are the same as running the graph (up to the
sign of zero) for finite inputs; an inf or NaN entering a zero layer would have given NaN.

Example::

    >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    >>> with torch.no_grad():
    ...     _ = gm.get_submodule("0").weight.zero_(), gm.get_submodule("0").bias.zero_()
    >>> zero_nodes(gm) == set(gm.graph.nodes) - {gm.graph.find_nodes(op="placeholder")[0],
    ...                                             gm.graph.find_nodes(op="output")[0]}
    True
"""
from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["zero_nodes", "ZeroSkipping"]

_LINEAR = (nn.modules.conv._ConvNd, nn.Linear)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
_KEEPS_ZERO_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh,
                       nn.Identity, nn.Dropout, nn.Flatten, nn.modules.pooling._MaxPoolNd,
                       nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
                       nn.modules.pooling._AdaptiveMaxPoolNd)
_KEEPS_ZERO_FUNCS = {torch.relu, F.relu, torch.flatten, F.dropout, F.adaptive_avg_pool2d,
                     F.max_pool2d, F.avg_pool2d}
_KEEPS_ZERO_METHODS = {"relu", "relu_", "flatten", "view", "reshape"}
_SUMS = {operator.add, operator.iadd, torch.add, "add", "add_"}     # zero only if every term is


def _all_zero(m: nn.Module) -> bool:
    """A layer with parameters, all of them zero (buffers such as running stats may be anything).

    A parameter whose first entry is not zero is not scanned further (trained or random
    weights almost always say so at once; a full ``any()`` reads every layer's weights).
    """
    ps = list(m.parameters(recurse=False))
    return bool(ps) and all(p.numel() == 0 or (not bool(p.reshape(-1)[0]) and not bool(p.any()))
                            for p in ps)


def _zero_layer(m: nn.Module) -> bool:
    if isinstance(m, _NORMS):
        return m.weight is not None and m.bias is not None and _all_zero(m)
    return isinstance(m, _LINEAR) and _all_zero(m)


def _keeps_zero(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Whether ``n`` gives 0 when its tensor inputs (all of them zero) are 0."""
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if isinstance(m, nn.Hardtanh):                 # also ReLU6: clamp to [min, max]
            return m.min_val <= 0 <= m.max_val
        return isinstance(m, _KEEPS_ZERO_MODULES) or (
            isinstance(m, _LINEAR) and (m.bias is None or not bool(m.bias.any())))
    if n.op not in ("call_function", "call_method"):
        return False
    if n.target in _SUMS:                              # x + 1 is not 0: every term must be a node
        return all(isinstance(a, fx.Node) for a in n.args) and not n.kwargs
    return n.target in (_KEEPS_ZERO_FUNCS if n.op == "call_function" else _KEEPS_ZERO_METHODS)


def zero_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes whose value is exactly zero for every finite input (see the module docstring)."""
    zero: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "call_module" and _zero_layer(gm.get_submodule(n.target)):
            zero.add(n)
        elif n.all_input_nodes and all(a in zero for a in n.all_input_nodes) and _keeps_zero(gm, n):
            zero.add(n)
    return zero


class _Zero:
    """A lazy all-zero tensor: a ``meta`` tensor of its shape and dtype, and its device."""

    def __init__(self, meta: torch.Tensor, device: torch.device):
        self.meta, self.device = meta, device

    def real(self) -> torch.Tensor:
        return torch.zeros(self.meta.shape, dtype=self.meta.dtype, device=self.device)


def _real(v):
    return v.real() if isinstance(v, _Zero) else v


def _meta(v):
    if isinstance(v, _Zero):
        return v.meta
    return v.to("meta") if isinstance(v, torch.Tensor) else v


def _signature(tree) -> tuple:
    """What a meta run depends on: the shapes and dtypes of the tensors, the other values."""
    leaves, spec = tree_flatten(tree)
    return (str(spec),) + tuple((tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else repr(v)
                                for v in leaves)


class ZeroSkipping(fx.Interpreter):
    """An :class:`torch.fx.Interpreter` that leaves the :func:`zero_nodes` uncomputed.

    ``run_node`` may return a lazy zero for them (subclasses that look at node values call
    :meth:`value` to get a tensor).
    """

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.zero = zero_nodes(gm)
        self._meta_modules: dict[str, nn.Module] = {}
        self._shapes: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def value(v):
        """A node's value as a real tensor (lazy zeros made real)."""
        return _real(v)

    def fetch_args_kwargs_from_env(self, n: fx.Node):
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        if n in self.zero:
            return args, kwargs
        return tree_map(_real, args), tree_map(_real, kwargs)

    def run_node(self, n: fx.Node):
        if n not in self.zero:
            return super().run_node(n)
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            args, kwargs = tree_map(_meta, args), tree_map(_meta, kwargs)
            key = (n, _signature(args), _signature(kwargs))
            if key not in self._shapes:        # meta kernels can be slow (Python decompositions)
                self._shapes[key] = self._on_meta(n, args, kwargs)
        return _Zero(self._shapes[key], self._device(n))

    def _device(self, n: fx.Node) -> torch.device:
        """Where the node's inputs live (a zero layer's output goes there too)."""
        for a in n.all_input_nodes:
            v = self.env[a]
            if isinstance(v, (torch.Tensor, _Zero)):
                return v.device
        return next(self.module.parameters()).device

    def _on_meta(self, n: fx.Node, args, kwargs) -> torch.Tensor:
        """The node's op run on meta tensors: the output's shape and dtype, no compute."""
        if n.op == "call_module":
            if n.target not in self._meta_modules:
                self._meta_modules[n.target] = _meta_copy(self.module.get_submodule(n.target))
            return self._meta_modules[n.target](*args, **kwargs)
        if n.op == "call_method":
            obj, *rest = args
            return getattr(obj, n.target)(*rest, **kwargs)
        return n.target(*args, **kwargs)


def _meta_copy(m: nn.Module) -> nn.Module:
    """A shallow copy of ``m`` whose parameters and buffers are on the meta device (no data)."""
    clone = copy.copy(m)
    clone._parameters = {k: None if p is None else nn.Parameter(p.detach().to("meta"), p.requires_grad)
                         for k, p in m._parameters.items()}
    clone._buffers = {k: None if b is None else b.to("meta") for k, b in m._buffers.items()}
    clone._modules = {k: None if c is None else _meta_copy(c) for k, c in m._modules.items()}
    return clone
