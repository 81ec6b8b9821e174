"""Chunks of joined projections, talking heads and general attention products (torch.export).

* A chunk/split of a feature dim whose space is joined or read elsewhere cuts that space (and
  everything joined with it) at the pieces' bounds (EdgeNeXt's ``conv(x).chunk(...)`` after a
  residual stream), as a channel slice does.
* Talking heads (CaiT): ``nn.Linear(H, H)`` over the head index mixes heads.
* ``matmul`` beyond ``q @ kᵀ`` / ``weights @ v``: cross-covariance attention (XCA, EdgeNeXt),
  factorized attention ``q @ (softmax(k)ᵀ @ v)`` (CoaT), ``q`` against a run of a fused kv head
  (LeViT's AttentionDownsample).
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
B, N, C, H = 2, 6, 16, 4


def _random(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random norms, and random values for any constant-initialised tensor (layer scales,
    temperatures, zero biases), which would hide a wrongly permuted slice."""
    m = randomized(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, t in m.state_dict().items():
            if t.dtype.is_floating_point and t.numel() and bool((t == t.flatten()[0]).all()):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    return m


def _check(m: nn.Module, x: torch.Tensor, merge: bool = True) -> None:
    m = _random(m).eval()
    ir = lower(m, x)
    assert any(not s.fixed for s in ir.spaces)
    mp = copy.deepcopy(m)
    mp.load_state_dict(permute_state(ir, m.state_dict(), random_permutation(ir, seed=0)))
    with torch.no_grad():
        y = m(x)
        assert rel_err(y, mp(x)) < 1e-5
    if merge:
        batches = [torch.randn(4, *x.shape[1:]) for _ in range(2)]
        res = compile_merge(m, copy.deepcopy(m), batches, method="zip", repair=False,
                            progress=False)
        with torch.no_grad():
            assert rel_err(y, res.module(x)) < 1e-5


# -- 1. chunks of joined projections -----------------------------------------------------
class ReadTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.other, self.head = nn.Linear(8, 8), nn.Linear(8, 5), nn.Linear(4, 5)

    def forward(self, x):
        h = self.fc(x)
        a, b = h.chunk(2, -1)
        return self.head(a * b) + self.other(h)


class SplitStream(nn.Module):
    """EdgeNeXt's SDTA: a residual stream chunked into pieces, each refined and concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 12, 1), nn.Conv2d(12, 12, 1)
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1, groups=4) for _ in range(2))
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.conv(x)
        parts = x.chunk(3, dim=1)
        y, outs = parts[0], [parts[0]]
        for conv, p in zip(self.convs, parts[1:]):
            y = conv(y + p)
            outs.append(y)
        return self.fc((torch.cat(outs, 1) + x).mean((2, 3)))


@pytest.mark.parametrize("cls, x", [(ReadTwice, torch.randn(B, 8)),
                                    (SplitStream, torch.randn(B, 3, 6, 6))])
def test_chunk_of_joined_space_is_cut(cls, x):
    _check(cls(), x)


def test_chunk_of_read_space_cuts_its_readers():
    ir = lower(ReadTwice(), torch.randn(B, 8))
    cols = sorted((sl.offset, int(s.n)) for s in ir.spaces for sl in s.slices
                  if sl.param == "other.weight" and sl.dim == 1)
    assert cols == [(0, 4), (4, 4)]


# -- 2. talking heads ----------------------------------------------------------------------
class TalkingHeads(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.proj_l, self.proj_w = nn.Linear(H, H, bias=bias), nn.Linear(H, H, bias=bias)

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(*x.shape[:2], 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
        a = self.proj_l((q @ k.transpose(-2, -1)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        a = self.proj_w(a.softmax(-1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.proj((a @ v).transpose(1, 2).reshape(*x.shape[:2], C))


def test_talking_heads():
    _check(TalkingHeads(), torch.randn(B, N, C))


def test_talking_heads_slices_are_per_head():
    ir = lower(TalkingHeads(), torch.randn(B, N, C))
    spaces = {(sl.param, sl.dim): s for s in ir.spaces for sl in s.slices}
    w_in, w_out = spaces[("proj_l.weight", 1)], spaces[("proj_l.weight", 0)]
    qk = spaces[("qkv.weight", 0)]
    assert int(w_in.n) == H and w_in.group_class == w_out.group_class == qk.group_class


class MixUnits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.mix = nn.Linear(C, 3 * C), nn.Linear(H, 2 * H)

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(*x.shape[:2], 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
        return self.mix((q @ k.transpose(-2, -1)).permute(0, 2, 3, 1))


def test_talking_heads_need_a_square_linear():
    with pytest.raises(LoweringError, match="square linear"):
        lower(MixUnits(), torch.randn(B, N, C))


# -- 3. general attention products --------------------------------------------------------
class XCA(nn.Module):
    """Cross-covariance attention: heads' units attend over each other, tokens contracted."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.temperature = nn.Parameter(torch.ones(H, 1, 1))

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(*x.shape[:2], 3, H, C // H).permute(2, 0, 3, 4, 1).unbind(0)
        a = (q @ k.transpose(-2, -1)) * self.temperature
        a = a.softmax(dim=-1)
        return self.proj((a @ v).permute(0, 3, 1, 2).reshape(*x.shape[:2], C))


class Factorized(nn.Module):
    """CoaT's factorized attention: ``q @ (softmax(k)ᵀ @ v)``."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(*x.shape[:2], 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
        att = q @ (k.softmax(dim=2).transpose(-1, -2) @ v)
        return self.proj(att.transpose(1, 2).reshape(*x.shape[:2], C))


class RunOfKV(nn.Module):
    """LeViT's AttentionDownsample: q of its own projection, k and v runs of one fused head."""

    def __init__(self, kd: int = 2, vd: int = 6) -> None:
        super().__init__()
        self.kd, self.vd = kd, vd
        self.kv, self.q = nn.Linear(C, H * (kd + vd)), nn.Linear(C, H * kd)
        self.proj = nn.Linear(H * vd, C)

    def forward(self, x):
        k, v = self.kv(x).view(*x.shape[:2], H, -1).split([self.kd, self.vd], dim=3)
        q = self.q(x).view(*x.shape[:2], H, self.kd).permute(0, 2, 1, 3)
        a = (q @ k.permute(0, 2, 3, 1)).softmax(dim=-1)
        return self.proj((a @ v.permute(0, 2, 1, 3)).transpose(1, 2).reshape(*x.shape[:2], -1))


class RunOfKVChannels(RunOfKV):
    """The same with channels first (LeViT's conv mode): ``v @ attnᵀ`` puts v's run of units
    at dim -2."""

    def forward(self, x):
        k, v = self.kv(x).transpose(1, 2).reshape(x.shape[0], H, -1, N).split(
            [self.kd, self.vd], dim=2)
        q = self.q(x).transpose(1, 2).reshape(x.shape[0], H, self.kd, N)
        a = (q.transpose(-2, -1) @ k).softmax(dim=-1)
        return self.proj((v @ a.transpose(-2, -1)).reshape(x.shape[0], -1, N).transpose(1, 2))


@pytest.mark.parametrize("cls", [XCA, Factorized, RunOfKV, RunOfKVChannels])
def test_attention_products(cls):
    _check(cls(), torch.randn(B, N, C))


class UnitsAgainstTokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C)

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(*x.shape[:2], 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
        return (q @ v).sum()          # (B, H, N, d) @ (B, H, N, d) with d == N: units x tokens


class PairReduced(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C)

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(*x.shape[:2], 3, H, C // H).permute(2, 0, 3, 4, 1).unbind(0)
        return (q @ k.transpose(-2, -1)).sum(-1)


@pytest.mark.parametrize("cls, message", [
    (UnitsAgainstTokens, "contracts head units (dim -1 of the first operand) with positions"),
    (PairReduced, "both hold attention head units"),
])
def test_refused_products(cls, message):
    x = torch.randn(B, C // H, C) if cls is UnitsAgainstTokens else torch.randn(B, N, C)
    with pytest.raises(LoweringError, match="node '") as e:
        lower(cls(), x)
    assert message in str(e.value)


# -- real architectures (timm) ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name, size, kw", [
    ("edgenext_xx_small", 64, {}),
    ("cait_xxs24_224", 32, {"img_size": 32, "depth": 2}),
    ("coat_lite_tiny", 64, {"img_size": 64, "crpe_window": {3: 8}}),
    ("levit_128s", 224, {}),
])
def test_timm_models(name, size, kw):
    timm = pytest.importorskip("timm")
    _check(timm.create_model(name, pretrained=False, **kw), torch.randn(2, 3, size, size))
