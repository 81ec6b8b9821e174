"""merge(A, A) = A for every method, whatever the calibration data (design property 2).

Wide spaces seen through few samples are the hard case: with n samples the activations of a
4096-wide layer span at most n - 1 directions, so thousands of pairs correlate at 1 up to
rounding, and random-init producer rows look alike once sorted. Only exact twins (equal sorted
producer rows, :func:`hmir.algorithms.tiebreak.twin_pairs`) tell a unit's copy from a look-alike.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from hmir import compile_merge
from hmir.algorithms.tiebreak import stacked_similarity
from hmir.frontends import lower

from conftest import randomized, rel_err, slow_except, torchvision_model

METHODS = ("zip", "permute", "avg", "mal")


IN = 8192          # long producer rows: sorted random rows all look alike (cosine ~ 1)


def _wide_mlp(seed: int = 0, width: int = 1024, dead: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(IN, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                        nn.Linear(width, 10))
    with torch.no_grad():
        net[2].bias[:dead] = -1e3                      # dead units: zero on every input
    return net.eval()


def _self_merge(model, data, method, x):
    res = compile_merge(model, copy.deepcopy(model), data, method=method, repair=False,
                        progress=False)
    with torch.no_grad():
        return rel_err(model(x), res.module(x))


@pytest.mark.parametrize("method", slow_except(METHODS, "zip"))
@pytest.mark.parametrize("samples", [2, 8])
def test_wide_mlp_few_samples(method, samples):
    """1024-wide layers, 8192-long producer rows, 2 or 8 samples (rank <= 7), 100 dead units
    (zip with 2 samples gave rel err ~1e-2 before twins were detected)."""
    net = _wide_mlp(dead=100)
    data = [torch.randn(samples, IN, generator=torch.Generator().manual_seed(1))]
    assert _self_merge(net, data, method, torch.randn(8, IN)) == 0.0


def test_twins_outscore_lookalikes():
    """Exact twins get the tie-break on top: every unit's best partner is its own copy, even when
    every correlation is 1 (one sample direction) and sorted rows are all alike."""
    net = _wide_mlp(width=256)
    ir = lower(net, torch.randn(2, IN))
    space = next(s for s in ir.free_spaces if s.n == 256 and any(p.param == "2.weight"
                                                                  for p in s.producers()))
    state = net.state_dict()
    corr = torch.ones(512, 512)
    S = stacked_similarity(corr, (space, space), (state, state), 1e-3)
    cross = S[:256, 256:]
    assert torch.equal(cross.argmax(1), torch.arange(256))
    assert float((cross.diagonal() - cross.masked_fill(torch.eye(256, dtype=torch.bool), -9)
                  .amax(1)).min()) >= 1e-3 * 0.99


@pytest.mark.slow
@pytest.mark.parametrize("name, images, size, method", [
    ("vgg11_bn", 8, 64, "zip"),
    ("vgg16", 32, 64, "permute"),
    ("vgg11_bn", 512, 32, "zip"),
])
def test_vgg_self_merge(name, images, size, method):
    """The 4096-wide classifier of VGG with 8, 32 and 512 images (issue 14: rel err was 5e-3)."""
    model = randomized(torchvision_model(name))
    g = torch.Generator().manual_seed(2)
    data = [torch.randn(min(images, 64), 3, size, size, generator=g)
            for _ in range(max(1, images // 64))]
    assert _self_merge(model, data, method, torch.randn(2, 3, size, size, generator=g)) == 0.0
