"""Export a (merged) PyTorch model to ONNX and prove the export matches torch.

The export uses the default ``torch.onnx.export(..., dynamo=True)`` exporter with a
dynamic batch dimension, then checks the file with ``onnx.checker`` and runs it with
onnxruntime on two batch sizes, comparing every output with the torch module. Parity is
judged relative to each output's scale (``max |torch|``): a deep float32 model's outputs
differ from any other float32 evaluation by rounding of that size, whatever their magnitude.

Example::

    >>> import tempfile, torch.nn as nn
    >>> from hmir.backend.onnx_export import export_onnx
    >>> with tempfile.TemporaryDirectory() as d:
    ...     res = export_onnx(nn.Linear(4, 2), torch.randn(2, 4), f"{d}/lin.onnx")
    >>> res.max_abs_diff <= 1e-4, res.max_rel_diff <= 1e-4, res.opset >= 18, res.providers[-1]
    (True, True, True, 'CPUExecutionProvider')
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
import torch.nn as nn

from hmir.backend.onnx_parity import HINT as _HINT
from hmir.backend.onnx_parity import compare
from hmir.errors import ExportError

logger = logging.getLogger(__name__)

__all__ = ["OnnxExport", "export_onnx"]

# Protobuf cannot hold a model over 2 GiB: larger weights go to a ``<path>.data`` file.
_EXTERNAL_DATA_BYTES = 1_800_000_000



@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` produced: ``max_abs_diff`` is the largest |onnx - torch| of
    any output, ``max_rel_diff`` the largest of each output's difference over its scale
    ``max |torch|``.

    Example::

        >>> r = OnnxExport(Path("m.onnx"), 1e-6, ("CPUExecutionProvider",), 18, 0.5, 1e-7)
        >>> r.opset, r.max_rel_diff
        (18, 1e-07)
    """

    path: Path
    max_abs_diff: float
    providers: tuple[str, ...]
    opset: int
    export_seconds: float
    max_rel_diff: float = float("nan")


