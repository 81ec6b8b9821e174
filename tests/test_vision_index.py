"""Vision models through torch.export: gathered relative-position bias tables, parameters read
directly by elementwise ops (layer scales, per-head biases), group_norm, addcmul, norms over
feature dims, pad/roll on positions (frontends/aten_index_rules.py).

Each model is checked for permutation invariance (with randomised norm statistics, layer
scales and bias tables), for self-merge reproducing the model, and (slow) ONNX parity.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from hmir import compile_merge
from hmir.errors import LoweringError
from hmir.frontends.export import lower
from hmir.harness.permute import permute_state, random_permutation

torch.set_num_threads(1)


def _randomise(m: nn.Module) -> nn.Module:
    """Norm statistics, affine parameters, layer scales and bias tables away from their init."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.normal_(0, 0.3, generator=g)
                mod.running_var.uniform_(0.5, 2, generator=g)
        for n, p in m.named_parameters():
            if p.dim() <= 1 or p.dim() != 2 and p.dim() != 4 or "bias" in n or "gamma" in n:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m.eval()


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).abs().max() / ref.abs().max()).item()


def _check(m: nn.Module, x: torch.Tensor, params: tuple[str, ...] = (), merge: bool = True):
    """Lowered by export; a random permutation leaves outputs unchanged and moves ``params``;
    merge(m, m) reproduces m. Returns the IR."""
    m = _randomise(m)
    with torch.no_grad():
        ref = m(x)
    ir = lower(m, x)
    state = permute_state(ir, m.state_dict(), random_permutation(ir, seed=0))
    for p in params:
        assert not torch.equal(state[p], m.state_dict()[p]), f"{p} was not permuted"
    mp = copy.deepcopy(m)
    mp.load_state_dict(state)
    with torch.no_grad():
        assert _rel(mp(x), ref) < 1e-5
    if merge:
        res = compile_merge(m, copy.deepcopy(m), [torch.randn(4, *x.shape[1:])],
                            method="zip", repair=False, progress=False, frontend="export")
        with torch.no_grad():
            assert _rel(res.module(x), ref) < 1e-5
    return ir


def _swin():
    import torchvision
    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2],
                                              num_heads=[2, 4], window_size=[4, 4], num_classes=10)


def _heads_class(ir, param: str) -> bool:
    """``param`` is sliced on a space of one unit per head, linked to a grouped space."""
    (s,) = [s for s in ir.spaces if any(sl.param == param for sl in s.slices)]
    return s.group_size == 1 and any(t.group_class == s.group_class and t.group_size > 1
                                     for t in ir.spaces)


def test_swin_relative_position_bias_and_shifted_windows():
    """torchvision Swin: table[relative_position_index] -> view -> permute -> add to the
    scores binds the table's heads dim; roll, pad and the shift mask are positions."""
    table = "features.3.0.attn.relative_position_bias_table"      # 4 heads
    ir = _check(_swin(), torch.randn(2, 3, 32, 32), params=(table,))
    assert _heads_class(ir, table)


def test_swin_v2_cpb_table_cosine_attention_and_logit_scale():
    """Swin V2: cpb_mlp over the coordinate table, gathered, 16 * sigmoid, added to the scores;
    F.normalize of q and k over head units; a per-head logit_scale. Its qkv bias, copied and
    zeroed in place (qkv_bias[C:2C].zero_()), is tested in test_vision_wave2a.py; without it the model merges."""
    from torchvision.models import swin_transformer as st
    m = st.SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4],
                           window_size=[4, 4], num_classes=10, block=st.SwinTransformerBlockV2,
                           downsample_layer=st.PatchMergingV2)
    x = torch.randn(2, 3, 32, 32)
    for mod in m.modules():
        if isinstance(mod, st.ShiftedWindowAttentionV2):
            mod.qkv.bias = None
    ir = _check(m, x, params=("features.3.0.attn.logit_scale",))
    assert _heads_class(ir, "features.3.0.attn.logit_scale")


