"""Iteration-based batches that are a pure function of (seed, iteration).

The same global batch is drawn at iteration t whether the run has 1 or R ranks (rank r takes
its contiguous share of it) and whether or not it was resumed: the permutation of epoch e comes
from a generator seeded with (seed, e), and every sample's augmentation randomness from a seed of
its own (seed, epoch, index). Resuming needs nothing but the iteration number.
"""
from __future__ import annotations

from typing import Iterator, List, Tuple

import torch
from torch.utils.data import Dataset, Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729 + 17) % (2 ** 63)


class GlobalBatchSampler(Sampler):
    """Yields this rank's share of global batch t, for t = start, start + 1, ... (endless).

    Each item is (dataset index, augmentation seed). Incomplete trailing batches of an epoch are
    dropped (as drop_last=True), so every iteration sees exactly `global_batch` images."""

    def __init__(self, n: int, global_batch: int, seed: int, start_iteration: int = 0, rank: int = 0,
                 world_size: int = 1):
        if global_batch > n:
            raise ValueError(f"global batch {global_batch} is larger than the dataset ({n} images)")
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by the {world_size} ranks")
        self.n, self.batch, self.seed, self.start = n, global_batch, seed, start_iteration
        self.rank, self.world = rank, world_size
        self.per_epoch = n // global_batch
        self._perm = (-1, None)  # (epoch, permutation) of the epoch being drawn

    def permutation(self, epoch: int) -> List[int]:
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 9_973 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g).tolist())
        return self._perm[1]

    def batch_at(self, iteration: int) -> List[Tuple[int, int]]:
        epoch, k = divmod(iteration, self.per_epoch)
        perm = self.permutation(epoch)[k * self.batch:(k + 1) * self.batch]
        share = self.batch // self.world
        mine = perm[self.rank * share:(self.rank + 1) * share]
        return [(i, sample_seed(self.seed, epoch, i)) for i in mine]

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        t = self.start
        while True:
            yield self.batch_at(t)
            t += 1


class SeededSamples(Dataset):
    """dataset[(index, seed)]: the item with its random augmentation drawn from `seed`, leaving
    the process's own random state as it was."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class FixedAugmentation(Dataset):
    """dataset[i] with a random augmentation that is the same on every call: drawn from a seed of
    (seed, i) only (e.g. the augmented images the public code's attention measures)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.samples, self.seed = SeededSamples(dataset), seed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[(index, sample_seed(self.seed, -1, index))]
