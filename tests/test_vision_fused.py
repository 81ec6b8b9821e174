"""Fused projections split by a reshape, and patch unfold/fold of channels (torch.export frontend).

timm's ViT attention reshapes ``qkv(x)`` to ``(B, N, 3, H, d)``, permutes the 3 to the front and
unbinds (or indexes) it: three pieces, each a head-grouped space. MobileViT's block unfolds a
feature map into patches by reshapes that fold the channels together with batch and spatial
dims, runs a transformer with the channels last, and folds back.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from conftest import randomized, rel_err
from hmir import compile_merge
from hmir.errors import LoweringError
from hmir.frontends.export import lower
from hmir.harness.permute import permute_state, random_permutation

torch.set_num_threads(1)


def _random(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random norms (conftest.randomized), layer scales and any all-zero weight (a zero head)."""
    m = randomized(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1 and not name.endswith(("bias", "weight")):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)          # gamma of LayerScale
            elif p.dim() >= 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def _perm_error(m: nn.Module, x: torch.Tensor, seed: int = 0) -> float:
    ir = lower(m, x)
    mp = copy.deepcopy(m)
    mp.load_state_dict(permute_state(ir, m.state_dict(), random_permutation(ir, seed=seed)))
    with torch.no_grad():
        return rel_err(m(x), mp(x))


def _self_merge(m: nn.Module, x: torch.Tensor, onnx: str | None = None):
    batches = [torch.randn(4, *x.shape[1:]) for _ in range(2)]
    res = compile_merge(m, copy.deepcopy(m), batches, method="zip", repair=False, progress=False)
    with torch.no_grad():
        err = rel_err(m(x), res.module(x))
    return err, (res.to_onnx(onnx).max_abs_diff if onnx else None)


class FusedAttention(nn.Module):
    """A toy attention block with the fused-projection layouts of timm and friends.

    ``layout``: "heads" (``reshape(B, N, k, H, d).permute(2, 0, 3, 1, 4).unbind(0)``),
    "index" (the same, then ``qkv[0], qkv[1], qkv[2]``), "unflatten" (``unflatten(-1, (3, H,
    d))``), "plain" (``reshape(B, N, 3, C).permute(2, 0, 1, 3).unbind(0)``, heads later).
    """

    def __init__(self, layout: str, dim: int = 24, heads: int = 3) -> None:
        super().__init__()
        self.layout, self.h = layout, heads
        self.embed, self.norm = nn.Linear(6, dim), nn.LayerNorm(dim)
        self.qkv, self.proj, self.head = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 4)

    def forward(self, x):
        t = self.embed(x)
        B, N, C = t.shape
        y = self.qkv(self.norm(t))
        if self.layout == "plain":
            q, k, v = (z.reshape(B, N, self.h, C // self.h).transpose(1, 2)
                       for z in y.reshape(B, N, 3, C).permute(2, 0, 1, 3).unbind(0))
        else:
            y = y.unflatten(-1, (3, self.h, C // self.h)) if self.layout == "unflatten" else \
                y.reshape(B, N, 3, self.h, C // self.h)
            y = y.permute(2, 0, 3, 1, 4)
            q, k, v = (y[0], y[1], y[2]) if self.layout == "index" else y.unbind(0)
        a = torch.softmax(q @ k.transpose(-2, -1) * 0.3, dim=-1) @ v
        t = t + self.proj(a.transpose(1, 2).reshape(B, N, C))
        return self.head(t.mean(1))


@pytest.mark.parametrize("layout", ["heads", "index", "unflatten", "plain"])
def test_fused_layouts_split_into_pieces(layout):
    m, x = _random(FusedAttention(layout)), torch.randn(2, 5, 6)
    ir = lower(m, x)
    rows = lambda s: sorted(sl.offset for sl in s.slices if sl.param == "qkv.weight" and sl.dim == 0)
    qkv = [s for s in ir.spaces if rows(s)]
    assert sorted(rows(s) for s in qkv) == [[0, 24], [48]]   # q and k share a space, v its own
    assert {s.group_size for s in qkv} == {8}
    assert _perm_error(m, x) < 1e-5
    assert _self_merge(m, x)[0] < 1e-5


def test_pieces_read_by_another_op_are_an_error():
    class Scaled(FusedAttention):
        def forward(self, x):
            t = self.embed(x)
            B, N, C = t.shape
            y = self.qkv(t).reshape(B, N, 3, self.h, C // self.h) * 2.0
            q, k, v = y.permute(2, 0, 3, 1, 4).unbind(0)
            a = torch.softmax(q @ k.transpose(-2, -1), -1) @ v
            return self.proj(a.transpose(1, 2).reshape(B, N, C)).sum()

    with pytest.raises(LoweringError, match="splits a fused projection into pieces"):
        lower(Scaled("heads"), torch.randn(2, 5, 6))


def test_timm_vit_fused_qkv():
    timm = pytest.importorskip("timm")
    m = _random(timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    ir = lower(m, x)
    assert ir.frontend == "export"
    assert sorted(s.group_size for s in ir.spaces if s.group_size > 1) == [16] * 4
    assert _perm_error(m, x) < 1e-5
    assert _self_merge(m, x)[0] < 1e-5


@pytest.mark.slow
def test_timm_vit_onnx_and_torchvision_mha():
    timm = pytest.importorskip("timm")
    tv = pytest.importorskip("torchvision")
    x = torch.randn(2, 3, 32, 32)
    for m in (timm.models.vision_transformer.VisionTransformer(
                  img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10),
              tv.models.vision_transformer.VisionTransformer(
                  image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                  mlp_dim=64)):
        m = _random(m)
        assert _perm_error(m, x) < 1e-5
        err, onnx = _self_merge(m, x, "/tmp/hmir_test_vision_fused.onnx")
        assert err < 1e-5 and onnx <= 1e-4


def _mobilevit_block():
    timm = pytest.importorskip("timm")
    from timm.models.mobilevit import MobileVitBlock

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         MobileVitBlock(16, 16, transformer_dim=24, transformer_depth=1,
                                        patch_size=2, num_heads=2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


def test_mobilevit_block_unfold_fold():
    m, x = _random(_mobilevit_block()), torch.randn(2, 3, 8, 8)
    ir = lower(m, x)
    assert any(s.group_size == 12 for s in ir.spaces)        # the transformer's heads
    assert _perm_error(m, x) < 1e-5
    assert _self_merge(m, x)[0] < 1e-5


def test_unfold_that_cuts_channels_is_an_error():
    class Cut(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 1), nn.Linear(8, 2)

        def forward(self, x):                       # (B, 8, H, W) -> (B, 4, 2·H·W): cut apart
            y = self.conv(x).reshape(x.shape[0], 4, -1)
            return self.fc(y.reshape(x.shape[0], 8, -1).mean(-1))

    with pytest.raises(LoweringError, match="reshape"):
        lower(Cut(), torch.randn(2, 3, 4, 4))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilevit_xxs", "deit_tiny_patch16_224"])
def test_timm_models(name):
    timm = pytest.importorskip("timm")
    kw = {"img_size": 32, "depth": 2} if name.startswith("deit") else {}
    m, x = _random(timm.create_model(name, pretrained=False, num_classes=10, **kw)), \
        torch.randn(2, 3, 64 if name.startswith("mobile") else 32, 64 if name.startswith("mobile") else 32)
    assert _perm_error(m, x) < 1e-5
    err, onnx = _self_merge(m, x, f"/tmp/hmir_test_{name}.onnx")
    assert err < 1e-5 and onnx <= 1e-4
