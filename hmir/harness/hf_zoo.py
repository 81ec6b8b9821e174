"""Tiny Hugging Face models of the families users merge, built from configs (random init).

Each family is declared as data: its config class, its model class and the config keys
that set its hidden size, intermediate size, heads, kv heads and layers. Models are small
(hidden 64, 4 heads, 2 layers by default) so tests can lower and merge every family.

Example::

    >>> m = build("llama", layers=2, kv_heads=2)          # grouped-query attention
    >>> m.config.num_key_value_heads, m.config.hidden_size
    (2, 64)
    >>> tokens(batch=2, seq=8).shape
    torch.Size([2, 8])
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

VOCAB = 96


@dataclass(frozen=True)
class Family:
    """A family: model class name, config class name, and its config's key names."""

    model: str
    config: str
    hidden: str = "hidden_size"
    inter: str | None = "intermediate_size"
    heads: str = "num_attention_heads"
    kv_heads: str | None = None
    layers: str = "num_hidden_layers"
    extra: dict = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    "gpt2": Family("GPT2LMHeadModel", "GPT2Config", "n_embd", "n_inner", "n_head", None, "n_layer",
                   {"n_positions": 64}),
    "gpt_neox": Family("GPTNeoXForCausalLM", "GPTNeoXConfig", extra={"max_position_embeddings": 64,
                                                                    "rotary_pct": 0.25}),
    "llama": Family("LlamaForCausalLM", "LlamaConfig", kv_heads="num_key_value_heads",
                    extra={"max_position_embeddings": 64}),
    "mistral": Family("MistralForCausalLM", "MistralConfig", kv_heads="num_key_value_heads",
                      extra={"max_position_embeddings": 64}),
    "qwen2": Family("Qwen2ForCausalLM", "Qwen2Config", kv_heads="num_key_value_heads",
                    extra={"max_position_embeddings": 64}),
    "phi": Family("PhiForCausalLM", "PhiConfig", kv_heads="num_key_value_heads",
                  extra={"max_position_embeddings": 64, "partial_rotary_factor": 0.5}),
    "t5": Family("T5EncoderModel", "T5Config", "d_model", "d_ff", "num_heads", None, "num_layers",
                 {"d_kv": 16}),
    "albert": Family("AlbertModel", "AlbertConfig", extra={"embedding_size": 32,
                                                          "max_position_embeddings": 64}),
    "bert_mlm": Family("BertForMaskedLM", "BertConfig", extra={"max_position_embeddings": 64}),
}


def config(family: str, hidden: int = 64, heads: int = 4, layers: int = 2,
           kv_heads: int | None = None, inter: int | None = None, **overrides):
    """The config of a tiny ``family`` model (``inter`` defaults to 2 × hidden)."""
    import transformers

    f = FAMILIES[family]
    kw = {f.hidden: hidden, f.heads: heads, f.layers: layers, "vocab_size": VOCAB, **f.extra}
    if f.inter:
        kw[f.inter] = inter or 2 * hidden
    if f.kv_heads:
        kw[f.kv_heads] = kv_heads or heads
    elif kv_heads not in (None, heads):
        raise ValueError(f"family {family!r} has no grouped-query attention")
    if family == "t5":
        kw["d_kv"] = hidden // heads
    kw.update(overrides)
    return getattr(transformers, f.config)(**kw)


def build(family: str, seed: int = 0, std: float = 0.2, **kw):
    """A tiny random ``family`` model in eval mode; weights drawn with std ``std`` (attention
    far from uniform), norms' weights around 1 (not exactly 1, so a wrong permutation shows)."""
    import transformers

    cfg = config(family, **kw)
    cfg.initializer_range = std
    torch.manual_seed(seed)
    m = getattr(transformers, FAMILIES[family].model)(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5 if name.endswith("weight")
                        else torch.randn(p.shape, generator=g) * 0.1)
    return m


def tokens(n: int | None = None, batch: int = 4, seq: int = 16, seed: int = 0):
    """Random token ids (batch, seq), or a list of ``n`` such batches."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda: torch.randint(0, VOCAB, (batch, seq), generator=g)
    return draw() if n is None else [draw() for _ in range(n)]
