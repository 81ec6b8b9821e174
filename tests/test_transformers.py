"""Transformers through the torch.export frontend: heads as grouped spaces, permutation
invariance, merge(A, A) = A, merge(A, head-permuted A) recovers A, frontend selection."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn as nn

from conftest import randomized, rel_err, slow_except
from hmir import compile_merge
from hmir.harness import zoo
from hmir.errors import HMIRError, TraceError, UnsupportedOpError
from hmir.frontends.export import lower as export_lower
from hmir.harness.permute import permute_state, random_permutation

transformers = pytest.importorskip("transformers")


def bert(cls="BertForSequenceClassification", hidden=64, layers=2, heads=4, seed=0, **kw):
    cfg = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, intermediate_size=2 * hidden,
                                  vocab_size=100, max_position_embeddings=32, num_labels=3,
                                  initializer_range=0.2, **kw)   # attention far from uniform
    torch.manual_seed(seed)
    return randomized(getattr(transformers, cls)(cfg), seed)


def vit(seed=0, layers=2):
    from torchvision.models import VisionTransformer

    torch.manual_seed(seed)
    m = VisionTransformer(image_size=32, patch_size=8, num_layers=layers, num_heads=4,
                          hidden_dim=64, mlp_dim=128, num_classes=10)
    nn.init.normal_(m.heads.head.weight, std=0.2)        # torchvision zero-inits the head
    return randomized(m, seed)


def tokens(n=4, batch=16, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 100, (batch, seq), generator=g) for _ in range(n)]


def images(n=4, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(n)]


def out(model, x):
    with torch.no_grad():
        y = model(x)
    return y if isinstance(y, torch.Tensor) else torch.cat([t.flatten(1) for t in y.values()], 1)


def permuted(model, ir, seed=1):
    perms = random_permutation(ir, seed)
    p = copy.deepcopy(model)
    p.load_state_dict(permute_state(ir, model.state_dict(), perms))
    return p, perms


MODELS = {
    "BertModel": (lambda: bert("BertModel"), tokens),
    "BertForSequenceClassification": (bert, tokens),
    "vit": (vit, images),
}


@pytest.mark.parametrize("name", slow_except(MODELS, "BertForSequenceClassification", "vit"))
def test_permutation_invariance(name):
    """Property 1 on the aten graph: every free space (heads as wholes, units within heads)."""
    make, data = MODELS[name]
    model, x = make(), data(1, batch=5)[0]
    ir = export_lower(model, x[:2], name)
    assert ir.frontend == "export"
    p, perms = permuted(model, ir)
    heads = [s for s in ir.spaces if s.group_size > 1]
    assert heads and all(s.groups == 4 for s in heads)
    assert any(not torch.equal(perms[s.id].view(4, -1)[:, 0] // s.group_size, torch.arange(4))
               for s in heads), "no head moved"
    assert rel_err(out(model, x), out(p, x)) <= 1e-5
    wrong = copy.deepcopy(model)
    sd = wrong.state_dict()
    qk = next(sl.param for sl in heads[0].producers())
    sd[qk] = sd[qk][torch.randperm(sd[qk].shape[0], generator=torch.Generator().manual_seed(0))]
    wrong.load_state_dict(sd)
    assert rel_err(out(model, x), out(wrong, x)) > 1e-3       # the check can fail


@pytest.mark.slow
def test_attention_spaces():
    """q and k share one head-grouped space, v with the output projection another, one group
    class; the residual stream is fixed for BertModel (its output) and free with a classifier."""
    x = tokens(1, batch=2)[0]
    for cls, fixed in (("BertModel", True), ("BertForSequenceClassification", False)):
        ir = export_lower(bert(cls), x, cls)
        qk = [s for s in ir.spaces if s.group_size == 16 and any(".query." in sl.param for sl in s.slices)]
        v = [s for s in ir.spaces if s.group_size == 16 and any(".value." in sl.param for sl in s.slices)]
        assert len(qk) == len(v) == 2
        for a, b in zip(qk, v):
            assert any(".key." in sl.param for sl in a.slices) and a.group_class == b.group_class
            assert any("attention.output.dense.weight" in sl.param for sl in b.consumers())
        assert ir.space(0).fixed is fixed


@pytest.mark.slow
@pytest.mark.parametrize("name", ["BertForSequenceClassification", "vit"])
@pytest.mark.parametrize("method", ["avg", "zip", "permute"])
def test_merge_with_itself(name, method):
    """Property 2: merge(A, A) = A for every method; the report says torch.export was used."""
    make, data = MODELS[name]
    model, batches = make(), data()
    r = compile_merge(model, model, batches, method=method, progress=False)
    assert r.report.frontends == ("export", "export")
    assert any("frontend: torch.export" in n for n in r.report.notes)
    assert rel_err(out(model, batches[0]), out(r.module, batches[0])) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["BertForSequenceClassification", "vit"])
def test_merge_recovers_head_permutation(name):
    """Property 2: merge(A, perm(A)) with 'permute' recovers heads and units within heads."""
    make, data = MODELS[name]
    model, batches = make(), data()
    ir = export_lower(model, batches[0][:2], name)
    p, _ = permuted(model, ir, seed=3)
    r = compile_merge(model, p, batches, method="permute", progress=False, frontend="export")
    assert rel_err(out(model, batches[0]), out(r.module, batches[0])) <= 1e-5
    assert any("group alignment" in n for n in r.report.notes)
    assert r.to_onnx(f"/tmp/hmir_test_{name}.onnx").max_abs_diff <= 1e-4


@pytest.mark.slow
def test_frontend_choice():
    """'fx' on BERT fails to trace; 'export' on a traceable CNN gives fx's spaces; bad names fail."""
    batches = tokens(2)
    with pytest.raises(TraceError, match="symbolic_trace"):
        compile_merge(bert(), bert(), batches, frontend="fx", progress=False)
    with pytest.raises(HMIRError, match="unknown frontend"):
        compile_merge(bert(), bert(), batches, frontend="onnx", progress=False)
    cnn, imgs = zoo.resnet20(), images(2)
    r = compile_merge(cnn, cnn, imgs, progress=False)
    assert r.report.frontends == ("fx", "fx")
    from hmir.frontends.fx import lower as fx_lower

    e, f = export_lower(cnn, imgs[0][:2]), fx_lower(cnn, imgs[0][:2])
    assert [(s.n, s.fixed, len(s.slices)) for s in e.spaces] == \
        [(s.n, s.fixed, len(s.slices)) for s in f.spaces]


