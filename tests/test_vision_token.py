"""Layers over a non-feature axis (token mixing, constant tables) and the fx frontend's shape
arithmetic, functional norms and parameter views, on real timm / torchvision architectures.

A token axis is positions, not a permutation symmetry: a linear reading it gets a *fixed* space
(never permuted, merged unit i with unit i) and its output a fresh space, free while it feeds
ops that permute, fixed where it is added back into the token axis of the residual stream.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from conftest import randomized, rel_err
from hmir import compile_merge
from hmir.errors import IncompatibleModelsError, UnsupportedOpError
from hmir.frontends.select import lower_with
from hmir.harness.permute import permute_state, random_permutation


def nontrivial(model: nn.Module, seed: int = 0) -> nn.Module:
    """``randomized`` (norm statistics and affine params) and no constant float tensor: a zero
    head, a layer scale of 1e-5 everywhere or a ones scale would hide a wrong permutation."""
    m, g = randomized(model, seed), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in m.state_dict().values():
            if t.is_floating_point() and t.numel() > 1 and bool((t == t.flatten()[0]).all()):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    return m


def assert_invariant(model: nn.Module, x: torch.Tensor, frontend: str):
    """Permuting every free space leaves the output unchanged (compared in float64, where
    rounding cannot hide a wrong permutation); returns the IR."""
    model = nontrivial(model)
    ir = lower_with(frontend, model, x, type(model).__name__)
    assert ir.frontend == frontend
    perms = random_permutation(ir, seed=1)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(permute_state(ir, model.state_dict(), perms))
    with torch.no_grad():
        y, yp = model.double()(x.double()), permuted.double()(x.double())
    assert rel_err(y, yp) <= 1e-9
    model.float()
    return ir


def positions(ir, param: str, dim: int):
    return [s for s in ir.spaces if any(sl.param == param and sl.dim == dim for sl in s.slices)]


def mixer(patch: int = 8, **kw):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.models.mlp_mixer.MlpMixer(img_size=32, patch_size=patch, num_blocks=2,
                                          embed_dim=32, num_classes=10, **kw).eval()


def resmlp():
    timm = pytest.importorskip("timm")
    mm = timm.models.mlp_mixer
    return mixer(mlp_ratio=4, block_layer=mm.ResBlock, norm_layer=mm.Affine)


@pytest.mark.parametrize("frontend", ["export", "fx"])
def test_mixer_token_mixing(frontend):
    """The token MLP reads a fixed space of the 16 tokens; its hidden units are free; its output
    (added back into the residual stream's token axis) is fixed."""
    ir = assert_invariant(mixer(), torch.randn(2, 3, 32, 32), frontend)
    (tok_in,) = positions(ir, "blocks.0.mlp_tokens.fc1.weight", 1)
    (hidden,) = positions(ir, "blocks.0.mlp_tokens.fc1.weight", 0)
    (tok_out,) = positions(ir, "blocks.0.mlp_tokens.fc2.weight", 0)
    assert (tok_in.n, tok_in.fixed, hidden.fixed, tok_out.n, tok_out.fixed) == (16, True, False,
                                                                                16, True)
    assert "positions" in tok_in.fixed_reason and "positions" in tok_out.fixed_reason


def test_resmlp_linear_tokens_self_merge():
    """ResMLP's ``linear_tokens`` (tokens to tokens) and its affine ``addcmul``: merge(A, A) = A."""
    m, x = nontrivial(resmlp()), torch.randn(2, 3, 32, 32)
    assert_invariant(m, x, "export")
    r = compile_merge(m, copy.deepcopy(m), [torch.randn(4, 3, 32, 32) for _ in range(2)],
                      method="zip", repair=False, progress=False, frontend="export")
    with torch.no_grad():
        assert rel_err(m(x), r.module(x)) <= 1e-5


@pytest.mark.slow
def test_mixer_self_merge_and_onnx():
    m, x = nontrivial(mixer()), torch.randn(2, 3, 32, 32)
    r = compile_merge(m, copy.deepcopy(m), [torch.randn(4, 3, 32, 32) for _ in range(2)],
                      method="zip", repair=False, progress=False, frontend="export")
    with torch.no_grad():
        y = m(x)
        assert rel_err(y, r.module(x)) <= 1e-5
    r.to_onnx(pytest.importorskip("tempfile").mkdtemp() + "/mixer.onnx",
              atol=1e-4 * float(y.abs().max()))


def test_different_token_counts_are_a_clear_error():
    a, b = mixer(patch=8), mixer(patch=4)            # 16 and 64 tokens of one 32x32 image
    with pytest.raises(IncompatibleModelsError, match=r"positions:.*width 16.*width 64"):
        compile_merge(a, b, [torch.randn(4, 3, 32, 32)], progress=False, frontend="export")


class ParamTokenMix(nn.Module):
    """``W @ x`` over the token dim (a matmul with a bare parameter) and a per-token bias."""

    def __init__(self, tokens: int = 6, c: int = 8):
        super().__init__()
        self.emb, self.head = nn.Linear(4, c), nn.Linear(c, 3)
        self.mix = nn.Parameter(torch.randn(tokens, tokens) / tokens)

    def forward(self, x):
        h = self.emb(x)
        return self.head((h + torch.matmul(self.mix, h)).mean(1))


def test_matmul_with_parameter_over_tokens():
    ir = assert_invariant(ParamTokenMix(), torch.randn(2, 6, 4), "export")
    assert [(s.n, s.fixed) for s in positions(ir, "mix", 1)] == [(6, True)]
    assert [(s.n, s.fixed) for s in positions(ir, "mix", 0)] == [(6, True)]


def test_swin_v2_constant_coordinate_table():
    """Swin V2's ``cpb_mlp`` reads the constant ``relative_coords_table`` as data."""
    pytest.importorskip("torchvision")
    from torchvision.models.swin_transformer import (PatchMergingV2, SwinTransformer,
                                                     SwinTransformerBlockV2)
    torch.manual_seed(0)
    m = SwinTransformer([4, 4], 16, [2, 2], [2, 4], [4, 4], stochastic_depth_prob=0.0,
                        num_classes=10, block=SwinTransformerBlockV2,
                        downsample_layer=PatchMergingV2)
    try:
        ir = assert_invariant(m, torch.randn(2, 3, 32, 32), "export")
    except UnsupportedOpError as e:             # an op of another rule file (not a linear)
        if "which has no lowering rule" not in str(e) or "linear" in str(e).split("\n")[0]:
            raise
        pytest.skip(str(e).split("\n")[0])
    name = "features.1.0.attn.relative_coords_table"
    assert name in ir.unsliced
    (coords,) = positions(ir, "features.1.0.attn.cpb_mlp.0.weight", 1)
    assert (coords.n, coords.fixed) == (2, True)


# -- the fx frontend: shape asserts, functional norms, parameter views -----------------------
class ShapeArith(nn.Module):
    """``H == 8`` asserted, ``C // 2``, ``reshape_as`` and ``F.layer_norm`` with get_attr params."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 3)
        self.w, self.b = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.randn(8))

    def forward(self, x):
        torch._assert(x.shape[2] == 8, "height")
        h = self.conv(x)
        h = h.reshape_as(h) * (h.shape[1] // 2)
        h = nn.functional.layer_norm(h.permute(0, 2, 3, 1), (8,), self.w, self.b)
        return self.fc(h.mean((1, 2)))


def test_fx_shape_arithmetic_and_functional_layer_norm():
    ir = assert_invariant(ShapeArith(), torch.randn(2, 3, 8, 8), "fx")
    (c,) = positions(ir, "conv.weight", 0)
    assert not c.fixed and {"w", "b"} <= {sl.param for sl in c.slices}


@pytest.mark.parametrize("name", ["convnext_atto", "poolformer_s12", "resmlp_12_224"])
def test_fx_timm(name):
    """convnext: ``F.layer_norm`` (LayerNorm2d) and ``gamma.reshape(1, -1, 1, 1)``; poolformer:
    ``F.group_norm``; resmlp: PatchEmbed's shape asserts, ``addcmul`` and token mixing."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    kw = {"img_size": 32} if name.startswith("resmlp") else {}
    m = timm.create_model(name, pretrained=False, num_classes=10, **kw)
    ir = assert_invariant(m, torch.randn(2, 3, 32, 32), "fx")
    assert sum(s.fixed for s in ir.spaces) == (2 if name != "resmlp_12_224" else 4)
