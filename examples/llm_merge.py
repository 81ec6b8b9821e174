"""Merging small Llama-style LMs trained on real English text: loss along λ and zip merges.

Corpus: ``pydoc_data.topics.topics``, the language-reference help topics that ship with CPython
(``help("assert")`` prints one; ~0.46 MB, English prose with code samples). No downloads.
Tokens are UTF-8 bytes (vocabulary 256); the last 10% of every topic is the validation split
(:mod:`hmir.harness.text`). Models are ``transformers.LlamaForCausalLM`` (RoPE, RMSNorm,
SwiGLU MLP, untied LM head, head_dim 32), trained with AdamW from different seeds (each seed
also sets the data order):

- **same pair**: A (4 layers, hidden 128, 4 heads, MLP 256, seed 1) and B (same, seed 2);
- **depth pair**: A and a 6-layer model (seed 3), depth alignment ``"lma"``;
- **width pair**: A and a hidden-192 model (6 heads, MLP 384, seed 4), merged width "max".

Reported, as validation loss (nats/byte) and perplexity: the parents and the unigram
baseline; the loss along λ ∈ {0, .25, .5, .75, 1} of vanilla interpolation (1−λ)·A + λ·B
and of hmir's ``method="mal"`` (B weight-matched onto A, then (1−λ)·A + λ·P(B)), each with
its barrier ``max_λ L(λ) − (L(0)+L(1))/2``; hmir merges against both parents: same pair
``permute`` (activation matching, λ = 0.5), ``zip`` and ``mal`` λ = 0.5; depth pair ``zip``
and ``mal`` λ = 0.5; width pair ``zip`` (``mal`` zero-pads only equal head counts: hmir
refuses 4 vs 6 heads). Vanilla interpolation needs equal shapes, so only the same pair has
it. The hmir merges are not wrapped: an hmir error stops the run with its message.

Trained parents are cached under ``~/.cache/hmir-examples`` (``$HMIR_EXAMPLES_CACHE``), so a
rerun only merges and evaluates. Runs on one CPU thread (``--threads``).

Example::

    python examples/llm_merge.py --size full --out llm_merge.json     # ~15 min cold, 1 thread
    python examples/llm_merge.py --size small                         # ~1 min (CI test)
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch

from hmir import compile_merge
from hmir.algorithms.interpolate import interpolate
from hmir.harness import text

SIZES = {
    "full": dict(ctx=64, batch=32, steps=500, lr=3e-3,
                 arch={"A": dict(hidden=128, heads=4, layers=4),
                       "B": dict(hidden=128, heads=4, layers=4),
                       "deep": dict(hidden=128, heads=4, layers=6),
                       "wide": dict(hidden=192, heads=6, layers=4)},
                 calib=(8, 16), val_batch=64, val_batches=None,
                 lambdas=(0.0, 0.25, 0.5, 0.75, 1.0)),
    "small": dict(ctx=32, batch=16, steps=200, lr=3e-3,
                  arch={"A": dict(hidden=64, heads=2, layers=2),
                        "B": dict(hidden=64, heads=2, layers=2),
                        "deep": dict(hidden=64, heads=2, layers=3),
                        "wide": dict(hidden=96, heads=3, layers=2)},
                  calib=(4, 8), val_batch=32, val_batches=8,
                  lambdas=(0.0, 0.25, 0.5, 0.75, 1.0)),
}
SEEDS = {"A": 1, "B": 2, "deep": 3, "wide": 4}
PAIRS = {"same": ("A", "B"), "depth": ("A", "deep"), "width": ("A", "wide")}


def row(loss: float) -> dict:
    return {"loss": loss, "ppl": math.exp(loss)}


def barrier(losses: list[float]) -> float:
    return max(losses) - (losses[0] + losses[-1]) / 2


def path(a, sb: dict, val, lambdas) -> list[float]:
    """Validation loss of (1−λ)·W_A + λ·``sb`` (B's weights in A's shapes, aligned or not) at
    each λ in ``lambdas``, evaluated on a copy of the HF model ``a``."""
    model, sa = copy.deepcopy(a), a.state_dict()
    out = []
    for lam in lambdas:
        model.load_state_dict(interpolate(sa, sb, lam))
        out.append(text.lm_loss(model.eval(), val))
    return out


def merge(a, b, calib, **kw):
    """hmir's merged module (``compile_merge``; errors propagate) and the seconds it took."""
    t0 = time.perf_counter()
    module = compile_merge(a, b, calib, progress=False, **kw).module
    return module, time.perf_counter() - t0


