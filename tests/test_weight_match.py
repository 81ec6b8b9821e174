"""Zero-padded weight matching (MAL): recovery of embeddings and permutations, monotone
coordinate descent, interpolation and the loss along λ."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import randomized
from hmir.harness import zoo
from hmir.errors import MergeError
from hmir.frontends import lower
from hmir.algorithms.interpolate import LambdaPath, interpolate, loss_along_lambda, plot, plot_paths
from hmir.ir.pairing import pair_spaces
from hmir.passes.weight_match import align_state, weight_match
from hmir.harness.permute import permute_state, random_permutation
from hmir.ir.slicing import slice_index
from test_lowering import GNNet

X_IMG, X_MLP = torch.zeros(2, 3, 32, 32), torch.zeros(2, 16)        # lowering examples only


def _embed(ir_s, ir_b, small, maps):
    """B's state: ``small``'s units at positions ``maps[space]`` of the wide model, zeros elsewhere."""
    out = {}
    for name, t in ir_b.graph_module.state_dict().items():
        if not ir_b.slices_of(name):
            out[name] = small[name].clone()
            continue
        pos = [torch.arange(n) for n in small[name].shape]
        for ss, sb in zip(ir_s.spaces, ir_b.spaces):
            for x, y in zip(ss.slices, sb.slices):
                if x.param == name:
                    to = slice_index(y, sb.n)[:, maps[ss.id], :]
                    pos[x.dim][slice_index(x, ss.n).flatten()] = to.flatten()
        index = tuple(p.view([-1 if d == k else 1 for d in range(t.dim())]) for k, p in enumerate(pos))
        out[name] = torch.zeros_like(t).index_put_(index, small[name])
    return out


def _embedding(ir_s, ir_b, seed):
    g = torch.Generator().manual_seed(seed)
    return {s.id: (torch.arange(s.n) if s.fixed else torch.randperm(b.n, generator=g)[:s.n])
            for s, b in zip(ir_s.spaces, ir_b.spaces)}


def _sq(state, ir):
    buffers = {n for n, _ in ir.graph_module.named_buffers()}
    return sum(float((t.double() ** 2).sum()) for k, t in state.items() if k not in buffers)


def _max_diff(s1, s2):
    return max(float((s1[k].double() - s2[k].double()).abs().max()) for k in s1)


@pytest.fixture(scope="module")
def resnets():
    torch.manual_seed(0)
    small = randomized(zoo.resnet20(1), seed=0)
    ir_s, ir_w = lower(small, X_IMG, "r1"), lower(zoo.resnet20(2), X_IMG, "r2")
    maps = _embedding(ir_s, ir_w, seed=1)
    wide = zoo.resnet20(2).eval()
    wide.load_state_dict(_embed(ir_s, ir_w, small.state_dict(), maps))
    return small, wide, ir_s, ir_w, maps


def _check_recovery(a, b, ir_a, ir_b, maps, narrow_is_a):
    sa, sb = a.state_dict(), b.state_dict()
    wm = weight_match(ir_a, ir_b, pair_spaces(ir_a, ir_b), sa, sb)
    aligned = align_state(ir_a, ir_b, sb, wm)
    assert _max_diff(sa, aligned) <= 1e-6                   # wider side: zeros where A had zeros
    assert _max_diff(sa, interpolate(sa, aligned, 0.5)) <= 1e-6
    norm = _sq(sa if narrow_is_a else sb, ir_a)
    assert wm.objective == pytest.approx(norm, rel=1e-9) and wm.history[0] < wm.objective
    for sid, e in maps.items():
        if narrow_is_a:
            assert torch.equal(wm.perms[sid], e)
        else:
            want = torch.full((ir_a.space(sid).n,), -1, dtype=torch.long)
            want[e] = torch.arange(len(e))
            assert torch.equal(wm.perms[sid], want)
    return wm, aligned


def test_mlp_recovers_zero_padded_embedding_both_directions():
    torch.manual_seed(0)
    a = zoo.mlp(16, (12, 10), 4)
    ir_a, ir_b = lower(a, X_MLP, "a"), lower(zoo.mlp(16, (20, 15), 4), X_MLP, "b")
    maps = _embedding(ir_a, ir_b, seed=0)
    b = zoo.mlp(16, (20, 15), 4)
    b.load_state_dict(_embed(ir_a, ir_b, a.state_dict(), maps))
    _check_recovery(a, b, ir_a, ir_b, maps, narrow_is_a=True)
    _check_recovery(b, a, ir_b, ir_a, maps, narrow_is_a=False)


def test_bidirectional_case_wider_in_one_space_narrower_in_the_next():
    torch.manual_seed(0)
    core = zoo.mlp(16, (10, 10), 4)
    ir_k = lower(core, X_MLP, "core")
    ir_a, ir_b = lower(zoo.mlp(16, (12, 20), 4), X_MLP, "a"), lower(zoo.mlp(16, (20, 12), 4), X_MLP, "b")
    sa = _embed(ir_k, ir_a, core.state_dict(), _embedding(ir_k, ir_a, seed=2))
    sb = _embed(ir_k, ir_b, core.state_dict(), _embedding(ir_k, ir_b, seed=3))
    wm = weight_match(ir_a, ir_b, pair_spaces(ir_a, ir_b), sa, sb)
    assert _max_diff(sa, align_state(ir_a, ir_b, sb, wm)) <= 1e-6
    assert wm.objective == pytest.approx(_sq(core.state_dict(), ir_k), rel=1e-9)


def test_resnet20_recovers_embedding_and_function(resnets):
    small, wide, ir_s, ir_w, maps = resnets
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(wide(x), small(x), atol=1e-5)          # the padding is function-preserving
    _, aligned = _check_recovery(small, wide, ir_s, ir_w, maps, narrow_is_a=True)
    merged = copy.deepcopy(small)
    merged.load_state_dict(interpolate(small.state_dict(), aligned, 0.5))
    with torch.no_grad():
        assert torch.allclose(merged(x), small(x), atol=1e-5)
    _check_recovery(wide, small, ir_w, ir_s, maps, narrow_is_a=False)


def test_same_width_recovers_hidden_permutation():
    a = randomized(zoo.vgg11(width=0.25), seed=3)
    ir = lower(a, X_IMG, "v")
    perms = random_permutation(ir, seed=5)
    sb = permute_state(ir, a.state_dict(), perms)
    wm = weight_match(ir, ir, pair_spaces(ir, ir), a.state_dict(), sb)
    for sid, p in perms.items():
        assert torch.equal(wm.perms[sid], p.argsort())
    assert wm.objective == pytest.approx(_sq(a.state_dict(), ir), rel=1e-9)
    assert _max_diff(a.state_dict(), align_state(ir, ir, sb, wm)) <= 1e-6


@pytest.mark.parametrize("build, sweeps", [(lambda w: zoo.resnet20(w), 50),
                                            (lambda w: zoo.vgg11(width=0.25 * w), 6)],
                         ids=["resnet20", "vgg11"])
def test_history_is_monotone_on_random_models(build, sweeps):
    torch.manual_seed(0)
    a, b = randomized(build(1), seed=1), randomized(build(2), seed=2)
    ir_a, ir_b = lower(a, X_IMG, "a"), lower(b, X_IMG, "b")
    finals = []
    for (x, ir_x), (y, ir_y) in [((a, ir_a), (b, ir_b)), ((b, ir_b), (a, ir_a))]:
        wm = weight_match(ir_x, ir_y, pair_spaces(ir_x, ir_y), x.state_dict(), y.state_dict(),
                          seed=4, max_iter=sweeps)
        h = wm.history
        assert len(h) == 1 + wm.sweeps * len(ir_x.free_spaces) and 1 <= wm.sweeps <= sweeps
        assert all(h2 >= h1 - 1e-9 * abs(h1) for h1, h2 in zip(h, h[1:]))
        assert h[-1] > h[0] + 0.1 * abs(h[0]) + 1.0
        finals.append(h[-1])
    assert finals[0] == pytest.approx(finals[1], rel=1e-9)      # ⟨A, P(B)⟩ is symmetric in A, B


class _SelfLoop(torch.nn.Module):
    """``h + lin(h)``: ``lin.weight`` holds one space on both dims (the objective is quadratic)."""

    def __init__(self, w):
        super().__init__()
        self.fc1, self.lin, self.fc2 = torch.nn.Linear(16, w), torch.nn.Linear(w, w), torch.nn.Linear(w, 4)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h + self.lin(h))


def test_space_on_two_dims_of_one_tensor_stays_monotone():
    torch.manual_seed(0)
    a, b = _SelfLoop(12), _SelfLoop(20)
    ir_a, ir_b = lower(a, X_MLP, "a"), lower(b, X_MLP, "b")
    wm = weight_match(ir_a, ir_b, pair_spaces(ir_a, ir_b), a.state_dict(), b.state_dict())
    assert all(h2 >= h1 for h1, h2 in zip(wm.history, wm.history[1:])) and wm.objective > wm.history[0]
    p = wm.perms[1]
    assert len(set(p.tolist())) == 12 and p.min() >= 0 and p.max() < 20
    assert align_state(ir_a, ir_b, b.state_dict(), wm)["lin.weight"].shape == (12, 12)


def test_grouped_spaces_keep_identity_and_reject_width_changes():
    a, b = GNNet(c=16), GNNet(c=16)
    ir_a, ir_b = lower(a, torch.randn(2, 3, 8, 8), "a"), lower(b, torch.randn(2, 3, 8, 8), "b")
    wm = weight_match(ir_a, ir_b, pair_spaces(ir_a, ir_b), a.state_dict(), b.state_dict())
    assert any("grouped" in n for n in wm.notes)
    assert all(torch.equal(p, torch.arange(len(p))) for p in wm.perms.values())
    assert _max_diff(b.state_dict(), align_state(ir_a, ir_b, b.state_dict(), wm)) == 0
    ir_w = lower(GNNet(c=32), torch.randn(2, 3, 8, 8), "w")
    with pytest.raises(MergeError, match="grouped"):
        weight_match(ir_a, ir_w, pair_spaces(ir_a, ir_w), a.state_dict(), GNNet(c=32).state_dict())


def test_interpolate_endpoints_and_layer_selection(resnets):
    small, wide, ir_s, ir_w, _ = resnets
    sa = small.state_dict()
    other = randomized(zoo.resnet20(2), seed=9).state_dict()
    wm = weight_match(ir_s, ir_w, pair_spaces(ir_s, ir_w), sa, other, max_iter=2)
    aligned = align_state(ir_s, ir_w, other, wm)
    assert _max_diff(interpolate(sa, aligned, 0.0), sa) == 0
    float_keys = [k for k in sa if sa[k].is_floating_point()]
    one = interpolate(sa, aligned, 1.0)
    assert _max_diff({k: one[k] for k in float_keys}, aligned) == 0
    half = interpolate(sa, aligned, 0.5, layers=["layer1", "fc"])
    for k in float_keys:
        picked = k.startswith(("layer1.", "fc."))
        want = (sa[k] + aligned[k]) / 2 if picked else sa[k]
        assert torch.allclose(half[k], want, atol=1e-6), k
        assert picked == (not torch.equal(half[k], sa[k])), k
    with pytest.raises(MergeError, match="layer1"):
        interpolate(sa, aligned, 0.5, layers=["layer9"])


def test_loss_along_lambda(tmp_path):
    torch.manual_seed(0)
    a, b = zoo.mlp(16, (12, 10), 4), zoo.mlp(16, (20, 15), 4)
    ir_a, ir_b = lower(a, X_MLP, "a"), lower(b, X_MLP, "b")
    wm = weight_match(ir_a, ir_b, pair_spaces(ir_a, ir_b), a.state_dict(), b.state_dict())
    aligned = align_state(ir_a, ir_b, b.state_dict(), wm)
    data = [(torch.randn(8, 16), torch.randint(0, 4, (8,))) for _ in range(3)]
    before = copy.deepcopy(a.state_dict())
    calls = []
    path = loss_along_lambda(a, a.state_dict(), aligned, data, F.cross_entropy,
                             repair=lambda m: calls.append(m))
    assert len(path.lambdas) == len(path.losses) == len(calls) == 21 and path.lambdas[10] == 0.5
    assert all(m is not a for m in calls) and _max_diff(before, a.state_dict()) == 0
    b_aligned = copy.deepcopy(a)
    b_aligned.load_state_dict(aligned)
    with torch.no_grad():
        for model, loss in [(a, path.losses[0]), (b_aligned, path.losses[-1])]:
            assert loss == pytest.approx(sum(float(F.cross_entropy(model(x), y)) for x, y in data) / 3)
    assert path.barrier == pytest.approx(max(path.losses) - (path.losses[0] + path.losses[-1]) / 2)
    out = plot(path, tmp_path / "one.png")
    both = plot_paths({"all": path, "flat": LambdaPath([0, 1], [1.0, 1.0], 0.0)}, tmp_path / "two.png")
    for f in (out, both):
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 1000


def test_compile_merge_mal_recovers_the_narrow_model_and_keeps_a_architecture(resnets):
    """method="mal": merging A with a function-preserving widened copy of itself gives A back."""
    small, wide, *_ = resnets
    from hmir import compile_merge

    batches = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    res = compile_merge(small, wide, batches, method="mal", lam=0.5, repair=False, progress=False)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (res.module(x) - small(x)).abs().max() <= 1e-5
    assert {k: v.shape for k, v in res.module.state_dict().items()} == \
        {k: v.shape for k, v in small.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in wide.state_dict().items())   # inputs untouched
    assert any("mal: weight matching objective" in n for n in res.report.notes)


def test_compile_merge_mal_lambda_and_layers_on_unrelated_models():
    from hmir import compile_merge

    a, b = randomized(zoo.resnet20(1), seed=1), randomized(zoo.resnet20(2), seed=2)
    batches = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    x = torch.randn(4, 3, 32, 32)
    zero = compile_merge(a, b, batches, method="mal", lam=0.0, repair=False, progress=False)
    with torch.no_grad():
        assert (zero.module(x) - a(x)).abs().max() <= 1e-5            # λ = 0 is A
    part = compile_merge(a, b, batches, method="mal", lam=0.7, layers=["layer3"], repair=False,
                         progress=False)
    sa, sm = a.state_dict(), part.module.state_dict()
    changed = {k.split(".")[0] for k in sa if sa[k].is_floating_point() and not torch.equal(sa[k], sm[k])}
    assert changed == {"layer3"}
    with pytest.raises(MergeError, match="lam must be in"):
        compile_merge(a, b, batches, method="mal", lam=1.5, progress=False)
    with pytest.raises(MergeError, match="similarity_alpha has no effect"):
        compile_merge(a, b, batches, method="mal", similarity_alpha=0.5, progress=False)
    with pytest.raises(MergeError, match="valid methods"):
        compile_merge(a, b, batches, method="mall", progress=False)
