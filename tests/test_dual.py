"""Dual-space similarity (MuDSC): α·activation + (1−α)·weight, swept over spaces until stable."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from conftest import randomized, rel_err
from hmir import compile_merge
from hmir.harness import zoo
from hmir.pipeline.data import Calibration
from hmir.algorithms.dual import WeightBasis, dual_sweeps, weight_similarity
from hmir.errors import MergeError
from hmir.frontends import lower
from hmir.algorithms.matching import match_avg, match_permute
from hmir.ir.pairing import pair_spaces
from hmir.passes.match import MatchOptions, match
from hmir.passes.observe import observe
from hmir.harness.permute import permute_state, random_permutation


def _data(shape, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _permuted(a, x, seed=3):
    ir = lower(a, x)
    b = copy.deepcopy(a)
    b.load_state_dict(permute_state(ir, a.state_dict(), random_permutation(ir, seed=seed)))
    return b


def _observed(a, b, data):
    """Lowered IRs, pairs, stats and states of two models of one structure."""
    ir_a, ir_b = lower(a, data[0][:2], "model a"), lower(b, data[0][:2], "model b")
    pairs = pair_spaces(ir_a, ir_b)
    stats = observe(ir_a, ir_b, pairs, Calibration(data), progress=False)
    return ir_a, ir_b, pairs, stats, (a.state_dict(), b.state_dict())


@pytest.mark.parametrize("method", ["permute", "zip"])
def test_alpha_one_is_activation_only_matching(method):
    a, b = randomized(zoo.resnet20()), randomized(zoo.resnet20(), seed=1)
    ir_a, ir_b, pairs, stats, (sa, sb) = _observed(a, b, _data((8, 3, 32, 32), 2))
    plain, _ = match(ir_a, ir_b, pairs, stats, MatchOptions(method, tie_break=0.0), sa, sb)
    dual, notes = match(ir_a, ir_b, pairs, stats, MatchOptions(method, similarity_alpha=1.0), sa, sb)
    assert [m.groups for m in dual] == [m.groups for m in plain]
    assert any("1·activation + 0·weight" in n and "converged" in n for n in notes)


@pytest.mark.parametrize("name", ["resnet20", "vgg11_bn"])
def test_weight_only_recovers_a_hidden_permutation_without_calibration_signal(name):
    """α = 0 on all-zero calibration data (every feature constant: activations say nothing)."""
    a = randomized(zoo.resnet20() if name == "resnet20" else zoo.vgg11(width=0.25, batch_norm=True))
    zeros = [torch.zeros(8, 3, 32, 32)] * 2
    b = _permuted(a, zeros[0][:2])
    x = _data((4, 3, 32, 32), 1, seed=5)[0]
    weights = compile_merge(a, b, zeros, method="permute", similarity_alpha=0.0, repair=False,
                            progress=False)
    acts = compile_merge(a, b, zeros, method="permute", similarity_alpha=1.0, repair=False,
                         progress=False)
    with torch.no_grad():
        assert rel_err(a(x), weights.module(x)) <= 1e-5
        assert rel_err(a(x), acts.module(x)) > 1e-2            # activations alone cannot
    assert any("0·activation + 1·weight" in n and "converged" in n for n in weights.report.notes)


def test_intermediate_alpha_merges_models_of_different_width():
    """Elastic zip (16 vs 32 units per stage ...) on 0.5·activation + 0.5·weight."""
    a, b = randomized(zoo.resnet20(1)), randomized(zoo.resnet20(2), seed=1)
    data = _data((8, 3, 32, 32), 2)
    result = compile_merge(a, b, data, method="zip", similarity_alpha=0.5, progress=False)
    with torch.no_grad():
        y = result.module(data[0])
    assert y.shape == (8, 10) and bool(torch.isfinite(y).all())
    assert {s.width for s in result.report.spaces if not s.fixed} == {32, 64, 128}
    assert result.report.options["similarity_alpha"] == 0.5
    assert any("0.5·activation + 0.5·weight" in n for n in result.report.notes)


def test_sweeps_terminate_and_keep_the_best_sweep():
    """Unrelated random models have no fixed point: sweeps stop after ``patience`` sweeps
    without a better mean match score, or at ``max_sweeps``, keeping the best sweep."""
    a, b = randomized(zoo.resnet20()), randomized(zoo.resnet20(), seed=1)
    ir_a, ir_b, pairs, stats, states = _observed(a, b, _data((8, 3, 32, 32), 2))
    todo = [k for k, p in enumerate(pairs) if not ir_a.space(p.a).fixed]
    out = [match_avg(ir_a.space(p.a).n, ir_b.space(p.b).n) if k not in todo else None
           for k, p in enumerate(pairs)]
    run = dual_sweeps((ir_a, ir_b), pairs, lambda k: stats[k].corr().float(), todo, out,
                      lambda k, s: match_permute(s, s.shape[0] // 2, s.shape[0] // 2), states,
                      alpha=0.3, max_sweeps=4, patience=2)
    assert 2 <= run.sweeps <= 4 and all(m is not None for m in out) and not run.converged
    assert 2 <= run.kept <= run.sweeps and "kept the matches of sweep" in run.note(0.3, 12)
    _, notes = match(ir_a, ir_b, pairs, stats, MatchOptions("zip", similarity_alpha=0.3,
                                                            max_sweeps=3), *states)
    assert any(f"{n} sweep(s)" in note for n in (2, 3) for note in notes)


def test_weight_rows_of_a_widened_unit_match_its_original():
    """Rows of B's units are mapped into the merged basis of their input space, so A's unit and
    B's copy (whose input columns were split in two) have cosine similarity 1."""
    a = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    b = copy.deepcopy(a)
    with torch.no_grad():                               # b: unit 0 of the first space twice
        b[0] = nn.Linear(6, 5)
        b[0].weight.copy_(torch.cat([a[0].weight, a[0].weight[:1]]))
        b[0].bias.copy_(torch.cat([a[0].bias, a[0].bias[:1]]))
        b[2] = nn.Linear(5, 3)
        w = torch.cat([a[2].weight, a[2].weight[:, :1] / 2], 1)
        w[:, 0] /= 2
        b[2].weight.copy_(w)
        b[2].bias.copy_(a[2].bias)
    data = _data((16, 6), 2)
    ir_a, ir_b, pairs, stats, states = _observed(a, b, data)
    opts = MatchOptions("zip", alpha=1.0, width="min", similarity_alpha=0.0)
    matches, _ = match(ir_a, ir_b, pairs, stats, opts, *states)
    assert matches[1].groups == [(0, 4, 8), (1, 5), (2, 6), (3, 7)]
    S = weight_similarity(WeightBasis((ir_a, ir_b), pairs, matches, states), 2)
    assert torch.allclose(S[:3, 3:].diagonal(), torch.ones(3), atol=1e-6)


def test_bad_similarity_alpha_and_unmappable_rows_are_clear_errors():
    a, b = zoo.mlp(8, (6,), 2), zoo.mlp(8, (6,), 2)
    data = _data((4, 8), 2)
    with pytest.raises(MergeError, match=r"similarity_alpha.*\[0, 1\].*1.5.*ZipIt"):
        compile_merge(a, b, data, similarity_alpha=1.5, progress=False)
    with pytest.raises(MergeError, match="no effect with method='avg'"):
        compile_merge(a, b, data, method="avg", similarity_alpha=0.5, progress=False)

    def net(k):
        return nn.Sequential(nn.Conv2d(3, 4, k, padding=k // 2), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with pytest.raises(MergeError, match=r"rows of '0.weight' have 27 entries.*75.*kernel size"):
        compile_merge(net(3), net(5), [torch.randn(2, 3, 6, 6)], similarity_alpha=0.5,
                      progress=False)
