#!/usr/bin/env python
"""Coverage of real architectures: which torchvision / timm classifiers hmir lowers, keeps
permutation-invariant, self-merges and exports to ONNX, with torch-pruning as an anchor.

Each model runs in a fresh child process (this script re-invoked with ``--child SPEC``) on one
thread, under a wall-time limit (``--timeout``) and a memory limit (``--memory-gb``: the parent
polls the resident set of the child's process tree in /proc and kills it past the limit). The
checks themselves are :mod:`hmir.harness.coverage` (random init, randomized norms and constant
params; lower → perm-invariant → self-merge → ONNX, each stopping the chain on failure). The
torch-pruning anchor (``DependencyGraph`` builds; one MetaPruner step at 0.25 then a forward
pass) runs in its own child, and is skipped when torch_pruning does not import (``--no-tp``).

Results are written after every model to ``results/coverage.md`` (totals per suite, one row
per model, failures grouped by first error line) and ``results/coverage.json`` (raw records).

Usage::

    python benchmarks/coverage.py                        # all suites (hours on a 2-core CPU)
    python benchmarks/coverage.py --suite timm --jobs 2 --no-tp
    python benchmarks/coverage.py --only resnet18,tv:vgg11 --out /tmp/cov
    python benchmarks/coverage.py --resume               # skip models already in the json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _machine import machine as _machine  # noqa: E402

RESULTS = HERE.parent / "results"
TAG = "COVERAGE_JSON "
TIMM = ("resnet26 resnet50d resnext26ts regnetx_002 regnety_002 efficientnet_b0 "
        "tf_efficientnetv2_b0 mobilenetv3_large_100 ghostnet_100 convnext_atto convnext_nano "
        "convnextv2_atto vit_tiny_patch16_224 deit_tiny_patch16_224 swin_tiny_patch4_window7_224 "
        "levit_128s mixer_b16_224 resmlp_12_224 dla34 dpn68 densenet121 inception_v3 xception41 "
        "cspresnet50 hrnet_w18_small poolformer_s12 edgenext_xx_small mobilevit_xxs coat_lite_tiny "
        "cait_xxs24_224 repvgg_a0").split()


# ----------------------------------------------------------------------------- child side

def child(spec: str, mode: str) -> None:
    """Build ``spec``, pick its input, run the checks of ``mode`` (hmir | tp); one JSON line each."""
    import torch

    torch.set_num_threads(1)
    from hmir.harness import coverage as cov

    emit = lambda rec: print(TAG + json.dumps(rec), flush=True)  # noqa: E731
    t0 = time.perf_counter()
    try:
        model = cov.build(spec, seed=0)
        x, y = cov.pick_input(model, spec, seed=0)
    except Exception as e:  # the model itself does not run: a result, not a crash
        emit({"step": "forward", "ok": False, "error": cov._error(e),
              "seconds": time.perf_counter() - t0})
        return
    emit({"step": "forward", "ok": True, "size": int(x.shape[-1]), "seconds": time.perf_counter() - t0})
    checks = cov.run_checks(model, x, y, seed=0) if mode == "hmir" else cov.run_tp(model, x, y)
    for rec in checks:
        emit(rec)


# ----------------------------------------------------------------------------- parent side

def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (VmRSS from /proc)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, todo = set(), [pid]
    while todo:
        p = todo.pop()
        tree.add(p)
        todo += [c for c, pp in parent.items() if pp == p and c not in tree]
    total = 0
    for p in tree:
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:")), 0)
        except OSError:
            pass
    return total


class Child:
    """One running child: ``spec`` in ``mode``, its stdout in a temporary file."""

    def __init__(self, spec: str, mode: str, args) -> None:
        self.spec, self.mode, self.args = spec, mode, args
        self.out = tempfile.TemporaryFile("w+")
        self.err = tempfile.TemporaryFile("w+")
        self.tmp = tempfile.mkdtemp(prefix="hmir-coverage-")     # ONNX files; removed at the end
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TMPDIR": self.tmp}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", spec,
                                      "--mode", mode], stdout=self.out, stderr=self.err, env=env,
                                     cwd=HERE.parent, start_new_session=True)
        self.t0, self.peak, self.killed = time.perf_counter(), 0, None

    def poll(self) -> bool:
        """True when the child has ended (by itself, or killed past a limit)."""
        if self.proc.poll() is not None:
            return True
        self.peak = max(self.peak, tree_rss(self.proc.pid))
        if time.perf_counter() - self.t0 > self.args.timeout:
            self.killed = f"timeout ({self.args.timeout:g} s)"
        elif self.peak > self.args.memory_gb * 1024 ** 3:
            self.killed = f"memory > {self.args.memory_gb:g} GB"
        if self.killed:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            return True
        return False

    def result(self) -> dict:
        """The child's record: input size, its steps, time, peak MB, first error."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.out.seek(0), self.err.seek(0)
        recs = [json.loads(ln[len(TAG):]) for ln in self.out.read().splitlines() if ln.startswith(TAG)]
        steps = {r.pop("step"): r for r in recs}
        order = ["forward", *(("lower", "perm", "merge", "onnx") if self.mode == "hmir"
                              else ("builds", "prunes"))]
        failed = next((s for s in order if s in steps and not steps[s]["ok"]), None)
        if failed is None and len(steps) < len(order):        # ended early: killed or crashed
            failed = order[len(steps)]
            tail = [ln for ln in self.err.read().strip().splitlines() if ln.strip()][-1:]
            why = self.killed or f"child exited with code {self.proc.returncode}" + (
                f": {tail[0][:200]}" if tail else "")
            steps[failed] = {"ok": False, "error": why}
        peak_child = max((r.get("peak_mb", 0.0) for r in steps.values()), default=0.0)
        fwd = steps.pop("forward")
        return {"size": fwd.get("size"), "steps": steps, "seconds": time.perf_counter() - self.t0,
                "peak_mb": max(peak_child, self.peak / 1024 ** 2),
                "error": f"{failed}: {(fwd if failed == 'forward' else steps[failed])['error']}"
                if failed else None}


