"""The coverage benchmark's checks (hmir.harness.coverage, the code benchmarks/coverage.py runs in
each child) on a small representative set, and the pieces that can be wrong: randomization,
input size, the stop-at-first-failure chain, totals, and the runner's time limit."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from hmir.harness import coverage as cov

ROOT = Path(__file__).resolve().parent.parent


def _check(spec: str, steps=cov.STEPS) -> list[dict]:
    torch.set_num_threads(1)
    model = cov.build(spec, seed=0)
    x, y = cov.pick_input(model, spec)
    recs = list(cov.run_checks(model, x, y, steps=steps))
    assert [r["step"] for r in recs] == list(steps), recs[-1].get("error")
    for r in recs:
        assert r["ok"], f"{spec} {r['step']}: {r.get('error')}"
    assert recs[0]["frontend"] in ("fx", "export")
    assert recs[1]["rel"] <= cov.TOL and recs[1]["spaces"] > 0          # perm-invariant
    assert recs[2]["rel"] <= cov.TOL                                     # self-merge = A
    return recs


def test_squeezenet_all_four_checks():
    recs = _check("tv:squeezenet1_1")
    onnx = recs[3]
    assert onnx["max_abs"] <= 1e-4 and onnx["rel"] <= cov.TOL


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_lower_perm_merge(name):
    _check("tv:" + name, cov.STEPS[:3])


def test_timm_lower_perm_merge():
    pytest.importorskip("timm")
    _check("timm:dla34", cov.STEPS[:3])          # tree aggregation: cat of many stages


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["tv:resnet18", "timm:resnet26"])
def test_all_four_checks_slow(spec):
    if spec.startswith("timm:"):
        pytest.importorskip("timm")
    _check(spec)


class _Constants(nn.Module):
    """Layer scale at 1e-6, zero class token, zero bias, BN and LayerNorm at init, a scalar."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.gamma = nn.Parameter(torch.full((4,), 1e-6))
        self.token = nn.Parameter(torch.zeros(1, 1, 4))
        self.ln, self.temp = nn.LayerNorm(4), nn.Parameter(torch.tensor(1.0))
        nn.init.zeros_(self.conv.bias)


def test_randomize_makes_constants_random():
    m = cov.randomize(_Constants().train(), seed=0)
    assert not m.training
    for name, p in m.named_parameters():
        if p.numel() > 1:
            assert p.std() > 1e-3, f"{name} is still constant"
    assert float(m.temp.detach()) == 1.0                          # scalars are left alone
    assert m.bn.running_var.std() > 0 and m.bn.running_mean.abs().max() > 0
    assert 1e-2 < m.gamma.abs().mean() < 1.0                      # a sensible scale, not 1e-6
    again = cov.randomize(_Constants(), seed=0)
    assert torch.equal(again.gamma, m.gamma)                      # deterministic in the seed


def test_pick_input_falls_back_to_own_size():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 5))
    model.image_size = 16                                         # fails at 64, runs at 16
    x, y = cov.pick_input(model)
    assert x.shape == (2, 3, 16, 16) and y.shape == (2, 5)


def test_chain_stops_at_first_failure():
    class CumSum(nn.Module):                                      # no rule: a clear error
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(x).cumsum(1).mean((2, 3))

    model = cov.randomize(CumSum())
    x, y = cov.pick_input(model)
    recs = list(cov.run_checks(model, x, y))
    assert [r["step"] for r in recs] == ["lower"] and not recs[0]["ok"]
    assert "Error: " in recs[0]["error"] and "\n" not in recs[0]["error"]


