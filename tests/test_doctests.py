"""Every ``>>>`` example in the installed package runs: one test per module.

The modules are found by walking the installed ``hmir`` package (``hmir.passes`` and
``hmir.frontends`` included), so the deprecated flat names of :mod:`hmir._compat` (aliases of
modules walked under their real names) are never visited. Each module's examples run with the
stdlib :mod:`doctest` (``ELLIPSIS | NORMALIZE_WHITESPACE``) and ``torch`` already imported;
an example that cannot run standalone says ``# doctest: +SKIP`` on its lines.
"""
from __future__ import annotations

import doctest
import importlib
import io
import pkgutil

import pytest
import torch

import hmir

OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


# In an editable install ``passes/`` and ``frontends/`` are mapped into ``hmir`` by the install's
# import hook, so they are not folders of ``hmir.__path__``: walk them from their own paths.
MAPPED = ("hmir.passes", "hmir.frontends")


def _module_names() -> list[str]:
    names = {"hmir"}
    for package in (hmir, *map(importlib.import_module, MAPPED)):
        names.add(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."):
            names.add(info.name)
    # tests/test_layers.py writes a probe module into hmir/ir for a moment
    return sorted(n for n in names if "_layer_probe" not in n)


MODULES = _module_names()


def test_the_walk_sees_every_layer():
    for name in ("hmir.api", "hmir.errors", "hmir.ir.core", "hmir.algorithms.matching",
                 "hmir.backend.build", "hmir.pipeline.report", "hmir.harness.mnist",
                 "hmir.passes.match", "hmir.frontends.fx"):
        assert name in MODULES
    # the deprecated flat names are aliases, never walked as modules of their own
    from hmir._compat import MOVED
    assert not set(MOVED) & set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = [t for t in finder.find(module, name, extraglobs={"torch": torch}) if t.examples]
    if not tests:
        return
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=OPTIONS, verbose=False)
    state = torch.get_rng_state(), torch.get_default_dtype(), torch.get_num_threads()
    try:
        for t in tests:
            runner.run(t, out=out.write)
    finally:
        torch.set_rng_state(state[0])
        torch.set_default_dtype(state[1])
        torch.set_num_threads(state[2])
    assert runner.failures == 0, f"{runner.failures} of {runner.tries} examples in {name} " \
                                 f"failed:\n{out.getvalue()}"
