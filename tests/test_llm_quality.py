"""Issue 13 item 8, CI size: tiny Llama LMs on real text (examples/llm_merge.py --size small).

Trains four 2–3-layer byte-level Llama models on CPython's pydoc topics (cached in a temporary
folder, so every run trains), then the vanilla and hmir (mal, permute) λ paths and the zip
merges of the same, depth and width pairs.
"""
from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import sys

import pytest
import torch

pytestmark = pytest.mark.slow       # trains four tiny LMs and runs seven merges (~50 s CPU)

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("llm_merge", ROOT / "examples" / "llm_merge.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["llm_merge"] = mod
    spec.loader.exec_module(mod)
    mp = pytest.MonkeyPatch()
    mp.setenv("HMIR_EXAMPLES_CACHE", str(tmp_path_factory.mktemp("llm-cache")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = mod.run("small", log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    print(mod.tables(res))
    return res


def test_parents_learned_the_text(small):
    uni = small["unigram"]["loss"]
    for name, p in small["parents"].items():
        assert p["loss"] < uni - 0.4, (name, p["loss"], uni)


def test_vanilla_path_ends_at_the_parents(small):
    van, parents = small["lambda_path"]["vanilla"]["losses"], small["parents"]
    assert van[0] == pytest.approx(parents["A"]["loss"], abs=1e-5)
    assert van[-1] == pytest.approx(parents["B"]["loss"], abs=1e-5)
    assert small["lambda_path"]["vanilla"]["barrier"] > 0.1      # independent seeds: a barrier


def test_hmir_paths_and_merges(small):
    lp, parents = small["lambda_path"], small["parents"]
    van_mid = lp["vanilla"]["losses"][len(lp["lambdas"]) // 2]
    for name in ("hmir mal", "hmir permute"):
        losses = lp[name]["losses"]
        # λ = 0 is A; λ = 1 is B permuted onto A's basis: the same function as B
        assert losses[0] == pytest.approx(parents["A"]["loss"], abs=1e-4), name
        assert losses[-1] == pytest.approx(parents["B"]["loss"], abs=1e-3), name
        # alignment lowers the midpoint (measured: ~2.72 against vanilla ~3.10)
        assert losses[len(losses) // 2] < van_mid - 0.1, json.dumps(lp)
        assert lp[name]["barrier"] < lp["vanilla"]["barrier"], json.dumps(lp)
    for pair, runs in small["merges"].items():
        for label, r in runs.items():
            if label != "parents":
                assert math.isfinite(r["loss"]), (pair, label, r)