def run(size: str = "full", *, cache: bool = True, hmir: bool = True, log=print) -> dict:
    """Train (or load) the parents, evaluate them, the vanilla λ path and (``hmir``) the merges."""
    cfg = SIZES[size]
    t_start, cpu_start = time.perf_counter(), time.process_time()
    train_ids, val_ids = text.corpus()
    val = text.windows(val_ids, cfg["val_batch"], cfg["ctx"], cfg["val_batches"])
    n_calib, calib_batch = cfg["calib"]
    calib = [x[:, :-1] for x in text.windows(train_ids, calib_batch, cfg["ctx"], n_calib, seed=99)]
    res = {"size": size, "corpus": text.CORPUS, "train_bytes": len(train_ids),
           "val_bytes": sum(x[:, 1:].numel() for x in val),
           "config": {k: v for k, v in cfg.items()}, "seeds": SEEDS,
           "unigram": row(text.unigram_loss(train_ids, val_ids)), "seconds": {}}

    models, parents = {}, {}
    for name, arch in cfg["arch"].items():
        log(f"training {name} {arch} ({cfg['steps']} steps, seed {SEEDS[name]}) ...")
        models[name], secs = text.trained_llama(
            arch, steps=cfg["steps"], batch=cfg["batch"], ctx=cfg["ctx"], lr=cfg["lr"],
            seed=SEEDS[name], train_ids=train_ids, cache=cache)
        res["seconds"][f"train {name}"] = secs
        parents[name] = {**row(text.lm_loss(models[name], val)), "arch": arch,
                         "params": sum(p.numel() for p in models[name].parameters())}
        took = "cached" if secs == 0 else f"{secs:.0f} s"
        log(f"  {name}: val loss {parents[name]['loss']:.3f} ({took})")
    res["parents"] = parents

    a, b = models["A"], models["B"]
    log("λ path: vanilla interpolation ...")
    lambdas = cfg["lambdas"]
    vanilla = path(a, b.state_dict(), val, lambdas)
    res["lambda_path"] = {"lambdas": list(lambdas),
                          "vanilla": {"losses": vanilla, "barrier": barrier(vanilla)}}
    if not hmir:
        res["seconds"]["total"] = time.perf_counter() - t_start
        res["seconds"]["total cpu"] = time.process_time() - cpu_start
        return res
    log("λ path: hmir mal (weight matching) ...")
    # MAL's merge is (1−λ)·W_A + λ·P(W_B) in A's architecture, with the HF parameter names, so
    # its λ = 1 merge is B weight-matched onto A: P(W_B). The path interpolates it with A
    # (hmir.algorithms.interpolate, as hmir's interpolate pass does); the λ = 1 end reproduces
    # B's loss when the permutation preserves B's function.
    aligned_b, secs = merge(a, b, calib, method="mal", lam=1.0)
    res["seconds"]["hmir mal merge"] = secs
    mal = path(a, aligned_b.state_dict(), val, lambdas)
    res["lambda_path"]["hmir mal"] = {"losses": mal, "barrier": barrier(mal)}
    log("λ path: hmir permute (activation matching) ...")
    # method="permute" merges tensor by tensor into (W_A + P·W_B)/2, so P·W_B = 2·merged − W_A.
    permuted, secs = merge(a, b, calib, method="permute")
    res["seconds"]["hmir permute merge"] = secs
    sa, sm = a.state_dict(), permuted.state_dict()
    aligned = {k: 2 * sm[k] - v if v.is_floating_point() else v for k, v in sa.items()}
    perm = path(a, aligned, val, lambdas)
    res["lambda_path"]["hmir permute"] = {"losses": perm, "barrier": barrier(perm)}

    merges = {}
    direct = size != "small"           # the CI size takes λ = 0.5 from the paths only
    plan = {"same": [("permute", "hmir permute"), ("zip", {"method": "zip"}),
                     ("mal λ=0.5", "hmir mal")]
            + [("mal λ=0.5 (compile_merge lam=0.5)", {"method": "mal", "lam": 0.5})] * direct,
            "depth": [("zip (lma)", {"method": "zip", "depth": "lma"})]
            + [("mal λ=0.5", {"method": "mal", "lam": 0.5})] * direct,
            "width": [("zip (width max)", {"method": "zip"})]}
    for pair, runs in plan.items():
        na, nb = PAIRS[pair]
        merges[pair] = {"parents": [na, nb]}
        for label, kw in runs:
            if isinstance(kw, str):          # the λ = 0.5 point of that λ path
                merges[pair][label] = row(res["lambda_path"][kw]["losses"][lambdas.index(0.5)])
                continue
            log(f"merge {pair} pair ({na} + {nb}) with {label} ...")
            module, secs = merge(models[na], models[nb], calib, **kw)
            merges[pair][label] = {**row(text.lm_loss(module, val)), "seconds": secs}
    res["merges"] = merges
    res["seconds"]["total"] = time.perf_counter() - t_start
    res["seconds"]["total cpu"] = time.process_time() - cpu_start
    return res


