"""An index larger than the query's memory budget: scanned from its shard files in passes.

The scan reads every stored row (:mod:`tracin_index.search.scan`). An index whose stored arrays would
take more than a quarter of the query process's memory budget (:func:`plan_passes`) is not held: each
query call reads it range by range from the shard files (the operating system's file cache makes the
rereads cheap where memory allows), as a cluster's search shards hold it (:mod:`tracin_index.search.shards`):
each range is loaded, scanned for every test triple of the pass, and dropped; what stays is each test
triple's candidates (the rows its bounds cannot rule out against the range's own k-th lower bound, so no
row of the whole index's top k is lost) with their bounds and some of their stored factors. Refining
reads further candidates' factors from the files that hold them (:meth:`StreamedSearch.fetch`). The
answers are those of the index held in memory: the same candidates, rescored exactly.

A pass answers as many test triples as the budget holds the candidates of (:attr:`PassPlan.tests`), so
one read of the index serves them all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ..gradients.blocks import PerExampleGradients
from ..machine import DEFAULT_BUDGET_SHARE, HELD_SHARE, available_memory, budget_to_hold
from ..storage.layout import search_ranges
from ..storage.reader import IndexFiles
from ..words import counted
from .scan import SCAN_BATCH
from .shards import SearchShard, ShardCandidates

#: Candidates per side whose stored factors a range keeps for refining (the most promising; refining reads
#: any others from the files): the first refining round's share, where a cluster's shards send more to save
#: round trips (:data:`~tracin_index.search.shards.SHIPPED`).
STREAMED_SHIPPED = 32
#: Candidates per test triple and range that a pass's plan makes room for (far more than a trained model's
#: bounds leave; a pass with more takes more memory than planned, never a wrong answer).
CANDIDATE_ALLOWANCE = 4096


def memory_budget(max_memory: int | None = None) -> int:
    """Bytes a query process may use for the scan: ``max_memory``, else :data:`DEFAULT_BUDGET_SHARE` of the
    memory available (unbounded where the machine does not say)."""
    if max_memory is not None:
        if isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory < 1:
            raise InputError(f"the memory budget must be a positive number of bytes, got {max_memory!r}")
        return max_memory
    available = available_memory()
    return 2**62 if available is None else int(DEFAULT_BUDGET_SHARE * available)


@dataclass(frozen=True)
class PassPlan:
    """How an index is scanned under a memory budget: held (``ranges`` None), or range by range from its
    files, answering up to ``tests`` test triples per pass."""

    budget: int  # bytes
    arrays: int  # bytes of the stored arrays, all checkpoints
    ranges: list[tuple[int, int]] | None
    tests: int

    @property
    def streamed(self) -> bool:
        return self.ranges is not None

    def describe(self) -> str:
        return (f"the index's stored arrays ({self.arrays / 2**30:,.2f} GiB) take more than {HELD_SHARE:.0%} of the "
                f"memory budget ({self.budget / 2**30:,.2f} GiB): scanned from its files in {counted(len(self.ranges), 'range')} "
                f"per pass, up to {counted(self.tests, 'test triple')} per pass")  # fmt: skip


def plan_passes(files: IndexFiles, budget: int) -> PassPlan:
    """Held in memory where the stored arrays fit :data:`HELD_SHARE` of ``budget`` bytes; else ranges of
    training triples whose arrays take that share each, and as many test triples per pass as what the
    budget leaves holds the candidates of, after one range's arrays and the scan's working memory
    (:func:`pass_bytes`)."""
    arrays = files.arrays_bytes()
    if budget_to_hold(arrays) <= budget:
        return PassPlan(budget, arrays, None, 0)
    ranges = search_ranges(files.num_triples, math.ceil(arrays / (HELD_SHARE * budget)))
    fixed, per_test = pass_bytes(files, ranges)
    return PassPlan(budget, arrays, ranges, max(1, int((budget - fixed) // per_test)))


def pass_bytes(files: IndexFiles, ranges: list[tuple[int, int]], ship: int = STREAMED_SHIPPED) -> tuple[float, float]:
    """What a pass holds, in bytes: (fixed, per test triple). Fixed: the largest range's stored arrays and
    the estimates of a scan's batch over its rows (float64 value and bound per stored row and test triple,
    summed over checkpoints, each checkpoint's part and its temporaries: 48 bytes). Per test triple: per
    range, the stored factors of up to 2 x ``ship`` candidates at every checkpoint and the bounds of up
    to :data:`CANDIDATE_ALLOWANCE` candidates (row, low, high: 24 bytes, copied once while merged), and its
    gradients at every checkpoint."""
    per_triple = files.arrays_bytes() / max(1, files.num_triples)  # stored bytes per training triple, all checkpoints
    largest = max(b - a for a, b in ranges)
    fixed = largest * per_triple + SCAN_BATCH * largest * files.per_triple * 48
    # a test triple's gradient at each checkpoint (float32; both directions: twice): at most every block's sides
    gradient = 2 * 4 * sum(sum(p.sizes) * p.examples for p in files.plans) * len(files.checkpoints)
    per_test = len(ranges) * (2 * ship * per_triple + CANDIDATE_ALLOWANCE * 48) + gradient
    return fixed, per_test


class StreamedSearch:
    """:class:`~tracin_index.search.shards.ShardedSearch`'s interface (``scan``, ``fetch``) over ranges of one
    index read from its files in the querying process, one at a time."""

    def __init__(self, files: IndexFiles, plan: PassPlan, device: str, ship: int = STREAMED_SHIPPED):
        self.files, self.plan, self.device, self.ship = files, plan, device, ship
        self.ranges = plan.ranges
        self.passes = 0
        self._bases: list[dict] | None = None

    def _checkpoint_bases(self) -> list[dict]:
        """Every checkpoint's principal directions, read once (every range scans with them)."""
        if self._bases is None:
            self._bases = [self.files.bases(c) for c in range(len(self.files.checkpoints))]
        return self._bases

    def scan(self, tests: list[PerExampleGradients], modules: list[dict], k: int, normalize: bool) -> list[list[ShardCandidates]]:
        """Every range's candidates for every test triple: one pass over the index."""
        found = []
        sketches: list[dict] = [{} for _ in self.files.checkpoints]  # each query's sketch computed once per pass
        for facts in self.ranges:
            shard = SearchShard(self.files, facts, device=self.device, bases=self._checkpoint_bases(), sketches=sketches)
            found.append(shard.scan(tests, modules, k, normalize, self.ship))
            del shard  # before the next range is read: one range's arrays at a time
        self.passes += 1
        return found

    def fetch(self, facts: np.ndarray) -> list[dict[str, torch.Tensor]]:
        """Per checkpoint, the stored arrays (input sides left out) of the training triples ``facts`` (sorted),
        read from the shard files that hold them."""
        k = self.files.per_triple
        rows = (facts[:, None] * k + np.arange(k)).reshape(-1)
        return [self.files.stored_rows(c, rows) for c in range(len(self.files.checkpoints))]
