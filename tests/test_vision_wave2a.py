"""Patch merging as a flattened feature axis (``outer`` > 1) and in-place fills of a
parameter's copy (torchvision Swin V2's zeroed k bias), lowered with torch.export:
permutation invariance, self-merge and ONNX parity on real architectures."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hmir import compile_merge
from hmir.errors import LoweringError
from hmir.frontends.export import lower
from hmir.harness.permute import permute_state, random_permutation

torch.set_num_threads(1)


def _randomize(m: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if t.is_floating_point() and t.ndim == 1:
                r = torch.randn(t.shape, generator=g) * 0.5
                t.copy_(r.abs() + 0.5 if "running_var" in name else
                        r + (1.0 if "weight" in name else 0.0))
    return m.eval()


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _perm_check(m, x, seed=0):
    ir = lower(m, x)
    mp = copy.deepcopy(m)
    mp.load_state_dict(permute_state(ir, m.state_dict(), random_permutation(ir, seed=seed)))
    with torch.no_grad():
        assert _rel(mp(x), m(x)) < 1e-5
    return ir


def _self_merge(m, x, onnx_path=None):
    res = compile_merge(m, copy.deepcopy(m), [torch.randn(4, *x.shape[1:]) for _ in range(2)],
                        method="zip", repair=False, progress=False, frontend="export")
    with torch.no_grad():
        assert _rel(res.module(x), m(x)) < 1e-5
    if onnx_path is not None:
        res.to_onnx(str(onnx_path))


class Unmerge(nn.Module):
    """Patch merging (``(B, H, W, C) -> (B, H/2, W/2, 4C)``) and its reverse."""

    def __init__(self, c=6):
        super().__init__()
        self.inp, self.norm = nn.Linear(3, c), nn.LayerNorm(4 * c)
        self.mix, self.out = nn.Linear(4 * c, 5), nn.Linear(c, 5)

    def forward(self, x):                                   # x: (B, 3, H, W)
        y = self.inp(x.permute(0, 2, 3, 1))
        b, h, w, c = y.shape
        y = y.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        y = self.norm(y).relu()
        z = y.reshape(b, h // 2, w // 2, 2, 2, c).permute(0, 1, 4, 2, 3, 5).reshape(b, h, w, c)
        return self.out(z).mean((1, 2)) + self.mix(y).mean((1, 2))


def test_patch_merging_and_back():
    torch.manual_seed(0)
    m, x = _randomize(Unmerge()), torch.randn(2, 3, 8, 8)
    ir = _perm_check(m, x)
    assert {(sl.outer, sl.inner) for sl in ir.slices_of("norm.weight")} == {(4, 1)}
    assert {(sl.dim, sl.outer) for sl in ir.slices_of("mix.weight")} >= {(1, 4)}
    _self_merge(m, x)


def _timm_swin():
    S = pytest.importorskip("timm.models.swin_transformer")
    torch.manual_seed(0)
    return _randomize(S.SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=24,
                                        depths=(2, 2), num_heads=(2, 4), num_classes=10))


def test_timm_swin_patch_merging():
    ir = _perm_check(_timm_swin(), torch.randn(2, 3, 32, 32))
    assert {sl.outer for sl in ir.slices_of("layers.1.downsample.norm.weight")} == {4}


@pytest.mark.slow
def test_timm_swin_self_merge_onnx(tmp_path):
    _self_merge(_timm_swin(), torch.randn(2, 3, 32, 32), tmp_path / "swin.onnx")


class ZeroedBias(nn.Module):
    """A bias copy with a run zeroed in place: the run need not fall on a space boundary."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        b = self.fc.bias.clone()
        b[2:5].zero_()
        return self.out(F.linear(x, self.fc.weight, b).relu())


def test_zeroed_run_of_a_bias_copy_cuts_its_space():
    torch.manual_seed(0)
    m, x = _randomize(ZeroedBias()), torch.randn(3, 4)
    ir = _perm_check(m, x)
    assert sorted((sl.offset, s.n) for s in ir.spaces for sl in s.slices
                  if sl.param == "fc.bias") == [(0, 2), (2, 3), (5, 3)]
    for seed in range(1, 4):
        _perm_check(m, x, seed)
    _self_merge(m, x)


