#!/usr/bin/env python
"""Time and peak memory of ``hmir.compile_merge``, per pass, against a plain forward pass.

Every configuration runs in a fresh child process (this script re-invoked with ``--child``),
so that its peak memory is its own: on CPU the child resets its resident-set high-water mark
(``/proc/self/clear_refs``) right before the merge and reads ``VmHWM`` (= ``ru_maxrss``)
right after; on CUDA it uses ``torch.cuda.max_memory_allocated``. Calibration batches are
generated lazily from a seed, so the input data itself is not part of any peak.

What is printed and written to ``benchmarks/results/merge_<device>.md`` (+ ``.json``):

1. torchvision resnet18+resnet34 (depth-heterogeneous: depth + insert passes) and
   resnet50+wide_resnet50_2 (width-heterogeneous: elastic zip), random init, num_classes=10,
   8 batches of 16 at 3×64×64: merge seconds per pass and the **overhead ratio** = merge time /
   time of one plain forward pass of both models (eval, no_grad, ``model(x)``) over the same
   calibration data, measured in the same child before and after the merge (mean of the two);
   in wall seconds and in process CPU seconds. Each main pair runs in ``--repeat`` (3) fresh
   children and the run of the median ratio is reported, with all runs' ratios.
2. resnet18+resnet34 at 4, 8, 16 calibration batches: the peak must stay flat (statistics
   stream; nothing is kept per sample).
3. A width sweep (hmir.harness.zoo.resnet20 pairs at width 1, 2, 4, 8): the peak grows with width².

Each child runs torch on one thread by default (``--threads``): on a shared 2-core machine two
OpenMP threads that wait for each other made the same forward pass swing from 0.1 s to 4.5 s.

Usage::

    python benchmarks/bench_merge.py            # default size: ~5 min on a 2-core CPU
    python benchmarks/bench_merge.py --quick    # under a minute: hmir.harness.zoo models, tiny data
    python benchmarks/bench_merge.py --device cuda --batches 16 --size 96
    python benchmarks/bench_merge.py --only samples --sample-batches 4,16,64
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _machine import machine as _machine  # noqa: E402
RESULTS = HERE / "results"
PASSES = ("trace", "depth", "insert", "observe", "match", "fuse", "emit", "repair")
MiB = 1024.0 ** 2


# ----------------------------------------------------------------------------- child side

class Batches:
    """``n`` batches of ``batch`` random images 3×size×size, re-iterable, generated on demand."""

    def __init__(self, n: int, batch: int, size: int, seed: int, device: str) -> None:
        self.n, self.batch, self.size, self.seed, self.device = n, batch, size, seed, device

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for i in range(self.n):
            g = torch.Generator().manual_seed(self.seed * 100_003 + i)
            yield torch.randn(self.batch, 3, self.size, self.size, generator=g).to(self.device)


def build(spec: str, seed: int) -> torch.nn.Module:
    """``tv:resnet18`` (torchvision, weights=None, num_classes=10) or ``zoo:resnet20:2``."""
    torch.manual_seed(seed)
    kind, name, *rest = spec.split(":")
    if kind == "tv":
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=10)
    if kind == "zoo":
        from hmir.harness import zoo

        return getattr(zoo, name)(width=int(rest[0]) if rest else 1)
    raise SystemExit(f"unknown model spec {spec!r}: use tv:NAME or zoo:NAME:WIDTH")


def _status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return -1


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def forward_seconds(a, b, data, device: str) -> tuple[float, float]:
    """Wall and CPU seconds of one plain forward pass of both models over every batch."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for x in data:
            a(x)
            b(x)
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def _count_cpu_time() -> dict[str, float]:
    """Make every ``MergeReport.timed`` block also add its process CPU time (all threads) here.

    Wall seconds depend on what else runs on the machine; CPU seconds much less so.
    """
    from hmir.pipeline.report import MergeReport

    cpu: dict[str, float] = {}
    wall_timed = MergeReport.timed

    @contextmanager
    def timed(self, name):
        c0 = time.process_time()
        try:
            with wall_timed(self, name):
                yield
        finally:
            cpu[name] = cpu.get(name, 0.0) + time.process_time() - c0

    MergeReport.timed = timed
    return cpu