def tables(res: dict) -> str:
    """The results as markdown tables."""
    P = res["parents"]
    lines = [f"Corpus: {res['corpus']}; {res['train_bytes']} train bytes, "
             f"{res['val_bytes']} validation tokens scored. Unigram baseline: loss "
             f"{res['unigram']['loss']:.3f}, ppl {res['unigram']['ppl']:.2f}.", "",
             "| parent | layers | hidden | params | val loss | val ppl |",
             "|---|---|---|---|---|---|"]
    for k, p in P.items():
        arch = p["arch"]
        lines.append(f"| {k} (seed {res['seeds'][k]}) | {arch['layers']} | {arch['hidden']} | "
                     f"{p['params']:,} | {p['loss']:.3f} | {p['ppl']:.2f} |")
    lp = res["lambda_path"]
    head = " | ".join(f"{x:g}" for x in lp["lambdas"])
    lines += ["", f"| A + B, val loss at λ | {head} | barrier |",
              "|---" * (len(lp["lambdas"]) + 2) + "|"]
    for k in [k for k in ("vanilla", "hmir permute", "hmir mal") if k in lp]:
        lines.append(f"| {k} | " + " | ".join(f"{v:.3f}" for v in lp[k]["losses"]) +
                     f" | {lp[k]['barrier']:.3f} |")
    lines += ["", "| pair | merge | val loss | val ppl | parent A loss | parent B loss |",
              "|---|---|---|---|---|---|"]
    for pair, m in res.get("merges", {}).items():
        na, nb = m["parents"]
        for label, r in m.items():
            if label != "parents":
                lines.append(f"| {pair} ({na} + {nb}) | {label} | {r['loss']:.3f} | {r['ppl']:.2f} "
                             f"| {P[na]['loss']:.3f} | {P[nb]['loss']:.3f} |")
    lines += ["", "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in res["seconds"].items())]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-cache", action="store_true", help="retrain the parents")
    p.add_argument("--no-hmir", action="store_true",
                   help="parents and the vanilla λ path only (no hmir merges)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    res = run(args.size, cache=not args.no_cache, hmir=not args.no_hmir)
    print(tables(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
