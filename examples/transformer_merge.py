"""Two small BERT classifiers trained from scratch, merged: loss along λ and barrier (seed Table IV).

The data is a **synthetic** sequence task generated here (no text corpus ships offline):
a [CLS] token then 11 tokens drawn uniformly from ids 2..99; the label is the id bin
(2–33, 34–65, 66–99) that occurs most often (ties: the lower bin). Model A and model B
are the same architecture trained with different seeds. The path ``(1−λ)·W_A + λ·W_B``
is evaluated for vanilla averaging (B as it is) and for hmir's alignment (B permuted onto
A: heads as wholes and units within heads, MLP units, the residual stream), at 21 λ.

Example::

    python examples/transformer_merge.py            # prints the table, writes transformer_merge.json
"""
from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F

from hmir import compile_merge
from hmir.algorithms.interpolate import LambdaPath, loss_along_lambda

VOCAB, SEQ, CLASSES = 100, 12, 3


def task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences and labels of the synthetic majority-bin task."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, VOCAB, (n, SEQ), generator=g)
    x[:, 0] = 1                                       # [CLS]
    bins = ((x[:, 1:] - 2) // 33).clamp(max=2)
    counts = F.one_hot(bins, CLASSES).sum(1)
    return x, counts.argmax(1)


def bert(seed: int, hidden: int = 64, layers: int = 2, heads: int = 4):
    import transformers

    cfg = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, intermediate_size=2 * hidden,
                                  vocab_size=VOCAB, max_position_embeddings=32, num_labels=CLASSES)
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(cfg)


def train(model, x, y, steps: int = 300, batch: int = 64, seed: int = 0):
    """Adam on cross-entropy; returns the model in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = F.cross_entropy(model(x[idx]).logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).logits.argmax(1) == y).float().mean())


def lambda_paths(a, b, calib, test, points: int = 21) -> dict[str, LambdaPath]:
    """Loss along λ for vanilla averaging and for hmir's activation-matched permutation.

    hmir's ``method="permute"`` merge is exactly ``(W_A + P·W_B) / 2`` tensor by tensor, so
    the aligned B is ``P·W_B = 2·merged − W_A``.
    """
    sa = a.state_dict()
    merged = compile_merge(a, b, calib, method="permute", repair=False, progress=False).module
    ms = merged.state_dict()
    aligned = {k: 2 * ms[k] - v if v.is_floating_point() else v for k, v in sa.items()}
    loss = lambda out, y: F.cross_entropy(out.logits, y)     # noqa: E731
    return {"vanilla averaging": loss_along_lambda(a, sa, b.state_dict(), test, loss, points=points),
            "hmir permute (heads grouped)": loss_along_lambda(a, sa, aligned, test, loss,
                                                              points=points)}


def run(steps: int = 300, n_train: int = 4096, n_test: int = 1024, points: int = 21) -> dict:
    t0 = time.perf_counter()
    x, y = task(n_train, seed=0)
    xt, yt = task(n_test, seed=1)
    a = train(bert(seed=10), x, y, steps, seed=10)
    b = train(bert(seed=20), x, y, steps, seed=20)
    calib = list(x[:512].split(64))
    test = list(zip(xt.split(256), yt.split(256)))
    paths = lambda_paths(a, b, calib, test, points)
    zip_merged = compile_merge(a, b, calib, method="zip", progress=False).module
    return {
        "task": "synthetic majority-bin sequence classification (3 classes, chance 1/3)",
        "accuracy": {"A": accuracy(a, xt, yt), "B": accuracy(b, xt, yt),
                     "hmir zip merge (λ=0.5)": accuracy(zip_merged, xt, yt)},
        "paths": {k: {"lambdas": p.lambdas, "losses": p.losses, "barrier": p.barrier}
                  for k, p in paths.items()},
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    res = run()
    print(f"{res['task']}; test accuracy: " +
          ", ".join(f"{k} {v:.3f}" for k, v in res["accuracy"].items()))
    for k, p in res["paths"].items():
        mid = p["losses"][len(p["losses"]) // 2]
        print(f"{k:32s} L(0) {p['losses'][0]:.3f}  L(0.5) {mid:.3f}  L(1) {p['losses'][-1]:.3f}  "
              f"barrier {p['barrier']:.3f}")
    out = sys.argv[1] if len(sys.argv) > 1 else "transformer_merge.json"
    with open(out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
