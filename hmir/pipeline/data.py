"""Calibration data: any iterable of batches (tensors or (input, target) tuples).

Example::

    >>> batches = [torch.randn(8, 3, 32, 32) for _ in range(4)]
    >>> data = Calibration(batches, name="calib")
    >>> data.example().shape
    torch.Size([2, 3, 32, 32])
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from hmir.errors import CalibrationError


def batch_input(batch, index: int = 0) -> torch.Tensor:
    """The model input of one batch: the tensor itself or the first item of a tuple/list."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise CalibrationError(f"calibration batch {index} is a {type(batch).__name__}; expected a "
                           f"tensor or an (input, target) tuple whose first item is a tensor")


class Calibration:
    """Re-iterable calibration inputs; a one-shot iterator is materialised once."""

    def __init__(self, data: Iterable, name: str = "data", max_batches: int | None = None) -> None:
        if isinstance(data, torch.Tensor):
            raise CalibrationError("calibration data is a single tensor; pass an iterable of batches, "
                                   "e.g. list(torch.split(x, 64)) or a DataLoader")
        try:
            it = iter(data)
        except TypeError:
            raise CalibrationError(f"calibration data of type {type(data).__name__} is not iterable; "
                                   f"pass a list of batches or a DataLoader") from None
        self.data = list(it) if it is data else data
        self.max_batches = max_batches
        first = next(iter(self), None)
        if first is None:
            raise CalibrationError("calibration data is empty: give at least one batch of inputs")
        self.first = first
        if first.dim() == 0 or first.shape[0] == 0:
            raise CalibrationError(f"calibration batch 0 has shape {tuple(first.shape)}; expected a "
                                   f"batch dimension with at least one example")

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i, batch in enumerate(self.data):
            if self.max_batches is not None and i >= self.max_batches:
                return
            yield batch_input(batch, i)

    def __len__(self) -> int:
        n = len(self.data) if hasattr(self.data, "__len__") else 0
        return min(n, self.max_batches) if self.max_batches is not None else n

    def example(self, rows: int = 2) -> torch.Tensor:
        """A small batch (``rows`` examples where available) for tracing and export."""
        return self.first[:rows]
