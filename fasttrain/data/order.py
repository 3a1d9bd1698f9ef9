"""The order in which a split is visited: one definition for every loader backend.

Training order for epoch e is a permutation drawn from a generator seeded by (seed, e) alone, so
it does not depend on what ran before: a resumed run visits its next epoch exactly as the
uninterrupted run would, and can start in the middle of it. Each epoch keeps whole batches only;
with shards, every shard gets an equal, disjoint part. Evaluation keeps data-set order and
every sample. Files found undecodable during a run are excluded from later epochs.
"""

from __future__ import annotations

import math

import numpy as np


class EpochOrder:
    def __init__(self, n: int, batch_size: int, train: bool, seed: int, shard_id: int = 0, num_shards: int = 1,
                 start_epoch: int = 1, start_step: int = 0):
        self.n, self.batch_size, self.train, self.seed = n, batch_size, train, seed
        self.shard_id, self.num_shards = shard_id, num_shards
        self.epoch, self.start_step = start_epoch - 1, start_step  # the next call to next_epoch() gives start_epoch
        self.excluded: set[int] = set()

    def steps(self) -> int:
        """Batches in a full epoch of this shard."""
        n = self.n - len(self.excluded)
        if self.train:
            return n // self.num_shards // self.batch_size
        return math.ceil(math.ceil(n / self.num_shards) / self.batch_size)

    def indices(self, epoch: int) -> np.ndarray:
        """This shard's sample indices for an epoch, in visiting order (whole batches when training)."""
        keep = np.ones(self.n, dtype=bool)
        keep[list(self.excluded)] = False
        if not self.train:
            return np.array_split(np.flatnonzero(keep), self.num_shards)[self.shard_id]
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        order = order[keep[order]]
        per = len(order) // self.num_shards // self.batch_size * self.batch_size
        return order[self.shard_id * per:(self.shard_id + 1) * per]

    def next_epoch(self) -> np.ndarray:
        """Advance to the next epoch; the first one starts at start_step (a resumed run)."""
        self.epoch += 1
        order = self.indices(self.epoch)
        skip, self.start_step = self.start_step * self.batch_size, 0
        return order[skip:]
