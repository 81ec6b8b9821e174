"""Deprecated module paths: the modules that lived flat in ``hmir/`` before the layered package.

``import hmir.matching`` still works and gives the very module now at
``hmir.algorithms.matching`` (one module object, so patches and isinstance checks agree),
with a :class:`DeprecationWarning` that names the new path. The aliases are resolved lazily
by a meta path finder: nothing is imported until an old path is used.

Example::

    >>> import warnings, importlib
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     old = importlib.import_module("hmir.matching")
    >>> old is importlib.import_module("hmir.algorithms.matching"), w[0].category.__name__
    (True, 'DeprecationWarning')
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "hmir.verify": "hmir.ir.verify", "hmir.printer": "hmir.ir.printer",
    "hmir.slicing": "hmir.ir.slicing", "hmir.pairing": "hmir.ir.pairing",
    "hmir.units": "hmir.ir.units", "hmir.zeros": "hmir.ir.zeros",
    "hmir.alignment": "hmir.algorithms.alignment", "hmir.cka": "hmir.algorithms.cka",
    "hmir.matching": "hmir.algorithms.matching", "hmir.zipping": "hmir.algorithms.zipping",
    "hmir.tiebreak": "hmir.algorithms.tiebreak", "hmir.dual": "hmir.algorithms.dual",
    "hmir.groups": "hmir.algorithms.groups", "hmir.interpolate": "hmir.algorithms.interpolate",
    "hmir.resize": "hmir.backend.resize", "hmir.onnx_export": "hmir.backend.onnx_export",
    "hmir.report": "hmir.pipeline.report", "hmir.data": "hmir.pipeline.data",
    "hmir.depth_merge": "hmir.passes.align_depth",
    "hmir.mnist": "hmir.harness.mnist", "hmir.zoo": "hmir.harness.zoo",
    "hmir.permute": "hmir.harness.permute",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``hmir.<old>`` and loads it as the module at its new path."""

    def __init__(self) -> None:
        self.specs: dict = {}

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}; the old path is deprecated and "
                      f"will be removed", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(MOVED[spec.name])
        self.specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # the import machinery stamped the alias spec on the real module: give its own back
        module.__spec__ = self.specs[module.__name__]


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
