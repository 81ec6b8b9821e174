"""Reproduce the seeds' experiments on MNIST-5k (design.md protocol), small or full size.

Writes markdown tables, ``results.json`` and PNG plots under ``--out`` (default
``results/reproduce-<size>``):

- ``table1.md`` (seed Table I analogue): per family (CIFAR ResNet-26 + ResNet-50, VGG-13 +
  VGG-19, BN), model A = the shallower net on task A, model B = the deeper net on task B,
  and a homo partner = the shallower net on task B. Rows: Task A, Task B, Homo avg / align /
  zip (A + partner), Hetero A.SMA, A.LMA, Z.SMA, Z.LMA (A + B), and zip / Z.LMA without
  norm repair.
- ``table3.md`` (seed Table III analogue): width-hetero ResNet-20 (×1+×2, ×2+×4) and
  ResNet-26 (×1+×2): elastic zip to the wider and to the narrower width, MAL at λ = 0.5.
- ``mudsc.md`` + ``mudsc_alpha.png``: accuracy against the dual-space α (zip and permute on
  the homo pairs).
- ``mal.md`` + ``mal_lambda.png``: MAL loss along λ and the barrier, all layers and
  layer-selective.
- ``cka_<family>.png``: the CKA of the units the depth alignment compared (seed Fig. 3).

Run:  python examples/reproduce.py --size full --workers 2    (3 pairs per row)
      python examples/reproduce.py --size small    (CI: 1 pair, VGG family, ResNet-20 widths)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from hmir import DepthOptions, compile_merge
from hmir.harness import zoo
from hmir.harness.mnist import (calibration_batches, class_embeddings, evaluate, load_mnist5k, logits,
                        task_split, train_embedding_model)

EMB = 32
ARCHS = {
    "ResNet-20": lambda w: zoo.resnet20(w, in_channels=1, num_outputs=EMB),
    "ResNet-26": lambda w: zoo.resnet26(w, in_channels=1, num_outputs=EMB),
    "ResNet-50": lambda w: zoo.resnet50_cifar(w, in_channels=1, num_outputs=EMB),
    "VGG-13": lambda w: zoo.vgg13(width=0.5 * w, batch_norm=True, in_channels=1, num_outputs=EMB),
    "VGG-19": lambda w: zoo.vgg19(width=0.5 * w, batch_norm=True, in_channels=1, num_outputs=EMB),
}
SIZES = {
    "small": dict(pairs=1, epochs=2, calib=512, families=[("VGG-13", "VGG-19")],
                  widths=[("ResNet-20", 1, 2)], alphas=[0.0, 0.5, 1.0]),
    "full": dict(pairs=3, epochs=2, calib=512, families=[("ResNet-26", "ResNet-50"), ("VGG-13", "VGG-19")],
                 widths=[("ResNet-20", 1, 2), ("ResNet-26", 1, 2), ("ResNet-20", 2, 4)],
                 alphas=[0.0, 0.25, 0.5, 0.75, 1.0]),
}
COST = {"ResNet-20": 3, "ResNet-26": 4, "ResNet-50": 8, "VGG-13": 3, "VGG-19": 4}   # for scheduling
HETERO = {"A.SMA": ("permute", "sma"), "A.LMA": ("permute", "lma"),
          "Z.SMA": ("zip", "sma"), "Z.LMA": ("zip", "lma")}


@dataclass
class Lab:
    """The data, the class embeddings and a cache of trained models (one per arch/width/task/seed)."""

    epochs: int
    calib: int
    split: object = field(default_factory=load_mnist5k)
    E: torch.Tensor = field(default_factory=lambda: class_embeddings(EMB, seed=0))
    models: dict = field(default_factory=dict)

    def model(self, arch: str, width: int, task: str, seed: int):
        key = (arch, width, task, seed)
        if key not in self.models:
            classes = task_split(seed)[0 if task == "A" else 1]
            s = 1000 * seed + 10 * list(ARCHS).index(arch) + 2 * width + (task == "B")
            torch.manual_seed(s)
            self.models[key] = train_embedding_model(ARCHS[arch](width), self.split, classes, self.E,
                                                     epochs=self.epochs, seed=s)
        return self.models[key]

    def data(self, seed: int):
        return calibration_batches(self.split, n=self.calib, seed=seed)

    def acc(self, model, seed: int) -> dict:
        return evaluate(model, self.split, self.E, *task_split(seed))

    def merge(self, a, b, seed: int, **kw) -> dict:
        return self.acc(compile_merge(a, b, self.data(seed), progress=False, **kw).module, seed)


def table1_pair(lab: Lab, shallow: str, deep: str, seed: int, cka: Path | None) -> dict:
    a, b, h = (lab.model(shallow, 1, "A", seed), lab.model(deep, 1, "B", seed),
               lab.model(shallow, 1, "B", seed))
    rows = {f"Task A ({shallow})": lab.acc(a, seed), f"Task B ({deep})": lab.acc(b, seed)}
    for name, method in (("Homo avg", "avg"), ("Homo align", "permute"), ("Homo zip", "zip")):
        rows[name] = lab.merge(a, h, seed, method=method)
    for name, (method, depth) in HETERO.items():
        if cka is not None and name == "Z.LMA":     # the heatmap shows forced stages too
            depth = DepthOptions(depth, cka="all")
        res = compile_merge(a, b, lab.data(seed), method=method, depth=depth, progress=False)
        rows[f"Hetero {name}"] = lab.acc(res.module, seed)
        if cka is not None and name == "Z.LMA":
            res.report.plot_cka(cka, title=f"CKA {shallow} (task A) vs {deep} (task B)")
    rows["Homo zip, no repair"] = lab.merge(a, h, seed, method="zip", repair=False)
    rows["Hetero Z.LMA, no repair"] = lab.merge(a, b, seed, method="zip", depth="lma", repair=False)
    return rows


def table3_pair(lab: Lab, arch: str, wa: int, wb: int, seed: int) -> dict:
    a, b = lab.model(arch, wa, "A", seed), lab.model(arch, wb, "B", seed)
    return {f"Task A (×{wa})": lab.acc(a, seed), f"Task B (×{wb})": lab.acc(b, seed),
            f"Z elastic → ×{wb} (max)": lab.merge(a, b, seed, method="zip", width="max"),
            f"Z elastic → ×{wa} (min)": lab.merge(a, b, seed, method="zip", width="min"),
            f"MAL λ=0.5 (×{wa})": lab.merge(a, b, seed, method="mal", lam=0.5)}


def mudsc_pair(lab: Lab, arch: str, seed: int, alphas: list[float]) -> dict:
    a, h = lab.model(arch, 1, "A", seed), lab.model(arch, 1, "B", seed)
    return {f"{method} α={al:g}": lab.merge(a, h, seed, method=method, similarity_alpha=al)
            for method in ("zip", "permute") for al in alphas}


def mal_paths(lab: Lab, arch: str, wa: int, wb: int, out: Path) -> dict:
    """MAL loss along λ (21 points) for all layers and two layer selections, seed 0."""
    from hmir.frontends import lower
    from hmir.algorithms.interpolate import loss_along_lambda, plot_paths
    from hmir.ir.pairing import pair_spaces, param_map
    from hmir.passes.repair import repair
    from hmir.passes.weight_match import align_state, weight_match

    a, b, data = lab.model(arch, wa, "A", 0), lab.model(arch, wb, "B", 0), lab.data(0)
    ir_a, ir_b = lower(a, data[0][:2], "a"), lower(b, data[0][:2], "b")
    pairs = pair_spaces(ir_a, ir_b)
    names = param_map(ir_a, ir_b, pairs)
    wm = weight_match(ir_a, ir_b, pairs, a.state_dict(), b.state_dict(), names=names)
    aligned = align_state(ir_a, ir_b, b.state_dict(), wm, names=names)
    test = list(zip(lab.split.x_test.split(250), lab.split.y_test.split(250)))
    loss = lambda y_hat, y: F.cross_entropy(logits(y_hat, lab.E), y)   # noqa: E731
    fix = lambda m: repair(m, data, progress=False)                      # noqa: E731
    paths = {sel: loss_along_lambda(a, a.state_dict(), aligned, test, loss, layers=layers, repair=fix)
             for sel, layers in (("all layers", None), ("layer3 + fc", ["layer3", "fc"]),
                                 ("stem + layer1", ["stem", "layer1"]))}
    plot_paths(paths, out / "mal_lambda.png", title=f"MAL: {arch} ×{wa} (task A) + ×{wb} (task B)")
    return {k: {"barrier": float(p.barrier), "losses": [float(v) for v in p.losses]} for k, p in paths.items()}


def mean_rows(runs: list[dict]) -> dict:
    return {r: {k: statistics.mean(x[r][k] for x in runs) for k in runs[0][r]} for r in runs[0]}


def table(rows: dict) -> str:
    out = ["| model | joint | avg | task A | task B |", "|---|---|---|---|---|"]
    out += [f"| {r} | {m['joint']:.3f} | {m['avg']:.3f} | {m['task_a']:.3f} | {m['task_b']:.3f} |"
            for r, m in rows.items()]
    return "\n".join(out)


def plot_alpha(rows: dict, path: Path, alphas: list[float], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for fam, fam_rows in rows.items():
        for method in ("zip", "permute"):
            ax.plot(alphas, [fam_rows[f"{method} α={al:g}"]["joint"] for al in alphas], marker="o",
                    label=f"{fam}: {method}")
    ax.set_xlabel("α (1: activations only, 0: weights only)")
    ax.set_ylabel("joint accuracy")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _job(job: tuple) -> tuple:
    """One independent unit of work (its own models): a Table I or a Table III pair."""
    kind, cfg, seed, args, out = job
    torch.set_num_threads(cfg.get("threads") or torch.get_num_threads())
    lab, extra = Lab(cfg["epochs"], cfg["calib"]), {}
    if kind == "table1":
        shallow, deep = args
        cka = out / f"cka_{shallow}_{deep}.png" if out is not None and seed == 0 else None
        rows = table1_pair(lab, shallow, deep, seed, cka)
        extra = mudsc_pair(lab, shallow, seed, cfg["alphas"])
        key = f"table1 {shallow} + {deep}"
    else:
        arch, wa, wb = args
        rows = table3_pair(lab, arch, wa, wb, seed)
        if out is not None and seed == 0 and args == tuple(cfg["widths"][0]):
            extra = mal_paths(lab, arch, wa, wb, out)
        key = f"table3 {arch} ×{wa} + ×{wb}"
    return kind, key, args, seed, rows, extra


def _cost(job: tuple) -> int:
    kind, _, _, args, _ = job
    if kind == "table1":
        return 2 * COST[args[0]] + COST[args[1]]
    return COST[args[0]] * (args[1] ** 2 + args[2] ** 2)


@contextlib.contextmanager
def _pool(workers: int):
    """``imap_unordered`` of a spawn pool with ``workers`` processes, or plain ``map`` for one."""
    if workers <= 1:
        yield map
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        yield lambda f, xs: pool.imap_unordered(f, xs, chunksize=1)


def run(size: str = "small", out: Path | None = None, workers: int = 1, threads: int | None = None) -> dict:
    """Run every part of one size; returns the mean rows (and writes files when ``out`` is set).

    ``workers`` > 1 runs the independent pairs in that many processes (one torch thread each
    unless ``threads`` says otherwise).
    """
    cfg = dict(SIZES[size], threads=threads or (1 if workers > 1 else None))
    t0 = time.perf_counter()
    jobs = [("table1", cfg, s, fam, out) for fam in cfg["families"] for s in range(cfg["pairs"])]
    jobs += [("table3", cfg, s, tuple(w), out) for w in cfg["widths"] for s in range(cfg["pairs"])]
    jobs.sort(key=_cost, reverse=True)                 # longest first: better packing
    done = []
    with _pool(workers) as imap:
        for r in tqdm(imap(_job, jobs), total=len(jobs), desc="reproduce", unit="pair"):
            done.append(r)
    res, mudsc, by_key = {}, {}, {}
    for kind, key, args, seed, rows, extra in done:
        by_key.setdefault(key, []).append(rows)
        if kind == "table1":
            mudsc.setdefault(args[0], []).append(extra)
        elif extra:
            res["mal"] = extra
    res.update({k: mean_rows(by_key[k]) for k in sorted(by_key)})
    res["mudsc"] = {k: mean_rows(mudsc[k]) for k in sorted(mudsc)}
    if out is not None:
        _write(res, cfg, out, time.perf_counter() - t0)
    return res


def _write(res: dict, cfg: dict, out: Path, seconds: float) -> None:
    t1 = {k: v for k, v in res.items() if k.startswith("table1")}
    t3 = {k: v for k, v in res.items() if k.startswith("table3")}
    (out / "table1.md").write_text("\n\n".join(f"**{k[7:]}**\n\n{table(v)}" for k, v in t1.items()) + "\n")
    (out / "table3.md").write_text("\n\n".join(f"**{k[7:]}**\n\n{table(v)}" for k, v in t3.items()) + "\n")
    (out / "mudsc.md").write_text("\n\n".join(f"**{k}**\n\n{table(v)}" for k, v in res["mudsc"].items()) + "\n")
    plot_alpha(res["mudsc"], out / "mudsc_alpha.png", cfg["alphas"], "MuDSC dual-space α (homo pairs)")
    mal = ["| layers merged | L(0) | L(0.5) | L(1) | barrier |", "|---|---|---|---|---|"]
    mal += [f"| {k} | {v['losses'][0]:.3f} | {v['losses'][10]:.3f} | {v['losses'][-1]:.3f} | "
            f"{v['barrier']:.3f} |" for k, v in res["mal"].items()]
    (out / "mal.md").write_text("\n".join(mal) + "\n")
    cfg = dict(cfg, seconds=round(seconds, 1))
    (out / "results.json").write_text(json.dumps({"config": cfg, "results": res}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--workers", type=int, default=1, help="processes running pairs in parallel")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: torch's; 1 with --workers > 1)")
    args = p.parse_args()
    out = args.out or Path(f"results/reproduce-{args.size}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run(args.size, out, args.workers, args.threads)
    for f in ("table1.md", "table3.md", "mudsc.md", "mal.md"):
        print(f"\n## {f}\n{(out / f).read_text()}")
    print(f"done in {time.perf_counter() - t0:.0f} s → {out}")


if __name__ == "__main__":
    main()
