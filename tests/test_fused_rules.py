"""Fused projections and products with a parameter through the torch.export frontend: GPT-2's
Conv1D (addmm with an (in, out) weight), a fused qkv split into q, k, v, a fused gate/up chunk,
splits along featureless dims, and the errors for splits hmir must refuse."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import randomized, rel_err
from hmir import compile_merge
from hmir.errors import LoweringError
from hmir.frontends.export import lower
from hmir.harness.permute import permute_state, random_permutation

E, H, S = 16, 4, 6


class Conv1D(nn.Module):
    """GPT-2's Conv1D: a linear layer whose weight is (in, out)."""

    def __init__(self, n_in: int, n_out: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(n_in, n_out, generator=g) * 0.3)
        self.bias = nn.Parameter(torch.randn(n_out, generator=g) * 0.1)

    def forward(self, x):
        out = x.size()[:-1] + (self.weight.size(-1),)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(out)


class GPT2Block(nn.Module):
    """Embedding linear, one pre-norm GPT-2 block (fused c_attn split into q, k, v), a head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.embed = nn.Linear(8, E)
        self.ln_1, self.ln_2 = nn.LayerNorm(E), nn.LayerNorm(E)
        self.c_attn, self.c_proj = Conv1D(E, 3 * E, seed), Conv1D(E, E, seed + 1)
        self.c_fc, self.mlp_proj = Conv1D(E, 2 * E, seed + 2), Conv1D(2 * E, E, seed + 3)
        self.head = nn.Linear(E, 5)

    def heads(self, t):
        return t.view(t.size(0), t.size(1), H, E // H).transpose(1, 2)

    def forward(self, x):
        h = self.embed(x)
        q, k, v = self.c_attn(self.ln_1(h)).split(E, dim=2)
        a = F.scaled_dot_product_attention(self.heads(q), self.heads(k), self.heads(v),
                                           is_causal=True)
        h = h + self.c_proj(a.transpose(1, 2).reshape(x.size(0), x.size(1), E))
        h = h + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(h))))
        return self.head(h)


class GateUpMLP(nn.Module):
    """A Phi-3-style MLP: one fused gate/up projection chunked in two."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, E)
        self.gate_up = nn.Linear(E, 4 * E)
        self.down = nn.Linear(2 * E, E)
        self.head = nn.Linear(E, 5)

    def forward(self, x):
        h = self.up(x)
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return self.head(h + self.down(F.silu(gate) * up))


class TokenSplit(nn.Module):
    """Splits along featureless dims (tokens, then an unbind of the batch-free token dim)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.a, self.b = nn.Linear(8, E), nn.Linear(E, E), nn.Linear(E, E)
        self.head = nn.Linear(E, 5)

    def forward(self, x):
        first, rest = self.fc(x).split([2, S - 2], dim=1)
        tok = rest.unbind(1)
        return self.head(self.a(first).mean(1) + self.b(rest).mean(1) + tok[0])


class Uneven(nn.Module):
    """An uneven split_with_sizes of one projection into two independent spaces."""

    def __init__(self, e: int = E) -> None:
        super().__init__()
        self.up, self.fc = nn.Linear(8, E), nn.Linear(E, 3 * e)
        self.a, self.b = nn.Linear(e, 5), nn.Linear(2 * e, 5)

    def forward(self, x):
        p, q = self.fc(self.up(x)).split([self.a.in_features, self.b.in_features], dim=-1)
        return self.a(F.relu(p)) + self.b(torch.tanh(q))


class Products(nn.Module):
    """mm and bmm with a parameter on either side: x @ W, W @ x, per-token weights (bmm)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.up, self.head = nn.Linear(8, E), nn.Linear(E, 5)
        self.w1 = nn.Parameter(torch.randn(E, 2 * E, generator=g) * 0.3)       # (in, out)
        self.w2 = nn.Parameter(torch.randn(E, 2 * E, generator=g) * 0.3)       # (out, in)
        self.w3 = nn.Parameter(torch.randn(S, E, E, generator=g) * 0.3)        # (S, in, out)

    def forward(self, x):
        h = self.up(x)
        y = torch.mm(h.flatten(0, 1), self.w1)
        z = torch.mm(self.w2, torch.relu(y).t()).t().view(x.size(0), S, E)
        t = torch.bmm(torch.tanh(z).transpose(0, 1), self.w3).transpose(0, 1)
        return self.head(t + h)


def data(n=3, batch=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, S, 8, generator=g) for _ in range(n)]


MODELS = {"gpt2_block": GPT2Block, "gate_up": GateUpMLP, "token_split": TokenSplit,
          "uneven": Uneven, "products": Products}


def built(name):
    torch.manual_seed(0)
    return randomized(MODELS[name]())


def spaces_of(ir, param, dim):
    return {sl.offset: s for s in ir.spaces for sl in s.slices
            if sl.param == param and sl.dim == dim}


