"""Layer 3, the backend: a merged ``nn.Module`` from an IR and a state dict (:func:`emit`), module
resize rules for new widths (:mod:`~hmir.backend.resize`) and the ONNX export
(:mod:`~hmir.backend.onnx_export`).

Example::

    >>> from hmir.backend import emit
    >>> emit.__module__
    'hmir.backend.build'
"""
from hmir.backend.build import emit  # noqa: F401

__all__ = ["emit"]
