#!/usr/bin/env python
"""``hmir.algorithms.matching.match_zip`` against a plain ZipIt loop: identical merges, and how much faster.

The reference is written here, independently of hmir: every step takes the argmax over the
whole masked similarity matrix (the loop of the ZipIt paper's code), merges that pair, sets
the merged feature's similarity to every other feature to ``alpha * min(S_ik, S_jk)`` and
blocks within-model pairs of a model whose budget ``floor(beta * n_model)`` of within-model
merges is spent; ties go to the smallest (i, j). It keeps the masked matrix up to date
incrementally (O(n) per merge besides the O(n²) argmax), so it is a fair, not a strawman,
baseline. It is checked against ``hmir.algorithms.matching.zip_reference`` on small sizes first.

Features: two models of ``w`` features each that share a latent (each feature is a noisy copy
of one latent unit, plus a shared low-rank component, so that both across- and within-model
merges happen); ``corr = hmir.algorithms.matching.correlation(mean, cov)`` of the stacked features, in
float32 as in the match pass. Both matchers run single-threaded on CPU.

Usage::

    python benchmarks/bench_zip.py             # widths 256 … 4096 (4096: reference extrapolated)
    python benchmarks/bench_zip.py --quick     # under a minute (no 4096)
    python benchmarks/bench_zip.py --full-ref-max 4096   # run the reference fully at 4096 too
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from hmir.algorithms.matching import correlation, match_zip, zip_reference

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _machine import machine as _machine  # noqa: E402
RESULTS = HERE / "results"


def zip_loop(corr: torch.Tensor, nA: int, nB: int, r: int | None = None, *,
             alpha: float = 0.5, beta: float = 0.5, clock: dict | None = None) -> list[tuple[int, ...]]:
    """Plain ZipIt loop; returns the groups ordered by their smallest member.

    ``clock``, if given, gets ``"setup_end"``: the ``perf_counter`` time when the loop starts.
    """
    n = nA + nB
    r = max(nA, nB) if r is None else r
    dev, ninf = corr.device, -math.inf
    S = 0.5 * (corr + corr.T)                       # similarities, kept symmetric
    kind = torch.tensor([0] * nA + [1] * nB, device=dev)          # 0: A, 1: B, 2: mixed
    alive = torch.ones(n, dtype=torch.bool, device=dev)
    caps = [math.floor(beta * nA + 1e-9), math.floor(beta * nB + 1e-9)]
    used, exhausted = [0, 0], [caps[0] == 0, caps[1] == 0]
    members = [[k] for k in range(n)]
    # W = S on the allowed pairs (i < j, both alive, not within a model whose budget is spent)
    W = S.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=dev).triu(1), ninf)
    for m in (0, 1):
        if exhausted[m]:
            idx = torch.nonzero(kind == m).squeeze(1)
            W[idx[:, None], idx[None, :]] = ninf
    if clock is not None:
        clock["setup_end"] = time.perf_counter()
    for step in range(n - r):
        i, j = divmod(int(torch.argmax(W)), n)
        if W[i, j] == ninf:
            raise RuntimeError(f"zip_loop: stuck after {step} of {n - r} merges (budget {caps})")
        row = alpha * torch.minimum(S[i], S[j])
        S[i], S[:, i] = row, row
        alive[j] = False
        members[i], members[j] = members[i] + members[j], []
        ki, kj = int(kind[i]), int(kind[j])
        kind[i] = ki if ki == kj else 2
        W[j, :], W[:, j] = ninf, ninf
        k = int(kind[i])
        ok = alive & ~((kind == k) & (k < 2 and exhausted[k]))   # i's allowed partners
        W[i, i + 1:] = row[i + 1:].masked_fill(~ok[i + 1:], ninf)
        W[:i, i] = row[:i].masked_fill(~ok[:i], ninf)
        if ki == kj != 2:
            used[ki] += 1
            if used[ki] >= caps[ki] and not exhausted[ki]:
                exhausted[ki] = True
                idx = torch.nonzero(alive & (kind == ki)).squeeze(1)
                W[idx[:, None], idx[None, :]] = ninf
    return [tuple(sorted(m)) for m in members if m]


def make_corr(w: int, samples: int, seed: int, device: str) -> torch.Tensor:
    """Correlation (2w × 2w, float32) of two feature sets of width w that share a latent."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(samples, w, generator=g)                      # the shared latent
    common = torch.randn(samples, 8, generator=g)                 # low-rank, within-model structure
    feats = []
    for _ in range(2):
        perm = torch.randperm(w, generator=g)
        noise = 0.3 + 1.7 * torch.rand(w, generator=g)
        feats.append(z[:, perm] + common @ (0.4 * torch.randn(8, w, generator=g))
                     + noise * torch.randn(samples, w, generator=g))
    x = torch.cat(feats, 1).to(device)
    mean = x.mean(0)
    xc = x - mean
    return correlation(mean, xc.T @ xc / samples)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, min_total: float = 1.0, max_reps: int = 5):
    """(result, best seconds): repeats fast calls up to ``max_reps`` times or ``min_total`` s."""
    best, spent, reps, out = math.inf, 0.0, 0, None
    while reps < max_reps and (reps == 0 or spent < min_total):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return out, best


