"""An index larger than one machine's memory: search shards held by Dask workers.

A query's scan reads every stored row (:mod:`tracin_index.search.scan`); at 20M training triples and 10
checkpoints that is hundreds of GB, more than one machine holds. ``build --index-shards S`` records
S ranges of training triples; ``GradientIndex.open(path, dask=client)`` (``query --dask-scheduler``)
loads each range's stored factors into one worker's memory (:class:`SearchShard`, a future that
stays where it was computed), and a query goes out to every shard in one round trip for all its
test triples. A shard returns, per test triple, its *candidates*: the rows its bounds cannot rule
out against its own k-th lower bound (never higher than the whole index's, so no row the whole
index would keep is lost), with their bounds, their stored factors for refining, and the counts
of its other rows' signs. The building process merges them and refines and rescores exactly, as a
single index does: the same candidates, the same rows rescored, the same results.
"""

from __future__ import annotations

import dataclasses
import pickle
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..gradients.blocks import PerExampleGradients, inverse_norms
from ..storage.arrays import FactorArrays
from ..storage.plans import is_input_side
from ..storage.reader import IndexFiles
from .scan import SCAN_BATCH, add_weighted, checkpoint_estimates, checkpoint_weight
from .settle import candidates

#: Candidates per side whose stored factors a shard sends with its answer (the most promising: highest
#: upper bounds, lowest lower bounds); a query that refines further fetches the others' when needed.
SHIPPED = 256


@dataclass
class ShardCandidates:
    """What a shard sends back for one test triple (rows are training triples, global)."""

    rows: np.ndarray  # candidate triples, sorted
    low: np.ndarray  # their bounds from the scan
    high: np.ndarray
    shipped: np.ndarray  # the candidates whose stored factors come along, sorted
    stored: list[dict[str, np.ndarray]]  # per checkpoint: their per-row stored arrays (example rows; numpy arrays pickle faster than tensors)
    positive: int  # over all of the shard's triples, from the scan: estimates > 0, < 0, signs left open
    negative: int
    open_signs: int


