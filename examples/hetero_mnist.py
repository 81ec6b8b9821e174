"""Heterogeneous merging on real MNIST digits (design.md protocol), no training of the merge.

Depth (seed Table I analogue): ResNet-20 trained on task A, ResNet-26 on task B, merged
with A.SMA, A.LMA (align = permute), Z.SMA, Z.LMA. Width (seed Table III analogue):
mnist_cnn ×1 on task A and ×2 on task B, merged by elastic zip to the larger and the
smaller width; and the MAL zero-padded permutation's loss along λ (PNG).

Run:  python examples/hetero_mnist.py                 (3 pairs, ~25 min on 2 CPU cores)
      python examples/hetero_mnist.py --pairs 1 --epochs 2 --calib 256   (CI-sized)
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from hmir import compile_merge
from hmir.harness import zoo
from hmir.harness.mnist import (calibration_batches, class_embeddings, evaluate, load_mnist5k, logits,
                        task_split, train_embedding_model)

EMB_DIM = 32
DEPTH_ROWS = {"A.SMA": ("permute", "sma"), "A.LMA": ("permute", "lma"),
              "Z.SMA": ("zip", "sma"), "Z.LMA": ("zip", "lma")}


def _train(make, split, task, E, seed: int, epochs: int):
    torch.manual_seed(seed)
    return train_embedding_model(make(), split, task, E, epochs=epochs, seed=seed)


def depth_pair(split, seed: int, *, epochs: int, calib: int) -> dict[str, dict]:
    """ResNet-20 (task A) + ResNet-26 (task B): single models and the four depth merges."""
    task_a, task_b = task_split(seed)
    E = class_embeddings(EMB_DIM, seed=0)
    a = _train(lambda: zoo.resnet20(in_channels=1, num_outputs=EMB_DIM), split, task_a, E, 100 * seed, epochs)
    b = _train(lambda: zoo.resnet26(in_channels=1, num_outputs=EMB_DIM), split, task_b, E, 100 * seed + 1, epochs)
    data = calibration_batches(split, n=calib, seed=seed)
    out = {"ResNet-20 (task A)": evaluate(a, split, E, task_a, task_b),
           "ResNet-26 (task B)": evaluate(b, split, E, task_a, task_b)}
    for row, (method, depth) in DEPTH_ROWS.items():
        merged = compile_merge(a, b, data, method=method, depth=depth, progress=False).module
        out[row] = evaluate(merged, split, E, task_a, task_b)
    return out


def width_pair(split, seed: int, *, epochs: int, calib: int, plot: Path | None = None) -> dict[str, dict]:
    """mnist_cnn ×1 (task A) + ×2 (task B): elastic zip to max and min width; MAL λ path."""
    task_a, task_b = task_split(seed)
    E = class_embeddings(EMB_DIM, seed=0)
    a = _train(lambda: zoo.mnist_cnn(width=1, num_outputs=EMB_DIM), split, task_a, E, 100 * seed, epochs)
    b = _train(lambda: zoo.mnist_cnn(width=2, num_outputs=EMB_DIM), split, task_b, E, 100 * seed + 1, epochs)
    data = calibration_batches(split, n=calib, seed=seed)
    out = {"cnn ×1 (task A)": evaluate(a, split, E, task_a, task_b),
           "cnn ×2 (task B)": evaluate(b, split, E, task_a, task_b)}
    for row, width in (("Z elastic, width max (×2)", "max"), ("Z elastic, width min (×1)", "min")):
        merged = compile_merge(a, b, data, method="zip", width=width, progress=False).module
        out[row] = evaluate(merged, split, E, task_a, task_b)
    if plot is not None:
        _mal_path(a, b, split, E, data, plot)
    return out


def _mal_path(a, b, split, E, data, path: Path) -> None:
    """Loss along λ of MAL's zero-padded permutation merge (base: the narrower model A)."""
    from hmir.frontends import lower
    from hmir.algorithms.interpolate import loss_along_lambda, plot_paths
    from hmir.ir.pairing import pair_spaces, param_map
    from hmir.passes.repair import repair
    from hmir.passes.weight_match import align_state, weight_match

    x = data[0][:2]
    ir_a, ir_b = lower(a, x, "cnn ×1"), lower(b, x, "cnn ×2")
    pairs = pair_spaces(ir_a, ir_b)
    names = param_map(ir_a, ir_b, pairs)
    sa, sb = a.state_dict(), b.state_dict()
    wm = weight_match(ir_a, ir_b, pairs, sa, sb, names=names)
    aligned = align_state(ir_a, ir_b, sb, wm, names=names)
    test = list(zip(split.x_test.split(250), split.y_test.split(250)))
    loss = lambda out, y: F.cross_entropy(logits(out, E), y)   # noqa: E731
    paths = {"all layers": loss_along_lambda(a, sa, aligned, test, loss,
                                             repair=lambda m: repair(m, data, progress=False)),
             "conv3 + fc only": loss_along_lambda(a, sa, aligned, test, loss, layers=["conv3", "bn3", "fc"],
                                                  repair=lambda m: repair(m, data, progress=False))}
    plot_paths(paths, path, title="MAL zero-padded permutation: cnn ×1 + cnn ×2")
    path.with_suffix(".json").write_text(json.dumps(
        {k: {"lambdas": list(map(float, p.lambdas)), "losses": list(map(float, p.losses)),
             "barrier": float(p.barrier)} for k, p in paths.items()}, indent=2))


def _mean(runs: list[dict]) -> dict[str, dict]:
    return {row: {k: statistics.mean(r[row][k] for r in runs) for k in runs[0][row]} for row in runs[0]}


def table(results: dict[str, dict]) -> str:
    lines = ["| model | joint | task A | task B | avg |", "|---|---|---|---|---|"]
    for row, m in results.items():
        lines.append(f"| {row} | {m['joint']:.3f} | {m['task_a']:.3f} | {m['task_b']:.3f} | {m['avg']:.3f} |")
    return "\n".join(lines)


def run(pairs: int = 3, epochs: int = 3, calib: int = 512, out: Path | None = None,
        parts: tuple[str, ...] = ("depth", "width")) -> dict[str, dict]:
    split = load_mnist5k()
    res = {}
    if "depth" in parts:
        res["depth"] = _mean([depth_pair(split, s, epochs=epochs, calib=calib) for s in range(pairs)])
    if "width" in parts:
        plot = out / "mal_lambda.png" if out is not None else None
        res["width"] = _mean([width_pair(split, s, epochs=epochs, calib=calib, plot=plot if s == 0 else None)
                              for s in range(pairs)])
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--parts", default="depth,width")
    p.add_argument("--out", type=Path, default=Path("results/hetero"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    res = run(args.pairs, args.epochs, args.calib, args.out, tuple(args.parts.split(",")))
    for part, rows in res.items():
        md = table(rows)
        print(f"\n{part}\n{md}")
        (args.out / f"{part}.md").write_text(md + "\n")
    (args.out / "results.json").write_text(json.dumps({"config": vars(args) | {"out": str(args.out)},
                                                       "results": res}, indent=2))


if __name__ == "__main__":
    main()