def run_child(cfg: dict) -> dict:
    import hmir

    cpu_passes = _count_cpu_time()

    torch.set_num_threads(cfg["threads"])
    dev = cfg["device"]
    a = build(cfg["a"], cfg["seed"]).to(dev).eval()
    b = build(cfg["b"], cfg["seed"] + 1).to(dev).eval()
    data = Batches(cfg["batches"], cfg["batch"], cfg["size"], cfg["seed"], dev)
    with torch.no_grad():                       # warm-up: allocator, oneDNN/cuDNN kernels
        x0 = next(iter(data))
        a(x0), b(x0)
    fwd_before = forward_seconds(a, b, data, dev)
    gc.collect()
    rss_before, hwm_reset = _status("VmRSS"), _reset_hwm()
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    t0, c0 = time.perf_counter(), time.process_time()
    res = hmir.compile_merge(a, b, data, method=cfg["method"], depth=cfg["depth"],
                             width=cfg["width"], progress=False)
    _sync(dev)
    total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {"cfg": cfg, "total_s": total, "passes_s": dict(res.report.timings),
           "total_cpu_s": total_cpu, "passes_cpu_s": dict(cpu_passes),
           "rss_before_b": rss_before, "hwm_b": _status("VmHWM"), "hwm_reset": hwm_reset}
    out["peak_extra_b"] = out["hwm_b"] - rss_before
    if dev.startswith("cuda"):
        out["cuda_peak_extra_b"] = torch.cuda.max_memory_allocated() - cuda_before
    free = [s for s in res.report.spaces if not s.fixed]
    out["stats_b"] = sum(16 * (s.width_a + s.width_b) ** 2 for s in free)   # sum + cov, float64
    out["max_space"] = max((s.width_a + s.width_b for s in free), default=0)
    out["params_b"] = sum(p.numel() * p.element_size() for m in (a, b) for p in m.parameters())
    out["merged_params_b"] = sum(p.numel() * p.element_size() for p in res.module.parameters())
    del res
    gc.collect()
    fwd_after = forward_seconds(a, b, data, dev)
    out["fwd_before_s"], out["fwd_before_cpu_s"] = fwd_before
    out["fwd_after_s"], out["fwd_after_cpu_s"] = fwd_after
    out["fwd_s"] = 0.5 * (out["fwd_before_s"] + out["fwd_after_s"])
    out["fwd_cpu_s"] = 0.5 * (out["fwd_before_cpu_s"] + out["fwd_after_cpu_s"])
    out["ratio"] = total / out["fwd_s"]
    out["ratio_cpu"] = total_cpu / out["fwd_cpu_s"]
    return out


# ----------------------------------------------------------------------------- parent side