def check_small(device: str) -> list[str]:
    """The loop here gives the same groups as hmir.algorithms.matching.zip_reference (and match_zip)."""
    lines = []
    cases = [(16, 16, None, 0.5, 0.5), (24, 40, None, 0.5, 0.5), (40, 24, 30, 0.0, 0.5),
             (32, 32, 20, 0.5, 0.1), (48, 32, None, 0.9, 0.0), (64, 64, None, 0.5, 0.5),
             (128, 96, 100, 0.3, 0.25)]
    for k, (nA, nB, r, alpha, beta) in enumerate(cases):
        g = torch.Generator().manual_seed(1000 + k)
        x = torch.randn(4 * (nA + nB), nA + nB, generator=g) @ torch.randn(nA + nB, nA + nB, generator=g)
        xc = x - x.mean(0)
        corr = correlation(x.mean(0), xc.T @ xc / x.shape[0]).float().to(device)
        if k % 2:                                             # exact ties on every other case
            corr = (corr * 8).round() / 8
        mine = zip_loop(corr, nA, nB, r, alpha=alpha, beta=beta)
        ref = zip_reference(corr, nA, nB, r, alpha=alpha, beta=beta).groups
        fast = match_zip(corr, nA, nB, r, alpha=alpha, beta=beta).groups
        if not mine == ref == fast:
            raise SystemExit(f"groups differ for nA={nA}, nB={nB}, r={r}, alpha={alpha}, beta={beta}")
        lines.append(f"nA={nA} nB={nB} r={r or max(nA, nB)} α={alpha} β={beta}{' (ties)' if k % 2 else ''}")
    return lines


def run_width(w: int, args, device: str) -> dict:
    t0 = time.perf_counter()
    corr = make_corr(w, args.samples, args.seed + w, device)
    gen = time.perf_counter() - t0
    n, r = 2 * w, w
    fast, t_fast = timed(lambda: match_zip(corr, w, w, alpha=args.alpha, beta=args.beta), device)
    rec = {"width": w, "n": n, "merges": n - r, "corr_s": gen, "match_zip_s": t_fast}
    if w <= args.full_ref_max:
        ref, t_ref = timed(lambda: zip_loop(corr, w, w, alpha=args.alpha, beta=args.beta), device,
                           max_reps=3)
        same = ref == fast.groups
        rec.update(ref_s=t_ref, ref_steps=n - r, extrapolated=False, identical=same,
                   checked="all merges")
    else:                       # time the first K steps of the reference; extrapolate linearly
        k, clock = min(args.ref_steps, n - r), {}
        _sync(device)
        t_start = time.perf_counter()
        ref = zip_loop(corr, w, w, n - k, alpha=args.alpha, beta=args.beta, clock=clock)
        _sync(device)
        t_k, setup = time.perf_counter() - t_start, clock["setup_end"] - t_start
        prefix = match_zip(corr, w, w, n - k, alpha=args.alpha, beta=args.beta).groups
        same = ref == prefix
        rec.update(ref_s=setup + (t_k - setup) * (n - r) / k, ref_steps=k, ref_measured_s=t_k,
                   ref_setup_s=setup, extrapolated=True, identical=same,
                   checked=f"first {k} of {n - r} merges")
    rec["speedup"] = rec["ref_s"] / t_fast
    if not same:
        raise SystemExit(f"width {w}: match_zip and the reference loop give different groups")
    print(f"  width {w:5d} (n={n}): match_zip {t_fast:8.3f}s  reference {rec['ref_s']:8.2f}s"
          f"{' (extrapolated from %d steps)' % rec['ref_steps'] if rec['extrapolated'] else ''}  "
          f"speed-up {rec['speedup']:7.1f}×  identical ({rec['checked']})", flush=True)
    return rec


def machine() -> dict:
    return _machine()


