#!/usr/bin/env python
"""Record what ``compile_merge`` produces, and compare it with a record made before a change.

An optimisation must not change any merge: this script runs a few configurations, stores each
space's groups (the match) and the merged state dict, and on ``--compare`` checks that the groups
are identical and every merged tensor equal up to float rounding (``--rtol``, relative to the
tensor's largest entry).

Usage::

    python benchmarks/fingerprint.py --save /tmp/before.pt            # before the change
    python benchmarks/fingerprint.py --compare /tmp/before.pt         # after: exit 1 on a difference
    python benchmarks/fingerprint.py --only r18r34 --save /tmp/r.pt   # one configuration
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import Batches, build  # noqa: E402

CONFIGS = {  # name: (a, b, batches, batch, size, compile_merge kwargs)
    "r18r34": ("tv:resnet18", "tv:resnet34", 4, 16, 64, {}),
    "r50wide": ("tv:resnet50", "tv:wide_resnet50_2", 2, 16, 64, {}),
    "r20r26-permute": ("zoo:resnet20:1", "zoo:resnet26:1", 4, 16, 32, {"method": "permute"}),
    "r20x1x2-dual": ("zoo:resnet20:1", "zoo:resnet20:2", 4, 16, 32, {"similarity_alpha": 0.5}),
    "vgg11-vgg13": ("tv:vgg11_bn", "tv:vgg13_bn", 2, 8, 32, {"depth": "sma"}),
}


def record(name: str) -> dict:
    """Groups per space and the merged state dict of one configuration."""
    import hmir

    a, b, nb, bs, size, kw = CONFIGS[name]
    ma, mb = build(a, 0).eval(), build(b, 1).eval()
    t0 = time.perf_counter()
    res = hmir.compile_merge(ma, mb, Batches(nb, bs, size, 0, "cpu"), progress=False, **kw)
    secs = time.perf_counter() - t0
    captured = [m.groups for m in res.state.matches]
    groups = {s.name: (s.width_a, s.width_b, s.width) for s in res.report.spaces}
    return {"spaces": groups, "groups": captured, "scores": [s.similarity for s in res.report.spaces],
            "notes": list(res.report.notes), "secs": secs,
            "state": {k: v.detach().clone() for k, v in res.module.state_dict().items()}}


def max_rel_diff(old: dict, new: dict) -> float:
    """Largest difference of a floating-point merged tensor, relative to its largest entry."""
    out = 0.0
    for k, v in old["state"].items():
        w = new["state"].get(k)
        if w is not None and w.shape == v.shape and v.is_floating_point() and v.numel():
            scale = float(v.abs().max()) or 1.0
            out = max(out, float((v.double() - w.double()).abs().max()) / scale)
    return out


def compare(old: dict, new: dict, rtol: float) -> list[str]:
    """Differences between two records, as readable lines (empty: identical)."""
    bad = []
    if old["spaces"] != new["spaces"]:
        bad.append("space widths differ")
    diff = [k for k, (g, h) in enumerate(zip(old["groups"], new["groups"])) if g != h]
    if diff or len(old["groups"]) != len(new["groups"]):
        bad.append(f"groups differ in matches {diff} (of {len(old['groups'])})")
    if old["notes"] != new["notes"]:
        bad.append(f"notes differ: {set(old['notes']) ^ set(new['notes'])}")
    for k, v in old["state"].items():
        w = new["state"].get(k)
        if w is None or w.shape != v.shape:
            bad.append(f"{k}: missing or shape {None if w is None else tuple(w.shape)} vs {tuple(v.shape)}")
            continue
        if not v.is_floating_point():
            if not torch.equal(v, w):
                bad.append(f"{k}: integer buffer differs")
            continue
        scale = float(v.abs().max()) or 1.0
        err = float((v.double() - w.double()).abs().max()) / scale
        if err > rtol:
            bad.append(f"{k}: max relative difference {err:.2e}")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--save", type=Path)
    ap.add_argument("--compare", type=Path)
    ap.add_argument("--only", default=",".join(CONFIGS))
    ap.add_argument("--rtol", type=float, default=1e-5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = args.only.split(",")
    recs = {}
    for n in names:
        recs[n] = record(n)
        print(f"{n}: {recs[n]['secs']:.1f}s", flush=True)
    if args.save:
        torch.save(recs, args.save)
    if args.compare:
        old, failed = torch.load(args.compare), False
        for n in names:
            bad = compare(old[n], recs[n], args.rtol)
            scores = max(abs(x - y) for x, y in zip(old[n]["scores"], recs[n]["scores"])
                         if x == x and y == y) if recs[n]["scores"] else 0.0
            same_groups = old[n]["groups"] == recs[n]["groups"]
            print(f"{n}: {'IDENTICAL' if not bad else 'DIFFERENT'} (groups "
                  f"{'identical' if same_groups else 'DIFFER'}, merged tensors within "
                  f"{max_rel_diff(old[n], recs[n]):.1e} relative, max score diff {scores:.1e}; "
                  f"{old[n]['secs']:.1f}s → {recs[n]['secs']:.1f}s)")
            for line in bad[:20]:
                print("   ", line)
            failed |= bool(bad)
        return int(failed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
