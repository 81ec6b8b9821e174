"""The demo: merge two CNNs trained on disjoint halves of real MNIST digits, no training.

Protocol (design.md): split the 10 classes into two tasks of 5; train model A on task A
and model B on task B against one fixed class-embedding matrix; merge A and B with each
method; score every model on all 10 classes (joint) and within each task.

Run:  python examples/demo.py            (about a minute on 2 CPU cores)
      python examples/demo.py --pairs 1 --epochs 2 --width 1    (CI-sized)
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path

import torch

from hmir import compile_merge
from hmir.harness import zoo
from hmir.harness.mnist import (calibration_batches, class_embeddings, evaluate, load_mnist5k, task_split,
                        train_embedding_model)

EMB_DIM = 32
ROWS = ("model A", "model B", "avg", "permute", "zip")


def run_pair(split, seed: int, *, epochs: int, width: int, calib: int) -> dict[str, dict]:
    """Train one pair on disjoint tasks, merge it three ways, evaluate all five models."""
    task_a, task_b = task_split(seed)
    E = class_embeddings(EMB_DIM, seed=0)
    models = []
    for k, task in enumerate((task_a, task_b)):
        torch.manual_seed(100 * seed + k)
        m = zoo.mnist_cnn(width=width, num_outputs=EMB_DIM)
        models.append(train_embedding_model(m, split, task, E, epochs=epochs, seed=100 * seed + k))
    data = calibration_batches(split, n=calib, seed=seed)
    out = {"model A": evaluate(models[0], split, E, task_a, task_b),
           "model B": evaluate(models[1], split, E, task_a, task_b)}
    for method in ("avg", "permute", "zip"):
        merged = compile_merge(models[0], models[1], data, method=method, progress=False).module
        out[method] = evaluate(merged, split, E, task_a, task_b)
    return out


def run(pairs: int = 3, epochs: int = 5, width: int = 2, calib: int = 512) -> dict[str, dict]:
    """Mean metrics over ``pairs`` task splits, per row."""
    split = load_mnist5k()
    runs = [run_pair(split, s, epochs=epochs, width=width, calib=calib) for s in range(pairs)]
    return {row: {k: statistics.mean(r[row][k] for r in runs) for k in runs[0][row]} for row in ROWS}


def table(results: dict[str, dict]) -> str:
    lines = ["| model | joint | task A | task B | avg |", "|---|---|---|---|---|"]
    for row, m in results.items():
        lines.append(f"| {row} | {m['joint']:.3f} | {m['task_a']:.3f} | {m['task_b']:.3f} | {m['avg']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--width", type=int, default=2)
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--out", type=Path, default=Path("results/demo"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = run(args.pairs, args.epochs, args.width, args.calib)
    md = table(results)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(md + "\n")
    (args.out / "results.json").write_text(json.dumps({"config": vars(args) | {"out": str(args.out)},
                                                       "results": results}, indent=2))
    print(f"written to {args.out}/")


if __name__ == "__main__":
    main()