def render(device, env, args, checks, recs, skipped, wall) -> str:
    L = [f"# match_zip vs a plain ZipIt loop ({device}{', quick' if args.quick else ''})", "",
         f"- date {env['date']}, CPU {env['cpu']} ({env['cores']} cores)"
         f"{', GPU ' + env['cuda'] if device.startswith('cuda') else ''}, torch {env['torch']}, "
         f"Python {env['python']}, hmir {env['hmir_commit']}",
         f"- torch threads {args.threads} (match_zip itself runs single-threaded on CPU); "
         f"alpha {args.alpha}, beta {args.beta}, r = width (so `width` merges); corr from "
         f"{args.samples} samples of two width-w feature sets sharing a latent, float32",
         f"- load average (1 min) at start {env['load_start']:.2f}, at end {env['load_end']:.2f} "
         f"(above {env['cores']} = other jobs shared the CPU); whole run {wall:.0f}s",
         "- times are the best of up to 5 runs (match_zip) / 3 runs (reference) where a run is short",
         f"- the loop here equals `hmir.algorithms.matching.zip_reference` and `match_zip` on {len(checks)} "
         "small cases (" + "; ".join(checks) + ")", "",
         "| width per model | n = nA+nB | merges | match_zip (s) | reference loop (s) | speed-up | "
         "groups identical |", "|---|---|---|---|---|---|---|"]
    for r in recs:
        ref = f"{r['ref_s']:.2f}"
        if r["extrapolated"]:
            ref += (f" (extrapolated: {r['ref_measured_s']:.2f}s for {r['ref_steps']} steps, "
                    f"{r['ref_setup_s']:.2f}s of it setup)")
        tgt = ""
        if r["width"] == 2048:
            tgt = " ✓" if r["speedup"] >= args.target else " ✗"
        L.append(f"| {r['width']} | {r['n']} | {r['merges']} | {r['match_zip_s']:.3f} | {ref} | "
                 f"**{r['speedup']:.1f}×**{tgt} | yes ({r['checked']}) |")
    for w, why in skipped:
        L.append(f"| {w} | {2 * w} | {w} | — | — | — | skipped: {why} |")
    L += ["", f"Target: ≥ {args.target:g}× at width 2048."]
    if any(r["extrapolated"] for r in recs):
        L += ["", "Extrapolated rows: the reference loop was run for its first K merges only (each of "
              "its steps costs the same O(n²) argmax whatever the step, so total ≈ setup + (time of "
              "K steps) × merges / K); the groups after those K merges were checked identical to "
              "`match_zip(..., r=n-K)`. Run with `--full-ref-max 4096` to time it fully."]
    return "\n".join(L)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="quick version, under a minute (widths up to 2048, no 4096)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, or auto (cpu, and cuda when available)")
    ap.add_argument("--widths", type=lambda s: [int(w) for w in s.split(",")])
    ap.add_argument("--full-ref-max", type=int,
                    help="widest width at which the reference runs fully (default 2048; quick 1024)")
    ap.add_argument("--ref-steps", type=int, default=256,
                    help="reference steps timed where it is extrapolated (default 256)")
    ap.add_argument("--samples", type=int, help="samples behind corr (default 1024; quick 512)")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", type=float, default=20.0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    q = args.quick
    widths = args.widths or [256, 512, 1024, 2048, 4096]
    args.full_ref_max = args.full_ref_max or (1024 if q else 2048)
    args.samples = args.samples or (512 if q else 1024)
    skipped = []
    if q and not args.widths:
        widths, skipped = widths[:-1], [(4096, "--quick (the reference alone would take minutes)")]
    torch.set_num_threads(args.threads)
    devices = {"auto": ["cpu"] + (["cuda"] if torch.cuda.is_available() else []),
               "cpu": ["cpu"], "cuda": ["cuda"]}.get(args.device, [args.device])
    env = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    for device in devices:
        t0 = time.perf_counter()
        env["load_start"] = os.getloadavg()[0]
        print(f"[bench_zip] {device}: torch {env['torch']}, threads {args.threads}", flush=True)
        checks = check_small(device)
        print(f"  reference loop == hmir zip_reference == match_zip on {len(checks)} small cases", flush=True)
        recs = [run_width(w, args, device) for w in widths]
        env["load_end"] = os.getloadavg()[0]
        md = render(device, env, args, checks, recs, skipped, time.perf_counter() - t0)
        stem = f"zip_{device.split(':')[0]}{'_quick' if q else ''}"
        (args.out / f"{stem}.md").write_text(md + "\n")
        (args.out / f"{stem}.json").write_text(json.dumps({"env": env, "records": recs,
                                                           "skipped": skipped}, indent=1) + "\n")
        print("\n" + md + f"\nwritten {args.out / stem}.md and .json", flush=True)


if __name__ == "__main__":
    sys.exit(main())
