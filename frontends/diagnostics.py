"""Error messages that name the model, the graph node, its source line and what to do.

Example::

    >>> import torch.fx as fx, torch.nn as nn
    >>> from hmir.errors import UnsupportedOpError
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    >>> relu = list(gm.graph.nodes)[2]
    >>> err = node_error(UnsupportedOpError, "model a", relu, "has no rule", hint="register one")
    >>> print(err)
    model a: node '_1' (call_module 1) has no rule
      what to do: register one
"""
from __future__ import annotations

import re
import traceback
import types

import torch.fx as fx

from hmir.errors import HMIRError

_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


def source_line(node: fx.Node | None) -> str:
    """The user's source line that created ``node`` ('file:line: code'), or ''."""
    trace = getattr(node, "stack_trace", None) if node is not None else None
    if not trace:
        return ""
    frames = _FRAME.findall(trace)
    if not frames:
        return trace.strip().splitlines()[-1]
    user = [f for f in frames if "/torch/" not in f[0].replace("\\", "/")]
    file, line, func, code = (user or frames)[-1]
    return f"{file}:{line} in {func}: {code.strip()}"


def describe(node: fx.Node) -> str:
    """A short description of a node: its name, opcode and target."""
    target = node.target
    if not isinstance(target, str):
        target = getattr(target, "__qualname__", None) or getattr(target, "__name__", repr(target))
        module = getattr(node.target, "__module__", None)
        if module and not isinstance(node.target, str):
            target = f"{module}.{target}"
    return f"node '{node.name}' ({node.op} {target})"


def node_error(cls: type[HMIRError], model: str, node: fx.Node | None, msg: str,
               hint: str = "") -> HMIRError:
    """Build an error of class ``cls`` about ``node`` of ``model``."""
    parts = [f"{model}: "]
    if node is not None:
        parts.append(f"{describe(node)} {msg}")
        src = source_line(node)
        if src:
            parts.append(f"\n  at {src}")
    else:
        parts.append(msg)
    if hint:
        parts.append(f"\n  what to do: {hint}")
    return cls("".join(parts))


def user_frame(tb: types.TracebackType | None) -> str:
    """The innermost traceback frame outside torch and hmir ('file:line: code')."""
    best = ""
    for fs in traceback.extract_tb(tb):
        path = fs.filename.replace("\\", "/")
        if "/torch/" in path or "/hmir/" in path or "/frontends/" in path or "/passes/" in path:
            continue
        best = f"{fs.filename}:{fs.lineno} in {fs.name}: {(fs.line or '').strip()}"
    return best
