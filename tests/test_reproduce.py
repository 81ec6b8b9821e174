"""Issue 5, CI size: the seeds' orderings on real MNIST digits (examples/reproduce.py --size small).

One pair, 2 epochs, VGG-13 (task A) + VGG-19 (task B) with a VGG-13 homo partner, ResNet-20 ×1 + ×2.
"""
from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import sys

import pytest

pytestmark = pytest.mark.slow       # trains and merges real models for minutes

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "examples" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = mod            # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("reproduce-small")
    return mod.run("small", out), out


def test_table1_orderings(small):
    res, _ = small
    t = res["table1 VGG-13 + VGG-19"]
    a, b = t["Task A (VGG-13)"], t["Task B (VGG-19)"]
    print(json.dumps(t, indent=1))
    assert a["task_a"] > 0.85 and b["task_b"] > 0.85                  # the parents learned their tasks
    joint = {k: v["joint"] for k, v in t.items()}
    assert joint["Homo zip"] > joint["Homo align"] > joint["Homo avg"]  # zip > align > avg
    assert joint["Homo zip"] > max(a["joint"], b["joint"])
    assert joint["Hetero Z.LMA"] > joint["Hetero A.LMA"]               # zip > align, hetero too
    # Hetero Z.LMA beats the single models in mean task accuracy; in joint accuracy it does
    # not on this pair (README: the seed's claim does not hold here, numbers and what we tried).
    assert t["Hetero Z.LMA"]["avg"] > max(a["avg"], b["avg"])
    assert joint["Homo zip"] > joint["Homo zip, no repair"]          # norm repair matters


def test_table3_elastic_zip_beats_the_single_models(small):
    res, _ = small
    t = res["table3 ResNet-20 ×1 + ×2"]
    print(json.dumps(t, indent=1))
    best_single = max(t["Task A (×1)"]["joint"], t["Task B (×2)"]["joint"])
    assert t["Z elastic → ×2 (max)"]["joint"] > best_single


def test_mudsc_and_mal_outputs(small):
    res, out = small
    rows = res["mudsc"]["VGG-13"]
    assert {f"{m} α={a:g}" for m in ("zip", "permute") for a in (0.0, 0.5, 1.0)} == set(rows)
    assert all(0.0 <= r["joint"] <= 1.0 for r in rows.values())
    for path in res["mal"].values():
        assert len(path["losses"]) == 21 and math.isfinite(path["barrier"])
    for f in ("table1.md", "table3.md", "mudsc.md", "mal.md", "mudsc_alpha.png", "mal_lambda.png",
              "cka_VGG-13_VGG-19.png"):
        assert (out / f).stat().st_size > 200, f
    assert json.loads((out / "results.json").read_text())["config"]["pairs"] == 1