@pytest.mark.parametrize("name", list(MODELS))
def test_permutation_invariance(name):
    """Lowering verifies; a random permutation of every free space keeps the outputs; moving
    units of the fused projection across its pieces does not (the check can fail)."""
    model, x = built(name), data(1)[0]
    ir = lower(model, x[:2], name)
    perms = random_permutation(ir, seed=1)
    p = copy.deepcopy(model)
    p.load_state_dict(permute_state(ir, model.state_dict(), perms))
    with torch.no_grad():
        assert rel_err(model(x), p(x)) <= 1e-5
        fused = {"gpt2_block": ("c_attn.weight", 1), "gate_up": ("gate_up.weight", 0),
                 "token_split": ("fc.weight", 0), "uneven": ("fc.weight", 0),
                 "products": ("w2", 0)}[name]
        wrong = copy.deepcopy(model)
        sd = wrong.state_dict()
        w = sd[fused[0]]
        sd[fused[0]] = w.roll(w.shape[fused[1]] // 4 + 1, dims=fused[1])
        wrong.load_state_dict(sd)
        assert rel_err(model(x), wrong(x)) > 1e-3


def test_gpt2_block_spaces():
    """c_attn's columns are three spaces (q, k, v) at offsets 0, E, 2E: q and k one head-grouped
    space, v another of the same group class; c_proj reads v's space through its rows."""
    ir = lower(built("gpt2_block"), data(1)[0][:2])
    w = spaces_of(ir, "c_attn.weight", 1)
    assert sorted(w) == [0, E, 2 * E]
    q, k, v = w[0], w[E], w[2 * E]
    assert q.id == k.id != v.id and q.group_class == v.group_class
    assert int(q.n) == int(v.n) == E and q.group_size == v.group_size == E // H
    assert sorted(spaces_of(ir, "c_attn.bias", 0)) == [0, E, 2 * E]
    assert {sl.param for sl in v.consumers()} == {"c_proj.weight"}
    assert all(sl.dim == 0 for sl in v.consumers())          # Conv1D: the (in, out) weight


def test_gate_up_spaces_and_featureless_split():
    ir = lower(built("gate_up"), data(1)[0][:2])
    pieces = spaces_of(ir, "gate_up.weight", 0)
    assert sorted(pieces) == [0, 2 * E] and pieces[0].id == pieces[2 * E].id   # joined by *
    ir = lower(built("token_split"), data(1)[0][:2])
    assert list(spaces_of(ir, "fc.weight", 0)) == [0]       # a token split keeps the space


def test_uneven_split_resizes():
    """Pieces of different widths are spaces of their own; merged at other widths, the
    split_with_sizes literal follows them."""
    a, b, xs = randomized(Uneven()), randomized(Uneven(12), 1), data()
    ir = lower(a, xs[0][:2])
    pieces = spaces_of(ir, "fc.weight", 0)
    assert sorted(pieces) == [0, E] and [int(pieces[o].n) for o in (0, E)] == [E, 2 * E]
    assert [k for _, _, k, _ in ir.meta["size_args"]["split_with_sizes"]] == ["extent"] * 2
    r = compile_merge(a, b, xs, method="zip", frontend="export", width="min", progress=False)
    split = next(n for n in r.module.graph.nodes if n.name == "split_with_sizes")
    assert list(split.args[1]) == [12, 24]
    assert r.module(xs[0]).shape == (6, S, 5)


def test_products_slices():
    """x @ W reads W's dim 0 and writes dim 1; W @ x the reverse; bmm's (S, in, out) weight
    reads dim 1 and writes dim 2 (its token dim carries no feature)."""
    ir = lower(built("products"), data(1)[0][:2])
    dims = {(sl.param, sl.dim): sl.role for s in ir.spaces for sl in s.slices
            if sl.param in ("w1", "w2", "w3")}
    assert dims == {("w1", 0): "in", ("w1", 1): "out", ("w2", 1): "in", ("w2", 0): "out",
                    ("w3", 1): "in", ("w3", 2): "out"}
    w3_out = spaces_of(ir, "w3", 2)[0]
    assert {(sl.param, sl.dim) for sl in w3_out.slices} >= {("up.weight", 0), ("w1", 0)}


@pytest.mark.parametrize("name", ["gpt2_block", "gate_up"])
def test_merge_with_itself(name):
    model, batches = built(name), data()
    r = compile_merge(model, copy.deepcopy(model), batches, method="zip", frontend="export",
                      progress=False)
    with torch.no_grad():
        assert rel_err(model(batches[0]), r.module(batches[0])) <= 1e-5


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(8, 8), nn.Linear(4, 5)

    def forward(self, x):
        a, b = (self.fc(x) + x).chunk(2, -1)
        return self.head(a * b)


class ReadTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.other, self.head = nn.Linear(8, 8), nn.Linear(8, 5), nn.Linear(4, 5)

    def forward(self, x):
        h = self.fc(x)
        y = self.other(h)
        a, b = h.chunk(2, -1)
        return self.head(a * b) + y


class Scores(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc(x).flatten(0, 1)
        return torch.mm(h, h.t())


class SplitHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(8, 24), nn.Linear(12, 5)

    def forward(self, x):          # splitting the heads themselves (runs of units are fine)
        q = self.fc(x).view(x.size(0), S, 2, 12).split(1, dim=2)[0]
        return self.head(q.reshape(x.size(0), S, 12))


@pytest.mark.parametrize("cls, message", [
    (Scores, "multiplies two computed tensors"),
    (SplitHeads, "splits the attention heads themselves"),
])
def test_refused(cls, message):
    with pytest.raises(LoweringError, match="node '") as e:
        lower(cls(), data(1)[0][:2], cls.__name__)
    assert message in str(e.value)