class _BiasedAttention(nn.Module):
    """LeViT-style attention: biases[:, idxs] added to q @ k.T (one bias row per head)."""

    def __init__(self, dim=16, heads=4, n=9, flat=False):
        super().__init__()
        self.h, self.flat = heads, flat
        self.qkv = nn.ModuleList(nn.Linear(dim, dim) for _ in range(3))
        self.proj = nn.Linear(dim, 6)
        self.biases = nn.Parameter(torch.randn(heads, 5))
        self.register_buffer("idxs", torch.randint(0, 5, (n, n)), persistent=False)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = (f(x).view(b, n, self.h, -1).transpose(1, 2) for f in self.qkv)
        if self.flat:                          # heads mixed with positions: no heads dim left
            bias = self.biases.flatten()[self.idxs.flatten() % 5].view(1, 1, n, n)
            bias = bias.expand(1, self.h, n, n) * self.biases.view(-1)[: self.h].view(1, -1, 1, 1)
        else:
            bias = self.biases[:, self.idxs]
        a = (q @ k.transpose(-2, -1) + bias).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, c))


def test_gathered_per_head_bias():
    ir = _check(_BiasedAttention(), torch.randn(2, 9, 16), params=("biases",))
    assert _heads_class(ir, "biases")


def test_parameter_dim_that_is_not_a_parameter_dim_is_an_error():
    m = _BiasedAttention(flat=True).eval()
    with pytest.raises(LoweringError, match="parameter"):
        lower(m, torch.randn(2, 9, 16))


def test_convnext_layer_scale_and_grn():
    """timm ConvNeXt (gamma.reshape(1, -1, 1, 1)) and ConvNeXt V2 (GRN: linalg_vector_norm,
    mean over channels, (1, 1, 1, C) parameters)."""
    convnext = pytest.importorskip("timm.models.convnext")
    m = convnext.ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=10, ls_init_value=0.5)
    _check(m, torch.randn(2, 3, 32, 32), params=("stages.0.blocks.0.gamma",))
    m2 = convnext.ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=10, use_grn=True,
                           ls_init_value=None)
    _check(m2, torch.randn(2, 3, 32, 32), params=("stages.0.blocks.0.mlp.grn.weight",))


def test_poolformer_group_norm_and_resmlp_addcmul():
    metaformer = pytest.importorskip("timm.models.metaformer")
    m = metaformer.MetaFormer(depths=[1, 1], dims=[16, 32], downsample_norm=None,
                              norm_layers=metaformer.GroupNorm1, layer_scale_init_values=0.5,
                              res_scale_init_values=None, use_mlp_head=False, num_classes=10)
    _check(m, torch.randn(2, 3, 32, 32), params=("stages.0.blocks.0.norm1.weight",
                                                 "stages.0.blocks.0.layer_scale1.scale"))
    mixer = pytest.importorskip("timm.models.mlp_mixer")
    r = mixer.MlpMixer(img_size=32, patch_size=8, num_blocks=1, embed_dim=32, mlp_ratio=2,
                       block_layer=mixer.ResBlock, norm_layer=mixer.Affine, num_classes=10)
    _check(r, torch.randn(2, 3, 32, 32), params=("blocks.0.norm1.alpha", "blocks.0.ls2"))


class _Positions(nn.Module):
    """A conv net that pads, rolls and adds a sin position code; ``bad`` pads/rolls channels."""

    def __init__(self, bad: str = ""):
        super().__init__()
        self.bad = bad
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        y = torch.sin(self.a(x))
        if self.bad == "pad":
            return nn.functional.pad(y, (0, 0, 0, 0, 1, 1)).sum(1)
        if self.bad == "roll":
            return torch.roll(y, 1, dims=1).sum(1)
        y = torch.roll(nn.functional.pad(y, (1, 1, 1, 1)), (2, -1), dims=(2, 3))
        return self.b(y + y.var(dim=1, keepdim=True) - y.std(dim=(2, 3), keepdim=True))


def test_pad_roll_on_positions_and_errors_on_channels():
    _check(_Positions(), torch.randn(2, 3, 8, 8), merge=False)
    for bad in ("pad", "roll"):
        with pytest.raises(LoweringError, match="carries features"):
            lower(_Positions(bad).eval(), torch.randn(2, 3, 8, 8))


@pytest.mark.slow
def test_swin_onnx_parity(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    m, x = _randomise(_swin()), torch.randn(2, 3, 32, 32)
    res = compile_merge(m, copy.deepcopy(m), [torch.randn(4, 3, 32, 32)], method="zip",
                        repair=False, progress=False, frontend="export")
    res.to_onnx(str(tmp_path / "swin.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "swin.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert (torch.from_numpy(out) - m(x)).abs().max().item() < 1e-4