class ZeroedEntry(ZeroedBias):
    def forward(self, x):
        b = self.fc.bias.clone()
        b[3].zero_()
        return self.out(F.linear(x, self.fc.weight, b).relu())


class ZeroedFeatures(ZeroedBias):
    def forward(self, x):
        y = self.fc(x)
        y[:, 2:5].zero_()                # the slice cuts the space; the fill stays inside it
        return self.out(y.relu())


def test_zeroed_run_of_features():
    torch.manual_seed(0)
    m, x = _randomize(ZeroedFeatures()), torch.randn(3, 4)
    ir = _perm_check(m, x)
    assert sorted((sl.offset, s.n) for s in ir.spaces for sl in s.slices
                  if sl.param == "fc.bias") == [(0, 2), (2, 3), (5, 3)]
    _self_merge(m, x)


def test_zeroed_entry_of_a_bias_is_an_error():
    with pytest.raises(LoweringError, match="in place"):
        lower(ZeroedEntry(), torch.randn(3, 4))


def _swin_v2():
    from torchvision.models.swin_transformer import (PatchMergingV2, SwinTransformer,
                                                     SwinTransformerBlockV2)
    torch.manual_seed(0)
    return _randomize(SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2],
                                      num_heads=[2, 4], window_size=[4, 4],
                                      block=SwinTransformerBlockV2,
                                      downsample_layer=PatchMergingV2, num_classes=10))


def test_torchvision_swin_v2_zeroed_k_bias():
    _perm_check(_swin_v2(), torch.randn(2, 3, 32, 32))


@pytest.mark.slow
def test_torchvision_swin_v2_self_merge_onnx(tmp_path):
    _self_merge(_swin_v2(), torch.randn(2, 3, 32, 32), tmp_path / "swin_v2.onnx")


class EinsumAttention(nn.Module):
    """MaxViT-style attention written with einsum (heads as batch letters, ellipsis too)."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.h, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, 4)

    def forward(self, x):                                   # x: (B, N, dim)
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4)
        s = torch.einsum("B H I D, B H J D -> B H I J", q, k).softmax(-1)
        o = torch.einsum("...ij,...jd->...id", s, v)
        return self.proj(o.permute(0, 2, 1, 3).reshape(b, n, c)).mean(1)


def test_einsum_attention():
    torch.manual_seed(0)
    m, x = _randomize(EinsumAttention()), torch.randn(2, 5, 16)
    _perm_check(m, x)
    _self_merge(m, x)


class EinsumOuter(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 5)

    def forward(self, x):
        return torch.einsum("bi,bj->bij", self.a(x), self.b(x)).flatten(1)


def test_einsum_that_is_not_a_matmul_is_an_error():
    with pytest.raises(LoweringError, match="bi,bj->bij"):
        lower(EinsumOuter(), torch.randn(2, 4))


def _maxvit():
    from torchvision.models.maxvit import MaxVit
    torch.manual_seed(0)
    return _randomize(MaxVit(input_size=(64, 64), stem_channels=16, partition_size=2,
                             block_channels=[16, 32], block_layers=[1, 1], head_dim=8,
                             stochastic_depth_prob=0.0, num_classes=10))


@pytest.mark.slow
def test_torchvision_maxvit_einsum(tmp_path):
    m, x = _maxvit(), torch.randn(2, 3, 64, 64)
    _perm_check(m, x)
    _self_merge(m, x, tmp_path / "maxvit.onnx")


class EinsumLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(8, 4)), nn.Parameter(torch.randn(8, 3))

    def forward(self, x):                                   # x: (B, N, 4)
        h = torch.einsum("bnc,dc->bdn", x, self.w1).relu()  # W x, output laid out (B, 8, N)
        return torch.einsum("bdn,de->bne", h, self.w2)


def test_einsum_with_a_parameter_is_a_linear_layer():
    torch.manual_seed(0)
    m, x = EinsumLinear().eval(), torch.randn(2, 5, 4)
    ir = _perm_check(m, x)
    assert sorted((sl.dim, sl.role) for sl in ir.slices_of("w2")) == [(0, "in"), (1, "out")]
    assert [s.n for s in ir.free_spaces] == [8]
    _self_merge(m, x)