def export_onnx(
    module: nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike,
    *,
    check: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-6,
    opset: int | None = None,
) -> OnnxExport:
    """Export ``module`` to ONNX at ``path`` with a dynamic batch dimension.

    A CPU float32 eval-mode deep copy is exported; ``module`` itself is not touched.
    The file is checked with ``onnx.checker`` and run with onnxruntime on ``example``
    and on a batch of another size; ``max_abs_diff`` is the largest difference from
    torch over both, ``max_rel_diff`` the largest difference over its output's scale
    ``max |torch|``. With ``check``, an output whose difference exceeds
    ``atol + rtol * scale`` raises :class:`ExportError`.

    Example::

        >>> import tempfile
        >>> net = nn.Sequential(nn.Linear(8, 4), nn.ReLU())
        >>> with tempfile.TemporaryDirectory() as d:
        ...     res = export_onnx(net, torch.randn(1, 8), f"{d}/net.onnx")
        ...     res.path.name, res.path.exists(), res.max_abs_diff < 1e-4
        ('net.onnx', True, True)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = _cpu_eval_copy(module)
    x = _as_batch(example)
    seconds = _run_exporter(model, x, path, opset)
    _check_file(path)
    session = _session(path)
    diffs = compare(session, model, x) + compare(session, model, _other_batch(x))
    diff = max((d for d, _ in diffs), default=0.0)
    rel = max((d / s if s > 0 else (0.0 if d == 0 else float("inf")) for d, s in diffs),
              default=0.0)
    result = OnnxExport(path, diff, tuple(session.get_providers()), _opset_of(path), seconds, rel)
    logger.info("exported %s to %s in %.1fs (opset %d, max |diff| %.3g, relative %.3g, %s)",
                type(module).__name__, path, seconds, result.opset, diff, rel, result.providers[0])
    bad = [(d, s) for d, s in diffs if not d <= atol + rtol * s]
    if check and bad:
        d, s = max(bad, key=lambda ds: ds[0] - atol - rtol * ds[1])
        raise ExportError(f"ONNX export {path} does not match torch: max |onnx - torch| = "
                          f"{d:.3g} on an output of scale max|torch| = {s:.3g} (relative "
                          f"{d / s if s else float('inf'):.3g}) > atol + rtol * scale = "
                          f"{atol:g} + {rtol:g} * {s:.3g}")
    return result


def _cpu_eval_copy(module: nn.Module) -> nn.Module:
    """Deep-copy ``module`` to CPU float32 in eval mode, leaving the original as it was.

    Example::

        >>> m = nn.Linear(2, 2).train(); c = _cpu_eval_copy(m)
        >>> m.training, c.training
        (True, False)
    """
    model = copy.deepcopy(module).to("cpu").float()  # float() casts floating tensors only
    return model.eval().requires_grad_(False)


def _as_batch(example: torch.Tensor) -> torch.Tensor:
    """CPU (float32 if floating) copy of ``example`` with at least 2 rows.

    Example::

        >>> _as_batch(torch.ones(1, 3, dtype=torch.float16)).shape
        torch.Size([2, 3])
    """
    if not isinstance(example, torch.Tensor) or example.dim() == 0:
        raise ExportError("export_onnx needs an example tensor with a batch dimension")
    x = example.detach().to("cpu")
    x = x.float() if x.is_floating_point() else x.clone()
    # A dynamic dimension of size 1 gets specialised by torch.export.
    return x.repeat(2, *[1] * (x.dim() - 1)) if x.shape[0] == 1 else x


def _other_batch(x: torch.Tensor) -> torch.Tensor:
    """A batch one row larger than ``x`` (rows reused, floats slightly perturbed).

    Example::

        >>> _other_batch(torch.zeros(2, 4)).shape
        torch.Size([3, 4])
    """
    idx = torch.arange(x.shape[0] + 1) % x.shape[0]
    y = x[idx].clone()
    if y.is_floating_point():
        scale = float(y.std()) if y.numel() > 1 else 1.0
        noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
        y += 0.1 * (scale or 1.0) * noise
    return y


def _run_exporter(model: nn.Module, x: torch.Tensor, path: Path, opset: int | None) -> float:
    """Run the dynamo exporter quietly; return its wall time in seconds.

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     seconds = _run_exporter(nn.Linear(3, 1).eval(), torch.randn(2, 3),
        ...                             Path(d, "a.onnx"), None)
        ...     seconds > 0, Path(d, "a.onnx").exists()
        (True, True)
    """
    external = _param_bytes(model) > _EXTERNAL_DATA_BYTES
    chatter = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(chatter), torch.no_grad():
            torch.onnx.export(model, (x,), path, dynamo=True, verbose=False,
                              opset_version=opset, external_data=external,
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as e:  # the exporter raises many unrelated types
        msg = re.sub(r"\x1b\[[0-9;]*m", "", f"{e}\n{chatter.getvalue()[-2000:]}")  # no colours
        raise ExportError(f"ONNX export of {type(model).__name__} to {path} failed: "
                          f"{type(e).__name__}: {msg}{_HINT}") from e
    if chatter.getvalue():
        logger.debug("exporter output:\n%s", chatter.getvalue())
    return time.perf_counter() - start


def _param_bytes(model: nn.Module) -> int:
    """Bytes held by the parameters and buffers of ``model`` (``nn.Linear(2, 2)``: 24)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _check_file(path: Path) -> None:
    """Run ``onnx.checker`` on the saved file (by path, so external data works).

    Example::

        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = Path(tmp.name, "relu.onnx")
        >>> onnx.save(onnx.parser.parse_model('''<ir_version: 8, opset_import: ["" : 18]>
        ...     relu (float[batch, 4] x) => (float[batch, 4] y) { y = Relu(x) }'''), path)
        >>> _check_file(path)                   # raises ExportError if invalid
        >>> _ = path.write_bytes(b"not onnx")
        >>> _check_file(path)
        Traceback (most recent call last):
            ...
        hmir.errors.ExportError: ONNX file .../relu.onnx fails onnx.checker: ...
        >>> tmp.cleanup()
    """
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as e:
        raise ExportError(f"ONNX file {path} fails onnx.checker: {e}") from e


def _opset_of(path: Path) -> int:
    """The default-domain opset version of the ONNX file at ``path``.

    Example::

        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = Path(tmp.name, "relu.onnx")
        >>> onnx.save(onnx.parser.parse_model('''<ir_version: 8, opset_import: ["" : 18]>
        ...     relu (float[batch, 4] x) => (float[batch, 4] y) { y = Relu(x) }'''), path)
        >>> _opset_of(path)
        18
        >>> tmp.cleanup()
    """
    proto = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _providers() -> list[str]:
    """CUDA then CPU when both onnxruntime and torch see a GPU, else CPU only.

    Example::

        >>> _providers()[-1]
        'CPUExecutionProvider'
    """
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if cuda and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _session(path: Path) -> ort.InferenceSession:
    """An onnxruntime session on ``path`` that logs only errors.

    Example::

        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = Path(tmp.name, "relu.onnx")
        >>> onnx.save(onnx.parser.parse_model('''<ir_version: 8, opset_import: ["" : 18]>
        ...     relu (float[batch, 4] x) => (float[batch, 4] y) { y = Relu(x) }'''), path)
        >>> _session(path).get_inputs()[0].shape[0]
        'batch'
        >>> tmp.cleanup()
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=_providers())
    except Exception as e:
        raise ExportError(f"onnxruntime cannot load {path}: {e}") from e
