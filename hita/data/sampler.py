"""Step-indexed, rank-aware batches: the batch of step ``s`` is a pure function of (seed, s).

Epoch ``e`` visits a permutation drawn from (seed, e); step ``s`` takes global batch ``s mod
steps_per_epoch`` of it (the incomplete tail of each epoch is dropped) and rank ``r`` of ``w`` reads
the ``r``-th of ``w`` equal slices. Hence a resumed run reads exactly the batches an uninterrupted run
would, and ``w`` processes together read exactly the single-process global batch.
"""
from __future__ import annotations

from typing import Iterator

import torch

from hita.data.dataset import DataError


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields, for steps ``start_step, start_step + 1, ...``, this rank's list of ``(index, epoch)`` keys."""

    def __init__(self, n: int, global_batch: int, seed: int = 0, rank: int = 0, world: int = 1,
                 start_step: int = 0, stop_step: int | None = None):
        if global_batch % world:
            raise DataError(f"global batch {global_batch} is not divisible by the {world} processes; "
                            "pick a batch size that is a multiple of the process count")
        if n < global_batch:
            raise DataError(f"the data set has {n} images, fewer than the global batch {global_batch}; "
                            "lower --batch-size or add images")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.rank, self.world = rank, world
        self.start_step, self.stop_step = start_step, stop_step
        self.steps_per_epoch = n // global_batch
        self.local_batch = global_batch // world

    def batch(self, step: int) -> list[tuple[int, int]]:
        epoch, i = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g)
        lo = i * self.global_batch + self.rank * self.local_batch
        return [(int(j), epoch) for j in perm[lo:lo + self.local_batch]]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while self.stop_step is None or step < self.stop_step:
            yield self.batch(step)
            step += 1

    def __len__(self) -> int:
        if self.stop_step is None:
            raise TypeError("an open-ended StepBatchSampler has no length")
        return max(0, self.stop_step - self.start_step)


def make_loader(view: torch.utils.data.Dataset, sampler: StepBatchSampler, workers: int = 0,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over ``sampler``'s batches that never draws from the global torch RNG."""
    return torch.utils.data.DataLoader(
        view, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
        persistent_workers=False, generator=torch.Generator().manual_seed(0),
    )
