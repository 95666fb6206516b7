"""Small shared containers used across layers (no torch.nn logic here)."""
from __future__ import annotations

from typing import NamedTuple

import torch


class TaskBatch(NamedTuple):
    """A meta-batch of M few-shot tasks with identical shapes, stacked.

    Attributes:
        x_support: (M, N*K, C, H, W) float (or (M, n, d) for regression).
        y_support: (M, N*K) int64 class labels in [0, N) (or (M, n) float targets).
        x_query: (M, N*Q, C, H, W).
        y_query: (M, N*Q).
    """

    x_support: torch.Tensor
    y_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor

    @property
    def num_tasks(self) -> int:
        return self.x_support.shape[0]

    def to(self, device=None, dtype=None) -> "TaskBatch":
        """Moves every tensor; dtype applies to the float inputs only."""
        def mv(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)
        return TaskBatch(*(mv(t) for t in self))

    def shard(self, rank: int, world: int) -> "TaskBatch":
        """The tasks of this rank when the meta-batch is split over `world` processes."""
        m = self.num_tasks
        if m % world != 0:
            raise ValueError(f"meta-batch of {m} tasks does not split evenly over {world} ranks")
        per = m // world
        return TaskBatch(*(t[rank * per:(rank + 1) * per] for t in self))
