"""Parity of an ONNX session with the torch module it was exported from.

Each output is compared as ``(max |onnx - torch|, max |torch|)``: the second is the output's
scale, against which :func:`~hmir.backend.onnx_export.export_onnx` judges the first.

Example::

    >>> _abs_diff(np.array([1.0, 2.0]), np.array([1.0, 2.5])), _scale(np.array([-3.0, np.inf]))
    (0.5, 3.0)
"""
from __future__ import annotations

import logging
from pathlib import Path  # noqa: F401  (the doctest writes a file)
from typing import Any

import numpy as np
import onnx  # noqa: F401  (the doctest builds a model with onnx.parser)
import onnxruntime as ort
import torch
import torch.nn as nn

from hmir.errors import ExportError

logger = logging.getLogger(__name__)
HINT = (
    "Hint: the module must be traceable by torch.export (no data-dependent control "
    "flow) and must not hard-code the batch size (use x.flatten(1), not x.view(2, -1))."
)


def flatten(out: Any) -> list[torch.Tensor]:
    """The tensors of a module output (tensor, tuple/list or dict), in ONNX order.

    Example::

        >>> len(flatten((torch.ones(1), [torch.ones(2)])))
        2
    """
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flatten(o)]
    raise ExportError(f"cannot compare a module output of type {type(out).__name__}")


def compare(session: ort.InferenceSession, model: nn.Module,
             x: torch.Tensor) -> list[tuple[float, float]]:
    """``(max |onnx - torch|, max |torch|)`` of every output of ``session`` and ``model`` on ``x``.

    Example::

        >>> import tempfile
        >>> from hmir.backend.onnx_export import _session
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = Path(tmp.name, "relu.onnx")
        >>> onnx.save(onnx.parser.parse_model('''<ir_version: 8, opset_import: ["" : 18]>
        ...     relu (float[batch, 4] x) => (float[batch, 4] y) { y = Relu(x) }'''), path)
        >>> compare(_session(path), nn.ReLU(), -torch.ones(3, 4))
        [(0.0, 0.0)]
        >>> compare(_session(path), nn.Identity(), -torch.ones(3, 4))     # ReLU(-1) vs -1
        [(1.0, 1.0)]
        >>> tmp.cleanup()
    """
    try:
        with torch.no_grad():
            expected = [t.numpy() for t in flatten(model(x))]
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    except Exception as e:
        raise ExportError(f"a batch of {x.shape[0]} fails in torch or onnxruntime: "
                          f"{type(e).__name__}: {e}\n{HINT}") from e
    if len(got) != len(expected):
        logger.warning("ONNX model has %d outputs, torch %d", len(got), len(expected))
        return [(float("inf"), 0.0)]
    return [(_abs_diff(np.asarray(g), e), _scale(e)) for g, e in zip(got, expected)]


def _scale(t: np.ndarray) -> float:
    """``max |t|`` over the finite entries (0 for an empty or all-non-finite output)."""
    a = np.abs(t.astype(np.float64))
    a = a[np.isfinite(a)]
    return float(a.max()) if a.size else 0.0


def _abs_diff(got: np.ndarray, expected: np.ndarray) -> float:
    """Max |got - expected|; NaN/inf count as equal only where both agree, shapes must match.

    Example::

        >>> _abs_diff(np.array([1.0, np.nan]), np.array([1.5, np.nan]))
        0.5
    """
    if got.shape != expected.shape:
        logger.warning("ONNX output shape %s != torch shape %s", got.shape, expected.shape)
        return float("inf")
    if got.size == 0:
        return 0.0
    a, b = got.astype(np.float64), expected.astype(np.float64)
    with np.errstate(invalid="ignore"):
        d = np.where(a == b, 0.0, np.abs(a - b))
    d[np.isnan(a) & np.isnan(b)] = 0.0
    return float(np.nan_to_num(d, nan=np.inf).max())