def spawn(cfg: dict) -> dict:
    """Run one configuration in a fresh interpreter; returns its JSON record."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cfg)],
                          capture_output=True, text=True, cwd=HERE.parent)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"child failed for {cfg['a']} + {cfg['b']} (exit {proc.returncode})")
    rec = json.loads(lines[-1][len("BENCH_JSON "):])
    print(f"  {cfg['role']:8s} {cfg['a']} + {cfg['b']}  {cfg['batches']}x{cfg['batch']}x{cfg['size']}²: "
          f"merge {rec['total_s']:.1f}s, forward {rec['fwd_s']:.1f}s, ratio {rec['ratio']:.2f}, "
          f"peak +{rec['peak_extra_b'] / MiB:.0f} MiB  (child {time.perf_counter() - t0:.0f}s)",
          flush=True)
    return rec


def machine() -> dict:
    import torchvision

    return _machine(torchvision=torchvision.__version__)


def _mib(b: float) -> str:
    return f"{b / MiB:.1f}"


def _label(rec: dict) -> str:
    return f"{rec['cfg']['a'].split(':', 1)[1]} + {rec['cfg']['b'].split(':', 1)[1]}"


def _calib(cfg: dict) -> str:
    return f"{cfg['batches']}×{cfg['batch']} @ 3×{cfg['size']}×{cfg['size']}"


def _ratio_cell(r: dict, key: str, tgt) -> str:
    ok = "" if tgt is None else (" ✓" if r[key] <= tgt else " ✗")
    return f"**{r[key]:.2f}**{ok}"


def render(device: str, env: dict, args, recs: list[dict], wall: float) -> str:
    cuda = device.startswith("cuda")
    peak_key, peak_name = (("cuda_peak_extra_b", "CUDA peak extra (MiB, max_memory_allocated)") if cuda
                           else ("peak_extra_b", "peak RSS extra (MiB)"))
    main = [r for r in recs if r["cfg"]["role"] == "main"]
    samples = [r for r in recs if r["cfg"]["role"] == "samples"]
    widths = [r for r in recs if r["cfg"]["role"] == "width"]
    L = [f"# compile_merge benchmark ({device}{', quick' if args.quick else ''})", "",
         f"- date {env['date']}, CPU {env['cpu']} ({env['cores']} cores), "
         f"{'GPU ' + env['cuda'] + ', ' if cuda else ''}torch {env['torch']}, torchvision "
         f"{env['torchvision']}, Python {env['python']}, hmir {env['hmir_commit']}",
         f"- torch threads {args.threads}; method `{args.method}`, depth `{args.depth}`, width "
         f"`{args.width}`; random init (seed {args.seed}); each configuration in a fresh child "
         "process; calibration batches generated on the fly (not held in memory)",
         f"- load average (1 min) at start {env['load_start']:.2f}, at end {env['load_end']:.2f} "
         f"(above {env['cores']} = other jobs shared the CPU: compare ratios, not seconds); "
         f"whole run {wall:.0f}s",
         "- forward = one plain `model(x)` pass of both models (eval, no_grad) over the same "
         "calibration batches, measured before and after the merge in the same child; "
         "ratio = merge time / mean forward time, in wall seconds and in process CPU seconds "
         "(all threads; less sensitive to other jobs on a shared machine)", ""]
    if main:
        L += ["## Merge overhead", "",
              "| pair | calibration | forward before / after (s) | merge (s) | **ratio (wall)** | "
              + ("" if cuda else "ratio (CPU time) | ") + "target | "
              f"{peak_name} | params A+B (MiB) | statistics, est. (MiB) |",
              "|---|---|---|---|---|" + ("" if cuda else "---|") + "---|---|---|---|"]
        for r in main:
            tgt = args.target if r["cfg"]["a"] == "tv:resnet18" and not cuda else None
            L.append(f"| {_label(r)} ({r['cfg']['kind']}) | {_calib(r['cfg'])} | {r['fwd_before_s']:.2f} / "
                     f"{r['fwd_after_s']:.2f} | {r['total_s']:.2f} | {_ratio_cell(r, 'ratio', tgt)} | "
                     + ("" if cuda else f"{_ratio_cell(r, 'ratio_cpu', tgt)} | ") +
                     f"{'≤ %g' % tgt if tgt else '—'} | {_mib(r[peak_key])} | {_mib(r['params_b'])} | "
                     f"{_mib(r['stats_b'])} |")
        runs = [r for r in main if len(r.get("runs", ())) > 1]
        if runs:
            L += ["", "Each main pair ran in %d fresh children; the table shows the run of the median "
                  "ratio (CPU time). All runs' ratios (CPU time): " % len(runs[0]["runs"])
                  + "; ".join(f"{_label(r)} " + ", ".join(f"{x['ratio_cpu']:.2f}" for x in r["runs"])
                              for r in runs) + "."]
        for kind, sfx in (("wall", "_s"), ("CPU", "_cpu_s")):
            if cuda and kind == "CPU":
                continue
            L += ["", f"## {kind} seconds per pass (× the forward time)", "",
                  "| pair | " + " | ".join(PASSES) + " | other¹ | total |",
                  "|---|" + "---|" * (len(PASSES) + 2)]
            for r in main:
                p, f, tot = r["passes" + sfx], r["fwd" + sfx], r["total" + sfx]
                other = tot - sum(p.values())
                cells = [f"{p[k]:.2f} ({p[k] / f:.2f}×)" if k in p else "—" for k in PASSES]
                L.append(f"| {_label(r)} | " + " | ".join(cells) +
                         f" | {other:.2f} ({other / f:.2f}×) | {tot:.2f} ({tot / f:.2f}×) |")
        L += ["", "¹ other: time outside the timed passes (the input/output probe forward of both "
              "models, space pairing, stage checks).", ""]
    if samples:
        L += ["## Peak memory vs number of calibration samples (must stay flat)", "",
              f"pair {_label(samples[0])}, batches of {samples[0]['cfg']['batch']} at "
              f"3×{samples[0]['cfg']['size']}×{samples[0]['cfg']['size']}", "",
              f"| batches | samples | {peak_name} | vs fewest | merge (s) | ratio (wall) |"
              + ("" if cuda else " ratio (CPU) |"), "|---|---|---|---|---|---|" + ("" if cuda else "---|")]
        base = samples[0][peak_key]
        for r in samples:
            c = r["cfg"]
            L.append(f"| {c['batches']} | {c['batches'] * c['batch']} | {_mib(r[peak_key])} | "
                     f"{r[peak_key] / base:.2f}× | {r['total_s']:.2f} | {r['ratio']:.2f} |"
                     + ("" if cuda else f" {r['ratio_cpu']:.2f} |"))
        L.append("")
    if widths:
        L += ["## Peak memory vs width (hmir.harness.zoo.resnet20 pairs of equal width)", "",
              f"calibration {_calib(widths[0]['cfg'])} (a small batch, so that the per-batch activations, "
              "which grow only linearly with the width, do not hide the O(width²) parts); "
              "O(w²) data = params of A and B + statistics, est. (Σ over free spaces of 16·(nA+nB)² "
              "bytes: float64 sum of outer products + covariance)", "",
              f"| width | largest space nA+nB | params A+B (MiB) | statistics, est. (MiB) | {peak_name} | "
              "peak vs previous width | peak / O(w²) data |", "|---|---|---|---|---|---|---|"]
        prev = None
        for r in widths:
            w = int(r["cfg"]["a"].split(":")[2])
            grow = "—" if prev is None else f"{r[peak_key] / prev[1]:.2f}× (width {w / prev[0]:g}×)"
            L.append(f"| {w} | {r['max_space']} | {_mib(r['params_b'])} | {_mib(r['stats_b'])} | "
                     f"{_mib(r[peak_key])} | {grow} | {r[peak_key] / (r['params_b'] + r['stats_b']):.2f} |")
            prev = (w, r[peak_key])
        L.append("")
    if not all(r["hwm_reset"] for r in recs):
        L += ["Note: /proc/self/clear_refs was not writable: the peak includes the warm-up forward.", ""]
    return "\n".join(L)


def plan(args, device: str) -> list[dict]:
    base = {"device": device, "threads": args.threads, "seed": args.seed, "method": args.method,
            "depth": args.depth, "width": args.width}
    q = args.quick
    nb = args.batches or (2 if q else 8)
    bs = args.batch or (8 if q else 16)
    sz = args.size or (32 if q else 64)
    if q:
        pairs = [("zoo:resnet20:1", "zoo:resnet26:1", "depth-hetero"),
                 ("zoo:resnet20:1", "zoo:resnet20:2", "width-hetero")]
    else:
        pairs = [("tv:resnet18", "tv:resnet34", "depth-hetero"),
                 ("tv:resnet50", "tv:wide_resnet50_2", "width-hetero")]
    cfgs = [{**base, "role": "main", "a": a, "b": b, "kind": k, "batches": nb, "batch": bs, "size": sz}
            for a, b, k in pairs]
    sa, sb = (args.samples_pair or f"{pairs[0][0]}+{pairs[0][1]}").split("+")
    for n in ([2, 4] if q and not args.sample_batches else args.sample_batches or [4, 8, 16]):
        cfgs.append({**base, "role": "samples", "a": sa, "b": sb, "kind": "depth-hetero", "batches": n,
                     "batch": bs, "size": sz})
    for w in ([1, 2, 4] if q and not args.widths else args.widths or [1, 2, 4, 8]):
        cfgs.append({**base, "role": "width", "a": f"zoo:resnet20:{w}", "b": f"zoo:resnet20:{w}",
                     "kind": "width", "batches": 2, "batch": args.width_batch, "size": 32})
    only = set(args.only.split(",")) if args.only else None
    return [c for c in cfgs if only is None or c["role"] in only]


def spawn_median(cfg: dict, repeat: int) -> dict:
    """``repeat`` fresh children of one configuration; the record of the median ratio (CPU
    time), with every run's ratios in ``runs`` (the machine is noisy: single runs of the same
    configuration have differed by ±12 %)."""
    recs = sorted((spawn(cfg) for _ in range(repeat)), key=lambda r: r["ratio_cpu"])
    med = dict(recs[len(recs) // 2])
    med["runs"] = [{"ratio": r["ratio"], "ratio_cpu": r["ratio_cpu"]} for r in recs]
    return med


def run_all(cfgs: list[dict], repeat: int = 1) -> list[dict]:
    """Spawn every configuration once (the main pairs ``repeat`` times, keeping the median);
    one that differs from an earlier one only by its role (the samples sweep point at the main
    calibration size) reuses that record."""
    done: dict[str, dict] = {}
    out = []
    for c in cfgs:
        key = json.dumps({k: v for k, v in c.items() if k not in ("role", "kind")}, sort_keys=True)
        if key not in done:
            done[key] = spawn_median(c, repeat) if c["role"] == "main" and repeat > 1 else spawn(c)
        else:
            print(f"  {c['role']:8s} {c['a']} + {c['b']}  {c['batches']}x{c['batch']}x{c['size']}²: "
                  "same configuration as above, record reused", flush=True)
        out.append({**done[key], "cfg": c})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1–2 minute version (smaller models and data)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, or auto (cpu, and cuda when available)")
    ap.add_argument("--batches", type=int, help="calibration batches of the main pairs (default 8)")
    ap.add_argument("--batch", type=int, help="examples per batch of the main pairs (default 16)")
    ap.add_argument("--size", type=int, help="image side of the main pairs (default 64)")
    ap.add_argument("--widths", type=lambda s: [int(w) for w in s.split(",")],
                    help="width sweep of zoo.resnet20 pairs (default 1,2,4,8; quick 1,2,4)")
    ap.add_argument("--sample-batches", type=lambda s: [int(n) for n in s.split(",")], 
                    help="calibration batch counts of the samples sweep (default 4,8,16; quick 2,4)")
    ap.add_argument("--width-batch", type=int, default=4,
                    help="batch size of the width sweep (default 4: small, so that the per-batch "
                         "activations, O(width), do not hide the O(width²) parts)")
    ap.add_argument("--samples-pair",
                    help="pair of the samples sweep (tv:NAME or zoo:NAME:WIDTH joined by +; default: "
                         "the depth-heterogeneous main pair, at the main batch size and image size)")
    ap.add_argument("--only", help="comma list of parts to run: main,samples,width")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in each child (default 1: on a shared CPU, OpenMP threads that "
                         "wait for each other make times swing by 10×+)")
    ap.add_argument("--method", default="zip")
    ap.add_argument("--depth", default="lma")
    ap.add_argument("--width", default="max")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", type=float, default=3.0, help="ratio target of resnet18+34 on CPU")
    ap.add_argument("--repeat", type=int, default=3,
                    help="fresh runs of each main pair; the median ratio is reported (default 3)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("BENCH_JSON " + json.dumps(run_child(json.loads(args.child))), flush=True)
        return
    devices = {"auto": ["cpu"] + (["cuda"] if torch.cuda.is_available() else []),
               "cpu": ["cpu"], "cuda": ["cuda"]}.get(args.device, [args.device])
    env = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    for device in devices:
        t0 = time.perf_counter()
        env["load_start"] = os.getloadavg()[0]
        print(f"[bench_merge] {device}: torch {env['torch']}, threads {args.threads}", flush=True)
        recs = run_all(plan(args, device), args.repeat)
        env["load_end"] = os.getloadavg()[0]
        md = render(device, env, args, recs, time.perf_counter() - t0)
        stem = f"merge_{device.split(':')[0]}{'_quick' if args.quick else ''}"
        (args.out / f"{stem}.md").write_text(md + "\n")
        (args.out / f"{stem}.json").write_text(json.dumps({"env": env, "records": recs}, indent=1) + "\n")
        print("\n" + md + f"\nwritten {args.out / stem}.md and .json", flush=True)


if __name__ == "__main__":
    main()