class _Flip(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x).flip(-1)


def test_unsupported_aten_op_names_itself_and_source_line():
    with pytest.raises(UnsupportedOpError) as err:
        export_lower(_Flip(), torch.randn(2, 8), "flipper")
    msg = str(err.value)
    line = inspect.getsourcelines(_Flip.forward)[1] + 1
    assert "flipper" in msg and "aten.flip" in msg
    assert f"test_transformers.py:{line}" in msg and "register_aten" in msg


def _deviation(report) -> float:
    notes = [n for n in report.notes if "inflated model deviates" in n]
    assert len(notes) == 1
    return float(notes[0].split(" by ")[1].split()[0])


@pytest.mark.slow
def test_depth_hetero_vit_zero_blocks_are_exact():
    """Pre-norm encoder layers are residual units; a zero block (attention and MLP adding 0)
    leaves the 2-layer ViT's function exactly unchanged; the merge runs and exports."""
    a, b, batches = vit(0, layers=2), vit(1, layers=3), images()
    r = compile_merge(a, b, batches, method="zip", depth="lma", progress=False)
    assert any("1 zero block(s)" in n for n in r.report.notes)
    assert _deviation(r.report) <= 1e-6
    assert out(r.module, batches[0]).shape == (16, 10)
    assert r.to_onnx("/tmp/hmir_test_vit_depth.onnx").max_abs_diff <= 1e-4


