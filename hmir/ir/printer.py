"""A readable text form of a :class:`~hmir.ir.MergeIR`.

Example::

    >>> import torch.nn as nn
    >>> from hmir.frontends import lower
    >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(),
    ...                     nn.Linear(16 * 2 * 2, 10))
    >>> ir = lower(net, torch.randn(2, 3, 4, 4), name="model a")
    >>> print(format_ir(ir))
    MergeIR 'model a' (fx): 3 spaces, 2 fixed
      %0 input:_0:1  width 3  FIXED (model input)
          in  0.weight[1]
      %1 _0  width 16
          out 0.weight[0]  0.bias[0]  1.weight[0]  1.bias[0]  1.running_mean[0]  1.running_var[0]
          in  4.weight[1](×4)
          observe _2@1
      %2 _4  width 10  FIXED (model output)
          out 4.weight[0]  4.bias[0]
      no feature dim: 1.num_batches_tracked
"""
from __future__ import annotations


def _fmt_slice(sl) -> str:
    extra = []
    if sl.offset:
        extra.append(f"+{sl.offset}")
    if sl.inner > 1:
        extra.append(f"×{sl.inner}")
    if sl.outer > 1:
        extra.append(f"outer {sl.outer}")
    if sl.grouped:
        extra.append("grouped")
    return f"{sl.param}[{sl.dim}]" + (f"({', '.join(extra)})" if extra else "")


def format_space(s) -> str:
    head = f"  %{s.id} {s.name}  width {s.width}"
    if s.group_size > 1:
        head += f"  groups {s.groups}×{s.group_size} (class %{s.group_class})"
    if s.fixed:
        head += f"  FIXED ({s.fixed_reason})"
    lines = [head]
    for role, label in (("out", "out"), ("in", "in ")):
        sl = [_fmt_slice(x) for x in s.slices if x.role == role]
        if sl:
            lines.append(f"      {label} " + "  ".join(sl))
    if s.joins:
        lines.append("      joins " + " ".join(s.joins))
    if s.points:
        lines.append("      observe " + " ".join(f"{p.node}@{p.dim}" + (f"+{p.offset}" if p.offset else "")
                                             for p in s.points))
    return "\n".join(lines)


def format_ir(ir) -> str:
    """Render every space with its slices, joins and observation points."""
    fixed = sum(s.fixed for s in ir.spaces)
    lines = [f"MergeIR '{ir.name}' ({ir.frontend}): {len(ir.spaces)} spaces, {fixed} fixed"]
    lines += [format_space(s) for s in ir.spaces]
    if ir.unsliced:
        lines.append("  no feature dim: " + ", ".join(sorted(ir.unsliced)))
    if ir.ties:
        lines.append("  tied: " + ", ".join(f"{a} = {c}" for a, c in sorted(ir.ties.items())))
    return "\n".join(lines)
