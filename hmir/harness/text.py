"""Real English text without downloads, byte-level tokens, and tiny Llama LMs trained on it.

The corpus is Python's own language-reference topics, ``pydoc_data.topics.topics`` (the text
``help("assert")`` etc. print; it ships with CPython, ~0.46 MB of English prose with code
samples). Topics are taken in sorted key order; the last 10% (in bytes) of each topic is held
out for validation (unseen continuations of every topic). Tokens are the UTF-8 bytes
(vocabulary 256, no tokenizer to build). Trained state dicts are cached under
``~/.cache/hmir-examples`` (or ``$HMIR_EXAMPLES_CACHE``), keyed by the model config, the
training options and the corpus hash.

Example::

    >>> train_ids, val_ids = corpus()
    >>> len(train_ids) > 8 * len(val_ids) > 0, decode(encode("héllo")) == "héllo"
    (True, True)
    >>> round(unigram_loss(train_ids, val_ids), 1) > 2.5       # nats per byte
    True
    >>> m = llama(hidden=32, heads=1, layers=1, ctx=16)
    >>> x = windows(val_ids, 2, 16)[0]                       # (batch, ctx + 1) ids
    >>> x.shape, lm_loss(m, [x]) > 4.0                       # untrained: ~ln 256
    (torch.Size([2, 17]), True)
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

VOCAB = 256
CORPUS = "pydoc_data.topics.topics (CPython's language-reference help topics), UTF-8 bytes"


def encode(text: str) -> torch.Tensor:
    """The UTF-8 bytes of ``text`` as a LongTensor."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def corpus(val_share: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(train ids, validation ids): topics in sorted order, the last ``val_share`` of each
    topic's bytes held out (topics joined by a blank line)."""
    from pydoc_data.topics import topics

    train, val = [], []
    for key in sorted(topics):
        ids = topics[key].encode("utf-8")
        cut = len(ids) - int(len(ids) * val_share)
        train.append(ids[:cut])
        val.append(ids[cut:])
    as_ids = lambda parts: torch.tensor(list(b"\n\n".join(parts)), dtype=torch.long)  # noqa: E731
    return as_ids(train), as_ids(val)


def corpus_hash() -> str:
    tr, va = corpus()
    return hashlib.sha1(bytes(tr.tolist()) + b"|" + bytes(va.tolist())).hexdigest()[:12]


def unigram_loss(train_ids: torch.Tensor, val_ids: torch.Tensor) -> float:
    """Cross-entropy (nats/byte) of ``val_ids`` under train's byte frequencies (add-one)."""
    counts = torch.bincount(train_ids, minlength=VOCAB).double() + 1
    logp = (counts / counts.sum()).log()
    return float(-logp[val_ids].mean())


def windows(ids: torch.Tensor, batch: int, ctx: int, n: int | None = None,
            seed: int | None = None) -> list[torch.Tensor]:
    """Batches of ``batch`` windows of ``ctx + 1`` ids. ``seed=None``: consecutive
    non-overlapping windows from the start (``n`` batches, default all that fit); else ``n``
    batches of windows at random offsets drawn with ``seed`` (a data order)."""
    if seed is None:
        rows = ids[: (len(ids) // (ctx + 1)) * (ctx + 1)].view(-1, ctx + 1)
        out = list(rows.split(batch))
        out = [b for b in out if len(b) == batch]
        return out if n is None else out[:n]
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - ctx - 1, (n or 1, batch), generator=g)
    ar = torch.arange(ctx + 1)
    return [ids[s[:, None] + ar] for s in starts]


def llama(hidden: int = 128, heads: int = 4, layers: int = 4, inter: int | None = None,
          ctx: int = 64, seed: int = 0):
    """A ``LlamaForCausalLM`` over bytes (untied head, ``inter`` default 2 × hidden), random init
    drawn with ``seed``."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_attention_heads=heads,
        num_key_value_heads=heads, num_hidden_layers=layers, intermediate_size=inter or 2 * hidden,
        max_position_embeddings=ctx, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def logits_of(out) -> torch.Tensor:
    """The logits in a model's output: an HF ``ModelOutput``, a dict, a tuple/list or a tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return out["logits"] if "logits" in out else next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        return logits_of(out[0])
    raise TypeError(f"no logits in a model output of type {type(out).__name__}")


def lm_loss(model, batches) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` over ``(batch, ctx + 1)`` windows;
    ``model`` takes input_ids (batch, ctx) and returns logits in any structure (``logits_of``)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for x in batches:
            logits = logits_of(model(x[:, :-1]))
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           x[:, 1:].reshape(-1), reduction="sum"))
            count += x[:, 1:].numel()
    return total / count


def train_lm(model, train_ids: torch.Tensor, *, steps: int, batch: int, ctx: int,
             lr: float = 3e-3, seed: int = 0, log_every: int = 0):
    """AdamW (weight decay 0.01, 5% linear warm-up, cosine decay to 10%) on windows drawn in the
    data order ``seed``; returns ``model`` in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    g = torch.Generator().manual_seed(seed)
    ar = torch.arange(ctx + 1)
    model.train()
    for step in range(steps):
        x = train_ids[torch.randint(0, len(train_ids) - ctx - 1, (batch, 1), generator=g) + ar]
        loss = F.cross_entropy(model(x[:, :-1]).logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"    step {step + 1}/{steps}  train loss {loss.item():.3f}", flush=True)
    return model.eval()


def cache_dir() -> Path:
    return Path(os.environ.get("HMIR_EXAMPLES_CACHE", Path.home() / ".cache" / "hmir-examples"))


def trained_llama(arch: dict, *, steps: int, batch: int, ctx: int, lr: float = 3e-3,
                  seed: int = 0, train_ids: torch.Tensor | None = None, cache: bool = True,
                  log_every: int = 0):
    """A ``llama(**arch, ctx=ctx, seed=seed)`` trained with :func:`train_lm` (data order
    ``seed``), loaded from the cache when the same config was trained before. Returns
    (model, seconds spent training: 0.0 when cached)."""
    train_ids = corpus()[0] if train_ids is None else train_ids
    key = json.dumps({"arch": arch, "steps": steps, "batch": batch, "ctx": ctx, "lr": lr,
                      "seed": seed, "corpus": corpus_hash(), "v": 1}, sort_keys=True)
    path = cache_dir() / f"llama-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"
    model = llama(**arch, ctx=ctx, seed=seed)
    if cache and path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), 0.0
    t0 = time.perf_counter()
    train_lm(model, train_ids, steps=steps, batch=batch, ctx=ctx, lr=lr, seed=seed,
             log_every=log_every)
    seconds = time.perf_counter() - t0
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
    return model, seconds
