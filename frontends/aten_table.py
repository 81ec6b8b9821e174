"""The aten rule table: overload packets of torch.export graphs mapped to op rules, as data.

Every rule is one of the semantic kinds of :mod:`hmir.frontends.rules` (pointwise,
spatial, reduce...) or of :mod:`hmir.frontends.aten_rules` /
:mod:`hmir.frontends.head_rules` (parameter ops reading weights from arguments, reshapes
that understand heads, attention). In-place variants (``add_``) share their rule. An op
not in the table is an :class:`~hmir.errors.UnsupportedOpError`, never guessed.

Example::

    >>> import torch
    >>> from hmir.frontends.aten_table import lookup
    >>> lookup(torch.ops.aten.linear.default).name
    'linear'
"""
from __future__ import annotations

import operator

import torch

from hmir.errors import HMIRError
from hmir.frontends.aten_fused_rules import FUSED_RULES
from hmir.frontends.aten_index_rules import INDEX_RULES
from hmir.frontends.aten_param_rules import Conv, Embedding, Linear, Norm
from hmir.frontends.aten_rules import APointwise, Expand, Featureless, NoHeads
from hmir.frontends.aten_select_rules import ACat, Select, SliceRule
from hmir.frontends.aten_shuffle_rules import SHUFFLE_RULES
from hmir.frontends.aten_token_rules import TOKEN_RULES
from hmir.frontends.head_rules import APermute, AReshape, Attention, MatMul
from hmir.frontends.rules import Meta, Spatial
from hmir.frontends.shape_rules import Reduce

aten = torch.ops.aten
PW, META, FREE = APointwise(), Meta(), Featureless()


def _with_inplace(names: str, rule) -> dict:
    out = {}
    for n in names.split():
        for variant in (n, n + "_"):
            if hasattr(aten, variant):
                out[getattr(aten, variant)] = rule
    return out


ATEN_RULES: dict[object, object] = {
    **_with_inplace("add sub rsub mul div neg gelu relu relu6 silu tanh sigmoid hardtanh hardswish "
                    "hardsigmoid leaky_relu elu mish softplus erf exp log sqrt rsqrt pow abs "
                    "dropout feature_dropout alpha_dropout contiguous clone alias detach softmax "
                    "_softmax log_softmax _log_softmax _to_copy to type_as lift_fresh_copy "
                    "clamp clamp_min clamp_max ge gt le lt eq ne logical_and logical_or "
                    "logical_not bitwise_and bitwise_or bitwise_not where masked_fill minimum "
                    "maximum", PW),
    **_with_inplace("arange full full_like zeros zeros_like ones ones_like scalar_tensor gather "
                    "index_select cumsum new_ones new_zeros", FREE),
    **{getattr(aten, n): NoHeads(Spatial()) for n in (
        "adaptive_avg_pool1d", "adaptive_avg_pool2d", "avg_pool1d", "avg_pool2d", "max_pool1d",
        "max_pool2d", "upsample_nearest2d", "upsample_bilinear2d")},
    **{getattr(aten, n): NoHeads(Reduce()) for n in ("mean", "sum", "amax")},
    aten.linear: Linear(),
    **{getattr(aten, n): Conv() for n in ("conv1d", "conv2d", "conv3d")},
    aten.layer_norm: Norm(),
    aten.batch_norm: Norm(dim=1, params=(1, 2, 3, 4), shape_arg=None),
    aten.embedding: Embedding(),
    aten.expand: Expand(),
    aten.select: Select(),
    aten.slice: SliceRule(),
    aten.cat: ACat(),
    aten.concat: ACat(),
    **{getattr(aten, n): AReshape() for n in ("view", "reshape", "_unsafe_view")},
    aten.unflatten: AReshape(sizes_arg=2),
    **{getattr(aten, n): AReshape(sizes_arg=None) for n in ("flatten", "unsqueeze", "squeeze")},
    **{getattr(aten, n): APermute() for n in ("permute", "transpose", "t")},
    aten.scaled_dot_product_attention: Attention(),
    aten.matmul: MatMul(),
    aten.sym_size: META,
    aten.sym_numel: META,
    aten._assert_tensor_metadata: META,
    aten._assert_scalar: META,
    aten.sym_constrain_range_for_size: META,
    **{f: META for f in (operator.mul, operator.add, operator.sub, operator.floordiv,
                         operator.truediv, operator.getitem, torch.sym_int, torch.sym_float)},
    **INDEX_RULES,
    **TOKEN_RULES,
    **SHUFFLE_RULES,
    **FUSED_RULES,                  # last: its getitem hands out the pieces of a split
}


def lookup(target):
    """The rule for an aten graph node's target (an OpOverload or a Python function), or None."""
    key = getattr(target, "overloadpacket", target)
    try:
        return ATEN_RULES.get(key)
    except TypeError:
        return None


def register_aten(packet, rule, *, override: bool = False) -> None:
    """Lower every overload of ``packet`` (e.g. ``torch.ops.aten.cumsum``) with ``rule``.

    Example: ``register_aten(torch.ops.aten.mish, APointwise())``.
    """
    if not hasattr(rule, "apply"):
        raise HMIRError(f"an aten rule must have an apply(ctx) method; got {rule!r}")
    if packet in ATEN_RULES and not override:
        raise HMIRError(f"a rule for {packet} is already registered ({ATEN_RULES[packet].name}); "
                        f"pass override=True to replace it")
    ATEN_RULES[packet] = rule
