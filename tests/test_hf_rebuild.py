"""A merged Hugging Face model rebuilt as its source class with a new config
(:func:`hmir.backend.hf.rebuild_pretrained`, ``MergeResult.to_pretrained``): same outputs as the
merged GraphModule, save/load round trip, widths and depth in the config, clear errors."""
from __future__ import annotations

import pytest
import torch

from conftest import randomized, rel_err
from hmir import compile_merge
from hmir.backend.hf import RebuildError
from hmir.errors import LoweringError
from hmir.harness import hf_zoo, zoo

transformers = pytest.importorskip("transformers")


def bert(hidden=64, heads=4, layers=2, inter=128, seed=0):
    cfg = transformers.BertConfig(hidden_size=hidden, num_attention_heads=heads,
                                  num_hidden_layers=layers, intermediate_size=inter, vocab_size=100,
                                  max_position_embeddings=32, num_labels=3, initializer_range=0.2)
    torch.manual_seed(seed)
    return randomized(transformers.BertForSequenceClassification(cfg), seed)


def tokens(n=2, batch=8, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 100, (batch, seq), generator=g) for _ in range(n)]


def logits(model, x):
    with torch.no_grad():
        return model(x)["logits"]


def assert_same_function(result, model, batches):
    """The rebuilt model computes the merged GraphModule's function (also off the example)."""
    for x in (result.example, batches[-1]):
        assert rel_err(logits(result.module, x), logits(model, x)) <= 1e-4


@pytest.fixture(scope="module")
def self_merge():
    a, batches = bert(), tokens()
    return a, compile_merge(a, a, batches, method="zip", progress=False), batches


def test_merge_with_itself_is_the_source_class(self_merge):
    a, r, batches = self_merge
    model = r.to_pretrained()
    assert type(model) is type(a) and not model.training
    assert model.config.to_dict() == a.config.to_dict()
    assert_same_function(r, model, batches)
    assert rel_err(logits(a, batches[0]), logits(model, batches[0])) <= 1e-5    # merge(A, A) = A


def test_save_pretrained_round_trip(self_merge, tmp_path):
    _, r, batches = self_merge
    model = r.to_pretrained()
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    assert torch.equal(logits(model, batches[0]), logits(again, batches[0]))


def test_intermediate_width_in_config():
    """Intermediate sizes 128 and 256: the merged (max) 256 is the rebuilt config's."""
    batches = tokens()
    r = compile_merge(bert(inter=128), bert(inter=256, seed=1), batches, progress=False)
    model = r.to_pretrained()
    assert (model.config.intermediate_size, model.config.hidden_size) == (256, 64)
    assert_same_function(r, model, batches)


@pytest.mark.slow
@pytest.mark.xfail(raises=RebuildError, strict=False, reason=(
    "the emitted module of a hidden-width merge is not a BERT: the aten reshape of the attention "
    "output to (B, -1, S, 16) keeps A's head size (16) literal, so (B, 4, S, 32) becomes "
    "(B, 8, S, 16) and mixes sequence positions; and SDPA keeps A's scale=0.25 (1/sqrt 16) at "
    "head size 32. Both are emit/export-frontend issues, not rebuild's"))
def test_hidden_width_in_config():
    """hidden 64 / 4 heads with 128 / 8 heads: the rebuilt config has the merged hidden size."""
    batches = tokens()
    r = compile_merge(bert(), bert(hidden=128, heads=8, inter=256, seed=1), batches, progress=False)
    model = r.to_pretrained()
    assert (model.config.hidden_size, model.config.intermediate_size) == (128, 256)
    assert_same_function(r, model, batches)


def test_depth_in_config():
    """2 and 4 layers: A's two inserted zero blocks become layers of a 4-layer config, in the
    order the merged graph runs them."""
    batches = tokens()
    r = compile_merge(bert(layers=2), bert(layers=4, seed=1), batches, progress=False)
    assert any(k.startswith("hmir_inserted.") for k in r.module.state_dict())
    model = r.to_pretrained()
    assert model.config.num_hidden_layers == 4 and len(model.bert.encoder.layer) == 4
    assert_same_function(r, model, batches)


def test_layers_of_different_widths_cannot_be_rebuilt():
    """One layer's intermediate size set apart (a per-space width): no config expresses it."""
    from hmir.frontends.export import lower

    a, b, batches = bert(), bert(inter=256, seed=1), tokens()
    ir = lower(a, batches[0][:2])
    inter1 = next(s.name for s in ir.spaces if any(sl.param.endswith("layer.1.intermediate.dense.weight")
                                                   for sl in s.producers()))
    r = compile_merge(a, b, batches, width={inter1: 200, "default": "max"}, progress=False)
    with pytest.raises(RebuildError) as err:
        r.to_pretrained()
    msg = str(err.value)
    assert "layers of different widths" in msg and "intermediate_size" in msg
    assert "[200, 256]" in msg and "result.module" in msg
    assert logits(r.module, batches[0]).shape == (8, 3)          # the general answer still runs


def test_not_a_hugging_face_model():
    x = [torch.randn(8, 4) for _ in range(2)]
    r = compile_merge(zoo.mlp(4, (8,), 2), zoo.mlp(4, (8,), 2), x, progress=False)
    with pytest.raises(RebuildError, match="not a Hugging Face PreTrainedModel.*result.module"):
        r.to_pretrained()


def test_llama_rebuilds_and_generates():
    """A decoder LLM (grouped-query attention): rebuilt LlamaForCausalLM, parity, generate()."""
    a, b = hf_zoo.build("llama", kv_heads=2), hf_zoo.build("llama", kv_heads=2, seed=1)
    batches = hf_zoo.tokens(2, batch=4, seq=8)
    try:
        r = compile_merge(a, b, batches, progress=False)
    except LoweringError as e:        # UnsupportedOpError is a LoweringError
        pytest.skip(f"Llama does not lower yet: {type(e).__name__}: {str(e).splitlines()[0]}")
    model = r.to_pretrained()
    assert type(model) is type(a) and model.config.num_key_value_heads == 2
    assert_same_function(r, model, batches)
    x = batches[0]
    out = model.generate(x, max_new_tokens=3, do_sample=False)
    assert out.shape == (4, 11) and torch.equal(out[:, :8], x)
    assert torch.equal(out[:, 8], logits(r.module, x)[:, -1].argmax(-1))
