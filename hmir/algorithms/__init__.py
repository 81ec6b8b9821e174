"""Layer 3, the algorithms: depth alignment DPs (:mod:`~hmir.algorithms.alignment`), linear CKA,
matchers (avg / permute / zip, :mod:`~hmir.algorithms.matching`, :mod:`~hmir.algorithms.zipping`),
the weight tie-break, MuDSC dual-space similarity, rectangular group alignment and λ paths.
They work on tensors and IR types; they never run a pass or touch a user's model.

Example::

    >>> import torch
    >>> from hmir.algorithms.matching import match_permute
    >>> match_permute(torch.eye(4), 2, 2).r
    2
"""