class CandidateStore:
    """The stored factors of a sharded query's candidates on the querying side: those the shards sent,
    and more fetched from the shards that hold them when refining reaches them."""

    def __init__(self, facts: np.ndarray, stores: list[dict[str, torch.Tensor]], per_fact: int, fetch, device):
        self.facts, self.stores, self.per_fact, self.fetch, self.device = facts, stores, per_fact, fetch, device
        self.fetched = 0

    def rows(self, c: int, rows: torch.Tensor) -> tuple[FactorArrays, torch.Tensor]:
        """Checkpoint c's stored factors and the places of the stored ``rows`` (examples) in them."""
        k = self.per_fact
        wanted = np.unique(rows.numpy() // k)
        missing = np.setdiff1d(wanted, self.facts)
        if len(missing):
            more = self.fetch(missing)
            facts = np.concatenate([self.facts, missing])
            order = np.argsort(facts, kind="stable")
            examples = torch.as_tensor((order[:, None] * k + np.arange(k)).reshape(-1), dtype=torch.long)
            self.stores = [{key: torch.cat([old[key], new[key]]).index_select(0, examples) for key in old}
                           for old, new in zip(self.stores, more)]  # fmt: skip
            self.facts = facts[order]
            self.fetched += len(missing)
        local = np.searchsorted(self.facts, rows.numpy() // k) * k + rows.numpy() % k
        stored = FactorArrays(self.stores[c], {}, {}, len(self.facts) * k).to(self.device)
        return stored, torch.as_tensor(local, dtype=torch.long)


class SearchShard:
    """One range of training triples' stored factors at every checkpoint, in a worker's memory (or, for an
    index scanned in passes, :mod:`tracin_index.search.passes`, in the querying process for one pass), on
    ``device``."""

    def __init__(self, files: IndexFiles, facts: tuple[int, int], pack_after: int | None = None, device: str = "cpu",
                 bases: list[dict] | None = None, sketches: list[dict] | None = None):  # fmt: skip
        """``bases``, ``sketches``: per checkpoint, its principal directions and a memo of the queries'
        sketches, where several ranges of one index share them (:class:`~tracin_index.search.passes.StreamedSearch`)."""
        self.plans = files.plans
        self.per_fact = files.per_triple
        self.facts = facts
        self.device = torch.device(device)
        count = len(files.checkpoints)
        self.stored = [files.factor_arrays(c, facts, None if bases is None else bases[c]).to(device) for c in range(count)]
        for c, stored in enumerate(self.stored):
            stored.sketches = None if sketches is None else sketches[c]
        for stored in self.stored:  # packed for fbgemm like the whole index's (GradientIndex.open's ``pack``)
            stored.pack_after = pack_after
        self.learning_rates = [float(c.learning_rate) for c in files.checkpoints]
        self.inverse_norms = [inverse_norms(torch.from_numpy(n)).to(device) for n in files.squared_norms(facts)]

    def scan(self, tests: list[PerExampleGradients], modules: list[dict], k: int, normalize: bool,
             ship: int = SHIPPED) -> list[ShardCandidates]:  # fmt: skip
        """Candidates of every test triple (``tests``: per checkpoint, the test triples' gradients), with
        the stored factors of the ``ship`` most promising each way."""
        out = []
        for value, error in self._estimates(tests, modules, normalize):
            low, high = (value - error).cpu(), (value + error).cpu()
            pro, opp = candidates(low, high, k)
            local = np.union1d(pro, opp)
            estimate = ((low + high) / 2).numpy()  # as the single index counts signs
            if len(pro) > ship:
                pro = pro[torch.topk(high[torch.as_tensor(pro)], ship).indices.numpy()]
            if len(opp) > ship:
                opp = opp[torch.topk(-low[torch.as_tensor(opp)], ship).indices.numpy()]
            shipped = np.union1d(pro, opp)
            out.append(ShardCandidates(local + self.facts[0], low.numpy()[local], high.numpy()[local],
                                       shipped + self.facts[0], self.factors(shipped),
                                       int((estimate > 0).sum()), int((estimate < 0).sum()),
                                       int(((low < 0) & (high > 0)).sum())))  # fmt: skip
        return out

    def _estimates(self, tests: list[PerExampleGradients], modules: list[dict], normalize: bool):
        """Each test triple's estimates and bounds over the shard's triples, the test triples scanned
        SCAN_BATCH at a time (:func:`~tracin_index.search.scan.checkpoint_estimates`)."""
        n = self.facts[1] - self.facts[0]
        for start in range(0, len(tests[0]), SCAN_BATCH):
            batch = range(start, min(len(tests[0]), start + SCAN_BATCH))
            sums = [(torch.zeros(n, dtype=torch.float64, device=self.device),
                     torch.zeros(n, dtype=torch.float64, device=self.device)) for _ in batch]  # fmt: skip
            for c, stored in enumerate(self.stored):
                queries = [tests[c].index(slice(t, t + 1)) for t in batch]
                for (value, error), query, part in zip(sums, queries, checkpoint_estimates(self.plans, stored, queries, modules[c])):
                    weight = checkpoint_weight(self.learning_rates[c], query, self.inverse_norms[c] if normalize else None)
                    add_weighted(value, error, part, weight, self.per_fact)
            yield from sums

    def factors(self, local: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Per checkpoint, the per-row stored arrays (refining needs them) of the shard's triples ``local``
        (numpy: they travel, and a torch tensor pickles ten times slower)."""
        examples = torch.as_tensor((local[:, None] * self.per_fact + np.arange(self.per_fact)).reshape(-1), dtype=torch.long)
        examples = examples.to(self.device)
        return [{key: v.index_select(0, examples).cpu().numpy() for key, v in s.arrays.items() if not is_input_side(key, self.plans)}
                for s in self.stored]  # fmt: skip


def _on_cpu(grads: PerExampleGradients) -> PerExampleGradients:
    """The gradients with every tensor on the CPU (what travels to the workers)."""
    blocks = {}
    for name, block in grads.blocks.items():
        values = {f.name: getattr(block, f.name) for f in dataclasses.fields(block)}
        blocks[name] = type(block)(**{k: v.cpu() if torch.is_tensor(v) else v for k, v in values.items()})
    return PerExampleGradients(blocks, grads.parameter_names)


def _load(directory: str, facts: tuple[int, int], pack_after: int | None) -> SearchShard:
    return SearchShard(IndexFiles.open(directory), facts, pack_after)


def _scan(shard: SearchShard, query: bytes, k: int, normalize: bool, ship: int, threads: int | None) -> list[ShardCandidates]:
    if threads:  # as the build's tasks: workers sharing a machine must not oversubscribe it
        torch.set_num_threads(threads)
    tests, modules = pickle.loads(query)
    return shard.scan(tests, modules, k, normalize, ship)


def _factors(shard: SearchShard, facts: np.ndarray) -> list[dict[str, np.ndarray]]:
    return shard.factors(facts - shard.facts[0])


class ShardedSearch:
    """The search shards of one index, placed on a Dask cluster's workers (one future each)."""

    def __init__(self, client, directory: Path, ranges: list[tuple[int, int]], ship: int = SHIPPED,
                 pack_after: int | None = None, threads: int | None = 1):  # fmt: skip
        """``threads``: torch threads per scan task (1: Dask's usual one worker process per core; None:
        torch's default, all of the worker machine's cores)."""
        import distributed

        self.client, self.ranges, self.ship, self.threads = client, ranges, ship, threads
        tag = uuid.uuid4().hex[:8]
        self.shards = [client.submit(_load, str(Path(directory).resolve()), r, pack_after, key=f"tracin-search-{i}-{tag}",
                                     pure=False)
                       for i, r in enumerate(ranges)]  # fmt: skip
        distributed.wait(self.shards)
        for future in self.shards:
            if future.status == "error":
                raise InputError(f"{directory}: a search shard could not be loaded on the cluster: {future.exception()}")

    def scan(self, tests: list[PerExampleGradients], modules: list[dict], k: int, normalize: bool) -> list[list[ShardCandidates]]:
        """Every shard's candidates for every test triple: one task per shard (on the worker that holds it)."""
        # pickled once here (Dask would pickle the arguments again for every task); bytes travel as they are, and the client trusts its own workers with pickles anyway
        query = pickle.dumps(([_on_cpu(g) for g in tests], modules), protocol=pickle.HIGHEST_PROTOCOL)
        futures = [self.client.submit(_scan, shard, query, k, normalize, self.ship, self.threads, pure=False)
                   for shard in self.shards]  # fmt: skip
        return self.client.gather(futures)

    def fetch(self, facts: np.ndarray) -> list[dict[str, torch.Tensor]]:
        """Per checkpoint, the stored arrays of the training triples ``facts`` (sorted), from their shards."""
        parts = []
        for shard, (a, b) in zip(self.shards, self.ranges):
            mine = facts[(facts >= a) & (facts < b)]
            if len(mine):
                parts.append(self.client.submit(_factors, shard, mine, pure=False))
        got = self.client.gather(parts)
        return [{key: torch.from_numpy(np.concatenate([g[c][key] for g in got])) for key in got[0][c]} for c in range(len(got[0]))]

    def close(self) -> None:
        self.client.cancel(self.shards)