def test_totals_count_from_fake_records():
    ok, bad = {"ok": True}, {"ok": False, "error": "x"}
    full = {k: ok for k in cov.STEPS}
    recs = [{"steps": full, "tp": {"builds": ok, "prunes": ok}},
            {"steps": full, "tp": {"builds": ok, "prunes": bad}},
            {"steps": {"lower": ok, "perm": bad}, "tp": {"builds": ok, "prunes": ok}},
            {"steps": {"lower": bad}, "tp": {"builds": bad}},
            {"steps": {"lower": ok, "perm": ok, "merge": ok}, "tp": None}]
    t = cov.totals(recs)
    assert (t["models"], t["lower"], t["perm"], t["merge"], t["onnx"], t["all"]) == (5, 4, 3, 3, 2, 2)
    assert (t["tp_models"], t["tp_builds"], t["tp_prunes"]) == (4, 3, 2)
    assert (t["both"], t["hmir_only"], t["tp_only"], t["neither"]) == (1, 1, 1, 1)


def test_classifier_found_generally():
    tv = pytest.importorskip("torchvision")
    r18 = tv.models.resnet18(weights=None)
    assert cov.classifier(r18) == [r18.fc]
    sq = tv.models.squeezenet1_1(weights=None)                  # a conv classifier
    assert cov.classifier(sq) == [sq.classifier[1]]


def test_runner_records_timeout(tmp_path):
    """The benchmark's parent kills a child past --timeout and records it in md and json."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "coverage.py"), "--only", "squeezenet1_1",
           "--timeout", "1", "--no-tp", "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120, cwd=ROOT)
    rec = json.loads((tmp_path / "coverage.json").read_text())["records"]["tv:squeezenet1_1"]
    assert rec["hmir"]["error"].endswith("timeout (1 s)")
    md = (tmp_path / "coverage.md").read_text()
    assert "| torchvision | 1 | 0 | 0 | 0 | 0 | **0** |" in md and "timeout (1 s)" in md


def test_onnx_parity_failure_keeps_its_numbers(tmp_path):
    onnx = pytest.importorskip("onnx")
    from hmir.errors import ExportError

    class Result:                                   # to_onnx writes the file, then refuses it
        module = nn.Identity()

        def to_onnx(self, path):
            onnx.save(onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 18]>
                ident (float[N, 4] x) => (float[N, 4] y) { y = Identity(x) }"""), str(path))
            raise ExportError("ONNX export does not match torch\nsecond line")

    rec = cov._step("onnx", lambda: cov._onnx(Result(), torch.randn(2, 4), tmp_path / "m.onnx"))
    assert not rec["ok"] and rec["error"] == "ExportError: ONNX export does not match torch"
    assert rec["max_abs"] == 0.0 and rec["rel"] == 0.0


def test_report_from_fake_records():
    """benchmarks/coverage.py's markdown: totals per suite, and one group per failure kind."""
    import argparse
    import doctest
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_coverage", ROOT / "benchmarks" / "coverage.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert doctest.testmod(bench).failed == 0                     # error_key's example
    ok, full = {"ok": True}, {k: {"ok": True, "rel": 0.0} for k in cov.STEPS}
    bad = lambda n: {"lower": {"ok": False, "error": f"LoweringError: node 'mul_{n}'"}}  # noqa: E731
    records = {"tv:a": {"hmir": {"steps": full, "size": 64}, "tp": {"steps": {"builds": ok}}},
               "tv:b": {"hmir": {"steps": bad(1), "error": "lower: LoweringError: node 'mul_1'"}},
               "timm:c": {"hmir": {"steps": bad(2), "error": "lower: LoweringError: node 'mul_2'"}}}
    env = {k: "?" for k in ("date", "cpu", "cores", "torch", "torchvision", "timm", "torch_pruning",
                            "hmir_commit")}
    md = bench.render(env, records, argparse.Namespace(timeout=240, memory_gb=8))
    assert "| torchvision | 2 | 1 | 1 | 1 | 1 | **1** | 1/1 | 0/1 |" in md
    assert "| timm | 1 | 0 | 0 | 0 | 0 | **0** | 0/0 | 0/0 |" in md
    assert "| 2: tv:b, timm:c | lower: LoweringError: node 'mul_#' |" in md