@pytest.mark.slow
def test_depth_hetero_bert_4_and_6_layers():
    """A 4-layer and a 6-layer BERT (same width) merge with LMA + zip into a 6-layer model
    whose ONNX export matches. BERT is post-norm: x + 0 is normalised again, so a zero block
    is exact only up to that LayerNorm (scale 1, shift 0); the deviation is reported."""
    a, b, batches = bert(layers=4, seed=0), bert(layers=6, seed=1), tokens()
    r = compile_merge(a, b, batches, method="zip", depth="lma", progress=False)
    plan = r.report.depth
    al = next(al for al in plan.alignments if al is not None and al.m != al.n)
    assert (al.m, al.n, al.deeper) == (7, 5, "b") and al.method == "lma"
    assert len(al.positions) == 5 and al.positions[0] == 0 and al.positions[-1] == 6
    layers = {k.split(".")[3] for k in r.module.state_dict() if ".encoder.layer." in k}
    inserted = {k.split(".")[1] for k in r.module.state_dict() if k.startswith("hmir_inserted")}
    assert len(layers) == 4 and len(inserted) == 2
    assert 0 < _deviation(r.report) < 0.5
    assert out(r.module, batches[0]).shape == (16, 3)
    assert r.to_onnx("/tmp/hmir_test_bert_depth.onnx").max_abs_diff <= 1e-4


@pytest.mark.slow
def test_width_hetero_bert_4_and_8_heads():
    """hidden 128 / 4 heads + hidden 256 / 8 heads (head size 32 both), elastic zip to the
    larger width: A's 4 heads, each zipped with two of B's heads (rectangular group alignment),
    become 4 heads of 64 units; the head-size literal of every view is rewritten; ONNX parity."""
    a, b, batches = bert(hidden=128, heads=4, seed=0), bert(hidden=256, heads=8, seed=1), tokens()
    r = compile_merge(a, b, batches, method="zip", progress=False)
    free = [s for s in r.report.spaces if not s.fixed]
    assert all(s.width == max(s.width_a, s.width_b) == 2 * s.width_a for s in free)
    notes = [n for n in r.report.notes if "rectangular group alignment" in n]
    assert len(notes) == 2 and all("4 groups in model a, 8 in model b" in n for n in notes)
    sd = r.module.state_dict()
    assert sd["bert.encoder.layer.0.attention.self.query.weight"].shape == (256, 256)
    views = [n for n in r.module.graph.nodes if "view" in str(n.target) and len(n.args[1]) == 4]
    assert views and all(list(n.args[1][2:]) == [-1, 64] for n in views)      # 4 heads x 64
    x = batches[0]
    y = out(r.module, x)
    assert y.shape == (16, 3) and torch.isfinite(y).all()
    assert r.to_onnx("/tmp/hmir_test_bert_width.onnx").max_abs_diff <= 1e-4


@pytest.mark.slow
def test_lambda_path_on_trained_berts():
    """Seed Table IV analogue on a synthetic sequence task generated by examples/transformer_merge.py
    (no text data ships offline): two BERTs trained from scratch with different seeds; hmir's
    alignment (heads grouped) removes most of vanilla averaging's loss barrier. Aligned B is B
    permuted, so both paths end at the same loss."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "transformer_merge.py"
    spec = importlib.util.spec_from_file_location("transformer_merge", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.run()
    acc, paths = res["accuracy"], res["paths"]
    van, hm = paths["vanilla averaging"], paths["hmir permute (heads grouped)"]
    assert acc["A"] > 0.9 and acc["B"] > 0.9 and acc["hmir zip merge (λ=0.5)"] > 0.9
    assert len(hm["losses"]) == 21 and abs(hm["losses"][0] - van["losses"][0]) < 1e-6
    assert abs(hm["losses"][-1] - van["losses"][-1]) < 1e-4
    assert van["barrier"] > 0.1 and hm["barrier"] < 0.25 * van["barrier"]