def model_list(args) -> list[str]:
    """``tv:NAME`` / ``timm:NAME`` specs of the chosen suite(s), filtered by ``--only``; both
    suites alternate (a partial run covers both)."""
    tv, tm = [], []
    if args.suite in ("torchvision", "all"):
        import torchvision

        tv = ["tv:" + n for n in torchvision.models.list_models(module=torchvision.models)]
    if args.suite in ("timm", "all"):
        tm = ["timm:" + n for n in TIMM]
    specs = [s for pair in itertools.zip_longest(tv, tm) for s in pair if s]
    if args.only:
        want = set(args.only.split(","))
        specs = [s for s in specs if s in want or s.split(":", 1)[1] in want]
    return specs


def save(args, env: dict, records: dict) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "coverage.json").write_text(json.dumps({"env": env, "records": records}, indent=1) + "\n")
    (args.out / "coverage.md").write_text(render(env, records, args) + "\n")


def run(args) -> dict:
    """Run every (model, mode) child, ``--jobs`` at a time; save after each one."""
    path = args.out / "coverage.json"
    keep = (args.resume or args.rerun) and path.exists()
    records = json.loads(path.read_text())["records"] if keep else {}
    if args.rerun:                       # run the chosen models again, keep everyone else's records
        for s in model_list(args):
            records.pop(s, None)
    env = _machine(**_versions())
    modes = ("hmir",) + (() if args.no_tp or env["torch_pruning"] is None else ("tp",))
    todo = [(s, m) for s in model_list(args) for m in modes if m not in records.get(s, {})]
    running: list[Child] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # → finally: no orphaned children
    try:
        while todo or running:
            while todo and len(running) < args.jobs:
                running.append(Child(*todo.pop(0), args))
            time.sleep(0.5)
            for c in [c for c in running if c.poll()]:
                running.remove(c)
                rec = c.result()
                records.setdefault(c.spec, {})[c.mode] = rec
                print(f"[coverage] {c.spec:40s} {c.mode:4s} {rec['seconds']:6.0f} s "
                      f"{rec['peak_mb']:6.0f} MB  {rec['error'] or 'ok'}", flush=True)
                save(args, env, records)
    finally:
        for c in running:
            os.killpg(c.proc.pid, signal.SIGKILL)
            shutil.rmtree(c.tmp, ignore_errors=True)
    save(args, env, records)
    return records


