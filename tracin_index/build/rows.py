"""The stored rows of a build: the training examples, their (head, relation) groups, and the seeded
sample of rows that plans and principal directions are computed on.

A training triple is one stored row, or two adjacent rows, (h, 2r, t) and (t, 2r + 1, h), for a
model trained with inverse triples (:mod:`tracin_index.kg.directions`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..kg.directions import training_examples
from ..storage.sketch import stable_seed

#: Rows whose factors define a checkpoint's principal directions: at least this many, and
#: SAMPLE_PER_DIRECTION per direction (fewer for very wide sides) ...
SKETCH_SAMPLE = 1024
SAMPLE_PER_DIRECTION = 8
#: ... and at most this many bytes of sampled factors per side.
SKETCH_SAMPLE_BYTES = 256 * 2**20


def group_rows(hrt: np.ndarray, num_relations: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's (head, relation) group, numbered in order of first appearance, and each group's first row.

    Numbered that way, the groups first seen in a range of rows are a range of group ids, so each
    shard file stores the input sides of a contiguous block of groups.
    """
    keys = hrt[:, 0].astype(np.int64) * max(1, num_relations) + hrt[:, 1]
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    renumber = np.empty_like(order)
    renumber[order] = np.arange(len(order))
    return renumber[inverse.reshape(-1)], first[order]


class BuildRows:
    """The stored rows of ``hrt`` (training triples, (N, 3) ids) for a model with ``per_fact`` examples per
    triple and ``num_relations`` relations (its own ids), and the sample drawn with ``seed``."""

    def __init__(self, hrt: torch.Tensor, per_fact: int, num_relations: int, seed: int):
        self.per_fact = per_fact
        self.num_relations = num_relations
        self.seed = seed
        self.examples = training_examples(hrt, per_fact == 2)
        self.num_triples = int(hrt.shape[0])
        self.num_rows = int(self.examples.shape[0])
        rng = np.random.default_rng(stable_seed(seed, "sample"))
        #: the seeded sample of rows, sorted: plans and principal directions are computed on (a prefix of) it
        self.sample = np.sort(rng.choice(self.num_rows, size=min(self.num_rows, SKETCH_SAMPLE), replace=False))
        self._pairs: tuple[np.ndarray, np.ndarray] | None = None
        self._more: dict[int, np.ndarray] = {}

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """:func:`group_rows` of the stored rows, computed once (the plan's size check and the build use it)."""
        if self._pairs is None:
            self._pairs = group_rows(self.examples.numpy(), self.num_relations)
        return self._pairs

    def sample_for(self, dim: int, wide: int) -> np.ndarray:
        """The sampled rows for a side of ``dim`` directions and ``wide`` numbers: :attr:`sample`, with more
        rows (seeded, drawn from the rest; drawn once per size) for many directions, fewer for very wide sides."""
        size = min(self.num_rows, max(SKETCH_SAMPLE, SAMPLE_PER_DIRECTION * dim), max(1, SKETCH_SAMPLE_BYTES // (4 * wide)))
        if size <= len(self.sample):
            return self.sample[:size]
        if size not in self._more:
            rest = np.setdiff1d(np.arange(self.num_rows), self.sample, assume_unique=True)
            rng = np.random.default_rng(stable_seed(self.seed, "sample", "more"))
            more = rng.choice(rest, size=size - len(self.sample), replace=False)
            self._more[size] = np.sort(np.concatenate([self.sample, more]))
        return self._more[size]
