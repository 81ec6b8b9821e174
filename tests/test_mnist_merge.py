"""Real data (design.md protocol, CI-sized): zip beats averaging on MNIST-5k task pairs."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest

pytestmark = pytest.mark.slow       # trains MNIST models (about a minute or more)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _demo():
    spec = importlib.util.spec_from_file_location("demo", ROOT / "examples" / "demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_zip_beats_avg_and_single_models_on_mnist():
    res = _demo().run(pairs=1, epochs=2, width=1, calib=256)
    print(_demo().table(res))
    single = max(res["model A"]["joint"], res["model B"]["joint"])
    assert res["model A"]["task_a"] > 0.9 and res["model B"]["task_b"] > 0.9
    assert res["zip"]["joint"] > res["avg"]["joint"] + 0.1
    assert res["zip"]["joint"] > single
    assert res["permute"]["joint"] > res["avg"]["joint"]
