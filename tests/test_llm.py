"""Decoder LLMs and other transformer families through the export frontend: rotary embeddings
(pinned head units), grouped-query attention (views), eager attention, T5's per-head bias.

Per family: permutation invariance with heads that really moved and a negative control,
merge(A, A) = A, merge(A, head-permuted A) recovers A, depth- and width-heterogeneous merges,
ONNX parity. Tiny configs (hidden 64, 4 heads, 2 layers) from :mod:`hmir.harness.hf_zoo`.
"""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import slow_except
from hmir import compile_merge
from hmir.errors import IncompatibleModelsError, MergeError
from hmir.frontends.export import lower
from hmir.harness import hf_zoo
from hmir.harness.permute import permute_state, random_permutation
from hmir.ir.parts import is_pinned

transformers = pytest.importorskip("transformers")

FAMILIES = {                       # name: (hf_zoo family, config overrides)
    "llama": ("llama", {}),
    "llama_gqa": ("llama", {"heads": 8, "kv_heads": 2}),
    "llama_eager": ("llama", {"attn_implementation": "eager"}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "phi": ("phi", {}),
    "t5": ("t5", {}),
    "gpt2": ("gpt2", {}),
    "gpt_neox": ("gpt_neox", {}),
}
FAST = ("llama_gqa", "phi")
_CACHE: dict = {}


def logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return next(iter(out.values()))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def run(model, x) -> torch.Tensor:
    with torch.no_grad():
        return logits(model(x))


def family(name: str, seed: int = 0, **kw):
    """The tiny model, its IR and a head-permuted copy (cached per name and seed)."""
    key = (name, seed, tuple(sorted(kw.items())))
    if key not in _CACHE:
        fam, over = FAMILIES[name]
        m = hf_zoo.build(fam, seed=seed, **{**over, **kw})
        ir = lower(m, hf_zoo.tokens(), name)
        p = copy.deepcopy(m)
        p.load_state_dict(permute_state(ir, m.state_dict(), random_permutation(ir, seed=7)))
        _CACHE[key] = m, ir, p
    return _CACHE[key]


def rel(a, b) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("name", slow_except(FAMILIES, *FAST))
def test_permutation_invariance(name):
    m, ir, p = family(name)
    x = hf_zoo.tokens(seed=3)
    moved = [n for n, t in m.state_dict().items() if not torch.equal(t, p.state_dict()[n])]
    assert any(w in n for n in moved for w in ("q_proj", "query", ".q.", "c_attn")), moved
    # attention heads really moved
    assert rel(run(m, x), run(p, x)) < 1e-4


def _break_pinned(ir, state):
    """Swap two units inside one head of the first space with pinned (rotary) units."""
    s = next(s for s in ir.free_spaces if is_pinned(s.parts))
    perm = torch.arange(s.n)
    perm[[0, 1]] = perm[[1, 0]]
    return permute_state(ir, state, {s.id: perm})


def _break_view(ir, state):
    """Move one kv head without moving the query heads that read it."""
    s = next(s for s in ir.free_spaces if s.view is None and
             any(v.view and v.view.base == s.id for v in ir.spaces))
    k = s.group_size
    perm = torch.cat([torch.arange(k, 2 * k), torch.arange(k), torch.arange(2 * k, s.n)])
    return permute_state(ir, state, {s.id: perm})


@pytest.mark.parametrize("name,breaker", slow_except(
    [("llama", _break_pinned), ("phi", _break_pinned), ("llama_gqa", _break_view)], "llama_gqa"))
def test_negative_control(name, breaker):
    """A permutation that ignores the pinned units or the views changes the function."""
    m, ir, _ = family(name)
    x = hf_zoo.tokens(seed=3)
    bad = copy.deepcopy(m)
    bad.load_state_dict(breaker(ir, m.state_dict()))
    assert rel(run(m, x), run(bad, x)) > 1e-3


def test_structure_recorded():
    """Rotary heads are pinned (Phi: only the rotary half), GQA query heads view kv heads."""
    _, ir, _ = family("phi")
    parts = {s.parts for s in ir.spaces if s.group_size > 1}
    assert ((0, 8, True), (8, 16, False)) in parts
    _, ir, _ = family("llama_gqa")
    views = [s.view for s in ir.spaces if s.view is not None]
    assert views and {v.rep for v in views} == {4}
    _, ir, _ = family("gpt_neox")                   # fused q|k|v heads: q, k pinned, v free
    assert ((0, 32, True), (32, 48, False)) in {s.parts for s in ir.spaces}
    _, ir, _ = family("t5")
    bias = next(s for s in ir.spaces if any("relative_attention_bias" in sl.param for sl in s.slices))
    assert bias.group_size == 1 and bias.group_class in {s.group_class for s in ir.spaces
                                                          if s.group_size > 1}


FAST_MERGES = {("llama_gqa", "permute"), ("phi", "zip")}


@pytest.mark.parametrize("name,method", [
    pytest.param(f, m, marks=() if (f, m) in FAST_MERGES else pytest.mark.slow)
    for f in FAMILIES for m in ("avg", "permute", "zip")])
def test_self_merge_and_recovery(name, method):
    m, _, p = family(name)
    data, x = hf_zoo.tokens(3), hf_zoo.tokens(seed=5)
    y = run(m, x)
    r = compile_merge(m, copy.deepcopy(m), data, method=method, progress=False)
    assert rel(y, run(r.module, x)) < 1e-5
    if method != "avg":                   # plain averaging does not align: nothing to recover
        r = compile_merge(m, p, data, method=method, progress=False)
        assert rel(y, run(r.module, x)) < 1e-5


@pytest.mark.parametrize("name", slow_except(
    ["llama", "llama_gqa", "mistral", "qwen2", "phi", "t5", "gpt2", "gpt_neox"], "gpt2"))
def test_depth_heterogeneous(name):
    fam, over = FAMILIES[name]
    a = hf_zoo.build(fam, layers=2, **over)
    b = hf_zoo.build(fam, layers=4, seed=1, **over)
    r = compile_merge(a, b, hf_zoo.tokens(3), method="zip", depth="lma", progress=False)
    y = run(r.module, hf_zoo.tokens(seed=5))
    assert torch.isfinite(y).all() and y.shape == run(a, hf_zoo.tokens(seed=5)).shape


def test_width_heterogeneous_rotary_heads():
    """64 wide / 4 heads + 128 wide / 8 heads: rotary heads keep 16 units, so the merged model
    has 8 heads of 16 (width 'max')."""
    a = hf_zoo.build("llama")
    b = hf_zoo.build("llama", hidden=128, heads=8, seed=1)
    r = compile_merge(a, b, hf_zoo.tokens(3), method="zip", progress=False)
    y = run(r.module, hf_zoo.tokens(seed=5))
    assert torch.isfinite(y).all()
    q = r.module.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert q.shape == (128, 128)
    assert any("whole heads zipped to 8 heads of 16 units" in n for n in r.report.notes)


@pytest.mark.parametrize("name", slow_except(["mistral", "qwen2", "phi", "gpt2"], "gpt2"))
def test_width_heterogeneous(name):
    """64 wide / 4 heads + 128 wide / 8 heads merge (rotary families: 8 heads of 16; GPT-2,
    no rotary: A's 4 heads of 32, its c_attn split size rewritten)."""
    fam, over = FAMILIES[name]
    a, b = hf_zoo.build(fam, **over), hf_zoo.build(fam, hidden=128, heads=8, seed=1, **over)
    r = compile_merge(a, b, hf_zoo.tokens(3), method="zip", progress=False)
    assert torch.isfinite(run(r.module, hf_zoo.tokens(seed=5))).all()


@pytest.mark.slow
@pytest.mark.parametrize("name,kw,error,message", [
    ("gpt_neox", {}, MergeError, "shares its heads with a view"),
    ("t5", {}, IncompatibleModelsError, "does not correspond"),
])
def test_width_heterogeneous_refused(name, kw, error, message):
    """Fused q|k|v heads of different head counts, and an encoder whose output width differs,
    are clear errors."""
    fam, over = FAMILIES[name]
    a, b = hf_zoo.build(fam, **over), hf_zoo.build(fam, hidden=128, heads=8, seed=1, **over)
    with pytest.raises(error, match=message):
        compile_merge(a, b, hf_zoo.tokens(2), method="zip", progress=False)


def test_gqa_different_kv_heads_is_a_clear_error():
    a = hf_zoo.build("llama", heads=8, kv_heads=2)
    b = hf_zoo.build("llama", heads=8, kv_heads=4, seed=1)
    with pytest.raises(MergeError, match="grouped-query attention"):
        compile_merge(a, b, hf_zoo.tokens(2), method="zip", progress=False)


@pytest.mark.parametrize("name", slow_except(
    ["llama", "llama_gqa", "mistral", "qwen2", "phi", "t5", "gpt2", "gpt_neox"], "llama_gqa"))
def test_onnx_parity(name, tmp_path):
    m, _, _ = family(name)
    b = family(name, seed=1)[0]
    r = compile_merge(m, b, hf_zoo.tokens(3), method="zip", progress=False)
    out = r.to_onnx(tmp_path / "m.onnx")
    assert out.max_abs_diff < 1e-4
