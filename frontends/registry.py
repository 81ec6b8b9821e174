"""The rule registry: module types, functions and method names mapped to op rules, as data.

Users add their own architectures by registering a rule for their module type; the module
then becomes a leaf of the trace and lowers through that rule.

Example::

    >>> import torch.nn as nn
    >>> from hmir.frontends import register_module, rules
    >>> class Scale(nn.Module):
    ...     def __init__(self, c):
    ...         super().__init__(); self.scale = nn.Parameter(torch.ones(c))
    ...     def forward(self, x):
    ...         return x * self.scale[:, None, None]
    >>> register_module(Scale, rules.Affine(dim=1, params=("scale",)))
    >>> from hmir.frontends import lower, unregister_module
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), Scale(4), nn.Conv2d(4, 2, 1))
    >>> ir = lower(net, torch.randn(2, 3, 5, 5))
    >>> ir.slices_of("1.scale")                # the gain moves with the conv's channels
    [Slice(param='1.scale', dim=0, space=1, role='out', offset=0, inner=1, outer=1, grouped=False)]
    >>> register_module(Scale, rules.Pointwise())
    Traceback (most recent call last):
        ...
    hmir.errors.HMIRError: a rule for module <class '...Scale'> is already registered (affine);
    pass override=True to replace it
    >>> unregister_module(Scale)
"""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from hmir.errors import HMIRError
from hmir.frontends.rules import Affine, GetItem, LayerNormRule, Meta, ParamOp, Pointwise, Spatial
from hmir.frontends.shape_rules import Cat, Flatten, FNorm, Permute, Reduce, Reshape

PW, SP, META = Pointwise(), Spatial(), Meta()
CONV = ParamOp(in_dim=1, groups="groups", name="conv")
LINEAR = ParamOp(in_dim=-1, name="linear")
BATCH_NORM = Affine(dim=1, params=("weight", "bias", "running_mean", "running_var"),
                    unsliced=("num_batches_tracked",), name="batch_norm")
GROUP_NORM = Affine(dim=1, num_groups="num_groups", name="group_norm")

MODULE_RULES: dict[type, object] = {
    **{t: CONV for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d)},
    nn.Linear: LINEAR,
    **{t: BATCH_NORM for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)},
    nn.LayerNorm: LayerNormRule(),
    nn.GroupNorm: GROUP_NORM,
    **{t: PW for t in (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
                       nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.ELU, nn.Mish, nn.Softplus,
                       nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, nn.Softmax,
                       nn.LogSoftmax)},
    **{t: SP for t in (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
                       nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d,
                       nn.AdaptiveMaxPool2d, nn.Upsample)},
    nn.Flatten: Flatten(),
}

FUNCTION_RULES: dict[object, object] = {
    **{f: PW for f in (operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
                       operator.isub, operator.imul, operator.neg, torch.add, torch.sub,
                       torch.mul, torch.div, torch.relu, torch.sigmoid, torch.tanh, F.relu,
                       F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.hardtanh,
                       F.leaky_relu, F.elu, F.dropout, F.sigmoid, F.softmax, F.log_softmax,
                       torch.softmax, torch.addcmul, torch.pow, operator.pow, operator.floordiv,
                       operator.mod, operator.eq, operator.ne, operator.lt, operator.le,
                       operator.gt, operator.ge)},
    **{f: SP for f in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d, F.max_pool2d,
                       F.adaptive_avg_pool1d, F.max_pool1d, F.avg_pool1d, F.interpolate)},
    torch.flatten: Flatten(),
    torch.reshape: Reshape(),
    torch.cat: Cat(),
    torch.permute: Permute(),
    torch.transpose: Permute(),
    torch.concat: Cat(),
    torch.mean: Reduce(),
    torch.sum: Reduce(),
    torch.amax: Reduce(),
    operator.getitem: GetItem(),
    getattr: META,
    torch._assert: META,
    F.layer_norm: FNorm(),
    F.group_norm: FNorm(dim=1, shape_arg=None, groups_arg=1),
}

METHOD_RULES: dict[str, object] = {
    **{m: PW for m in ("relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "detach",
                       "add", "add_", "mul", "mul_", "sub", "div", "softmax", "float")},
    "flatten": Flatten(), "view": Reshape(), "reshape": Reshape(), "reshape_as": Reshape(),
    "mean": Reduce(), "sum": Reduce(), "amax": Reduce(),
    "permute": Permute(), "transpose": Permute(),
    "size": META, "dim": META, "numel": META,
}

try:  # torchvision's stochastic depth: identity in eval, row dropout in training
    from torchvision.ops import StochasticDepth, stochastic_depth

    MODULE_RULES[StochasticDepth] = PW
    FUNCTION_RULES[stochastic_depth] = PW
except ImportError:  # pragma: no cover - torchvision is optional for the core
    pass

_TABLES = {"module": MODULE_RULES, "function": FUNCTION_RULES, "method": METHOD_RULES}


def _register(kind: str, key, rule, override: bool) -> None:
    if not hasattr(rule, "apply"):
        raise HMIRError(f"a {kind} rule must have an apply(ctx) method (see hmir.frontends.rules); "
                        f"got {rule!r}")
    table = _TABLES[kind]
    if key in table and not override:
        raise HMIRError(f"a rule for {kind} {key!r} is already registered ({table[key].name}); "
                        f"pass override=True to replace it")
    table[key] = rule


def register_module(cls: type, rule, *, override: bool = False) -> None:
    """Lower every instance of module type ``cls`` (a trace leaf) with ``rule``.

    Example: ``register_module(MyGate, rules.Pointwise())``.
    """
    _register("module", cls, rule, override)


def register_function(fn, rule, *, override: bool = False) -> None:
    """Lower calls of ``fn`` (e.g. ``torch.nn.functional.mish``) with ``rule``."""
    _register("function", fn, rule, override)


def register_method(name: str, rule, *, override: bool = False) -> None:
    """Lower tensor method calls ``x.<name>(...)`` with ``rule``."""
    _register("method", name, rule, override)


def unregister_module(cls: type) -> None:
    """Remove a module rule (e.g. in tests); unknown types raise HMIRError."""
    if cls not in MODULE_RULES:
        raise HMIRError(f"no rule is registered for module type {cls.__qualname__}")
    del MODULE_RULES[cls]


def lookup(op: str, target, module=None):
    """The rule for an fx node's (op, target), or None."""
    if op == "call_module":
        return MODULE_RULES.get(type(module))
    if op == "call_function":
        try:
            return FUNCTION_RULES.get(target)
        except TypeError:
            return None
    if op == "call_method":
        return METHOD_RULES.get(target)
    return None
