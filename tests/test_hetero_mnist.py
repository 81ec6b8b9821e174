"""Real data (design.md protocol, CI-sized): heterogeneous merges beat the single models on MNIST-5k."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest

pytestmark = pytest.mark.slow       # trains MNIST models (about a minute or more)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("hetero", ROOT / "examples" / "hetero_mnist.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_depth_hetero_zip_lma_beats_both_single_models():
    ex = _example()
    res = ex.run(pairs=1, epochs=2, calib=256, parts=("depth",))["depth"]
    print(ex.table(res))
    a, b = res["ResNet-20 (task A)"], res["ResNet-26 (task B)"]
    assert a["task_a"] > 0.9 and b["task_b"] > 0.9                     # the parents learned their tasks
    assert res["Z.LMA"]["joint"] > max(a["joint"], b["joint"])
    assert res["Z.LMA"]["avg"] > max(a["avg"], b["avg"])
    assert res["Z.LMA"]["joint"] > res["A.LMA"]["joint"]               # zip > align (seed Table I)


def test_width_hetero_elastic_zip_beats_both_single_models(tmp_path):
    ex = _example()
    res = ex.run(pairs=1, epochs=2, calib=256, out=tmp_path, parts=("width",))["width"]
    print(ex.table(res))
    a, b = res["cnn ×1 (task A)"], res["cnn ×2 (task B)"]
    assert res["Z elastic, width max (×2)"]["joint"] > max(a["joint"], b["joint"])
    assert (tmp_path / "mal_lambda.png").stat().st_size > 1000