def _versions() -> dict:
    out = {}
    for mod in ("torchvision", "timm", "torch_pruning", "onnxruntime"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


def _cell(st: dict | None, *keys: str) -> str:
    """✓/✗ and the step's numbers; — where the step did not run."""
    if st is None:
        return "—"
    nums = " / ".join(f"{st[k]:.1e}" for k in keys if st.get(k) is not None)
    return ("✓" if st["ok"] else "✗") + (f" {nums}" if nums else "")


def _md(text: str | None, n: int = 160) -> str:
    text = (text or "").replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= n else text[:n - 1] + "…"


def error_key(line: str) -> str:
    """An error line with its file paths and numbers replaced by ``<path>`` and ``#``, so that
    one failure met with different sizes or tolerances is one group.

    >>> error_key("onnx: /tmp/a1/m.onnx: max 0.00082 > atol = 0.0001 at node 'mul_3'")
    "onnx: <path>: max # > atol = # at node 'mul_#'"
    """
    line = re.sub(r"(?<![\w.])/[^\s:,;'\"()]+", "<path>", line)
    return re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", line)


def render(env: dict, records: dict, args, totals_only: bool = False) -> str:
    """The markdown report: totals per suite, hmir vs torch-pruning, one row per model, and the
    failures grouped by their first error line."""
    from hmir.harness.coverage import totals

    flat = {s: {"steps": r.get("hmir", {}).get("steps", {}),
                "tp": r["tp"]["steps"] if "tp" in r else None} for s, r in records.items()}
    suites = [(name, [s for s in records if s.startswith(p)]) for name, p in
              (("torchvision", "tv:"), ("timm", "timm:"))]
    L = ["# Coverage of real architectures", "",
         f"- {env['date']}, CPU {env['cpu']} ({env['cores']} cores), torch {env['torch']}, "
         f"torchvision {env['torchvision']}, timm {env['timm']}, torch_pruning {env['torch_pruning']}, "
         f"hmir {env['hmir_commit']}; one thread, a fresh child per model, limits {args.timeout:g} s "
         f"and {args.memory_gb:g} GB; random init with randomized norms and constant params; "
         "relative errors max|Δ| / max|y| (pass ≤ 1e-4)", "",
         "| suite | models | lowers | perm-invariant | self-merge | ONNX | **all four** | tp builds "
         "| tp prunes+runs |", "|---|---|---|---|---|---|---|---|---|"]
    tots = [(name, totals([flat[s] for s in specs])) for name, specs in suites if specs]
    for name, t in tots:
        L.append(f"| {name} | {t['models']} | {t['lower']} | {t['perm']} | {t['merge']} | {t['onnx']} "
                 f"| **{t['all']}** | {t['tp_builds']}/{t['tp_models']} | {t['tp_prunes']}/{t['tp_models']} |")
    L += ["", "hmir (all four) side by side with torch-pruning (prunes+runs):", "",
          "| suite | both | hmir only | tp only | neither |", "|---|---|---|---|---|"]
    L += [f"| {n} | {t['both']} | {t['hmir_only']} | {t['tp_only']} | {t['neither']} |" for n, t in tots]
    if totals_only:
        return "\n".join(L)
    L += ["", "## Per model", "", "| model | frontend | input | lower | perm-invariant (rel) | "
          "self-merge (rel) | ONNX (abs / rel) | tp builds | tp prunes+runs | time (s) | peak MB "
          "| first error |", "|---" * 12 + "|"]
    for spec, r in sorted(records.items()):
        h, st = r.get("hmir", {}), flat[spec]["steps"]
        tp = flat[spec]["tp"] or {}
        lw = st.get("lower")
        L.append(f"| {spec} | {(lw or {}).get('frontend', '—')} | {h.get('size') or '—'} | "
                 f"{_cell(lw)} | {_cell(st.get('perm'), 'rel')} | {_cell(st.get('merge'), 'rel')} | "
                 f"{_cell(st.get('onnx'), 'max_abs', 'rel')} | {_cell(tp.get('builds'))} | "
                 f"{_cell(tp.get('prunes'))} | {h.get('seconds', 0):.0f} | {h.get('peak_mb', 0):.0f} "
                 f"| {_md(h.get('error') or (r.get('tp', {}).get('error') and 'tp ' + r['tp']['error']))} |")
    groups: dict[str, list[str]] = {}
    for spec, r in records.items():
        if r.get("hmir", {}).get("error"):
            groups.setdefault(error_key(r["hmir"]["error"]), []).append(spec)
    L += ["", "## hmir failures grouped by first error line", "", "| models | first error line |",
          "|---|---|"]
    L += [f"| {len(v)}: {', '.join(v)} | {_md(k, 400)} |"
          for k, v in sorted(groups.items(), key=lambda kv: -len(kv[1]))]
    return "\n".join(L)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=("torchvision", "timm", "all"), default="all")
    ap.add_argument("--only", help="comma list of models (NAME, or tv:NAME / timm:NAME)")
    ap.add_argument("--timeout", type=float, default=240, help="seconds per child (default 240)")
    ap.add_argument("--memory-gb", type=float, default=10, help="RSS limit per child (default 10)")
    ap.add_argument("--jobs", type=int, default=1, help="children running at once (default 1)")
    ap.add_argument("--no-tp", action="store_true", help="skip the torch-pruning anchor")
    ap.add_argument("--resume", action="store_true", help="skip models already in the json")
    ap.add_argument("--rerun", action="store_true",
                    help="keep the json's other records, run the chosen models (--only) again")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder of coverage.md/.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="hmir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.mode)
        return
    records = run(args)
    print("\n" + render(_machine(**_versions()), records, args, totals_only=True), flush=True)


if __name__ == "__main__":
    main()
