r"""The query engine: exact TracIn proponents and opponents of test triples, from an opened index.

A query computes the test triple's gradient at every checkpoint, scans every training triple's stored
factors for an estimate of its influence and a certain bound on the estimate's error
(:mod:`tracin_index.search.scan`), and settles the top k from the bounds, refining and rescoring
exactly only the candidates the bounds cannot rule out (:mod:`tracin_index.search.settle`). On a
cluster the scan runs in search shards (:mod:`tracin_index.search.shards`); refining and rescoring
stay here, so the answers are the same.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import InputError, TracInWarning
from ..gradients.blocks import PerExampleGradients, cosine, inverse_norms
from ..gradients.computer import CheckpointGradients, vanished, vanishing_message
from ..gradients.inputs import LinearInputs
from ..kg.directions import DEFAULT_DIRECTION, check_direction, training_examples
from ..machine import available_memory
from ..results import InfluenceResult, Triple
from ..storage.arrays import FactorArrays
from ..storage.plans import batch_norm_scale
from ..storage.reader import IndexFiles
from .passes import PassPlan, StreamedSearch, memory_budget, plan_passes
from .refine import refinable, refined_estimate
from .scan import SCAN_BATCH, Estimate, add_weighted, checkpoint_estimates, checkpoint_weight
from .settle import Settled, best_estimates, counted_result, settling
from .shards import CandidateStore, ShardedSearch

#: Test triples after which an opened index packs its large stored arrays for fbgemm by default (each
#: checkpoint's when it has been scanned this often): packing costs seconds that a one-off query never
#: earns back (``benchmarks/scale.py`` measures both). ``GradientIndex.open(..., pack=True)`` packs at once.
PACK_AFTER_SCANS = 300


@dataclass
class QueryStats:
    """What the last query did, per test triple: rows rescored exactly (``rescored``), rows whose bounds
    were refined first (``refined``), in how many rounds of either (``rounds``)."""

    rescored: list[int]
    rounds: list[int]
    refined: list[int] = field(default_factory=list)
    #: a sharded query's: candidates whose stored factors were fetched from their shards while refining
    fetched: list[int] = field(default_factory=list)


def one_at_a_time(method):
    """A method of :class:`QueryEngine` that runs in one thread at a time: calls share one model (a gradient
    computation hooks its modules and sets which parameters require gradients) and the engine's caches."""

    @functools.wraps(method)
    def serialized(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return serialized


class QueryEngine:
    """Answers queries on one opened index (``files``). ``load_gradients``: loads the model at every
    checkpoint when a query first needs it. ``pack_after``: checkpoint scans after which the stored arrays
    are packed for fbgemm (None: never). ``search``: search shards on a Dask cluster, where the index is
    held there. Calls from several threads are answered one at a time (:func:`one_at_a_time`)."""

    def __init__(self, files: IndexFiles, load_gradients: Callable[[], CheckpointGradients], device: str, *,
                 pack_after: int | None = PACK_AFTER_SCANS, search: ShardedSearch | None = None,
                 max_memory: int | None = None):  # fmt: skip
        self.files, self.device, self.pack_after, self.search = files, device, pack_after, search
        #: how the scan fits the memory budget (``max_memory`` bytes, by default a share of the available
        #: memory): held, or read from the files in passes (:mod:`tracin_index.search.passes`)
        self.passes: PassPlan | None = None
        if search is None:
            plan = plan_passes(files, memory_budget(max_memory))
            if plan.streamed:
                self.passes, self.search = plan, StreamedSearch(files, plan, device)
        self._load_gradients = load_gradients
        self._gradients: CheckpointGradients | None = None
        self._arrays: dict[int, FactorArrays] = {}
        self._inverse_norms: dict[int, torch.Tensor] = {}  # per checkpoint, for normalized queries
        self.last_query: QueryStats | None = None
        self._lock = threading.RLock()  # re-entrant: a query calls the other methods

    @property
    @one_at_a_time
    def gradients(self) -> CheckpointGradients:
        if self._gradients is None:
            self._gradients = self._load_gradients()
        return self._gradients

    @property
    def num_checkpoints(self) -> int:
        return len(self.files.checkpoints)

    @one_at_a_time
    def factor_arrays(self, c: int) -> FactorArrays:
        """Checkpoint c's stored arrays of every training triple, read once (shards concatenated in row order)."""
        if c not in self._arrays:
            self._arrays[c] = self.files.factor_arrays(c).to(self.device)
            self._arrays[c].pack_after = self.pack_after
        return self._arrays[c]

    @one_at_a_time
    def test_gradients(self, hrt: torch.Tensor, direction: str = DEFAULT_DIRECTION) -> list[PerExampleGradients]:
        """The test triples' gradients at every checkpoint, of the prediction ``direction`` ("tail",
        "head" or "both"; see :mod:`tracin_index.kg.directions`)."""
        hrt = torch.as_tensor(hrt, dtype=torch.long).view(-1, 3).to(self.device)
        return [self.gradients.computer(c).compute(hrt, direction) for c in range(self.num_checkpoints)]

    def _inverse_norms_at(self, c: int) -> torch.Tensor:
        if c not in self._inverse_norms:
            self._inverse_norms[c] = inverse_norms(torch.from_numpy(self.files.squared_norms()[c])).to(self.device)
        return self._inverse_norms[c]

    @one_at_a_time
    def estimates(self, test: list[PerExampleGradients], t: int = 0, normalize: bool = False, rows: np.ndarray | None = None,
                  store: CandidateStore | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Estimated influence of every training triple on test triple ``t`` and the bound on its error,
        (N,) float64 each (a triple's stored rows, its examples, summed). ``normalize``: of the cosine
        form. ``rows``: only these training triples, refined (their Linear inputs recomputed,
        :func:`~tracin_index.search.refine.refined_estimate`), from ``store`` where a sharded query holds
        their factors."""
        if rows is None:  # the scan of every stored row: a batch of one
            return self.batch_estimates(test, [t], normalize)[0]
        files = self.files
        if not refinable(files.plans):
            raise ValueError("this index's blocks cannot be refined (no sketched Linear input side)")
        value = torch.zeros(len(rows), dtype=torch.float64, device=self.device)
        error = torch.zeros(len(rows), dtype=torch.float64, device=self.device)
        rows_t = torch.as_tensor(rows, dtype=torch.long)
        examples = training_examples(torch.as_tensor(files.hrt[rows], dtype=torch.long), files.inverse_triples)
        stored_rows = (rows_t[:, None] * files.per_triple + torch.arange(files.per_triple)).reshape(-1)
        for c in range(self.num_checkpoints):
            query = test[c].index(slice(t, t + 1))
            norms = self._inverse_norms_at(c)[rows_t.to(self.device)] if normalize else None
            weight = checkpoint_weight(files.checkpoints[c].learning_rate, query, norms)
            modules = self.gradients.modules(c)
            inputs = self._linear_inputs(c, examples.to(self.device))
            arrays, at = (self.factor_arrays(c), stored_rows) if store is None else store.rows(c, stored_rows)
            part = refined_estimate(files.plans, arrays, query, modules, at, inputs)
            add_weighted(value, error, part, weight, files.per_triple)
        return value.cpu(), error.cpu()

    @one_at_a_time
    def batch_estimates(self, test: list[PerExampleGradients], ts: Sequence[int], normalize: bool = False
                        ) -> list[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
        """:meth:`estimates` of every training triple on each test triple of ``ts`` (positions in ``test``), each
        checkpoint's stored arrays scanned once for all of them (:func:`~tracin_index.search.scan.checkpoint_estimates`)."""
        files = self.files
        n = files.num_triples
        out = [(torch.zeros(n, dtype=torch.float64, device=self.device), torch.zeros(n, dtype=torch.float64, device=self.device))
               for _ in ts]  # fmt: skip
        for c in range(self.num_checkpoints):
            queries = [test[c].index(slice(t, t + 1)) for t in ts]
            norms = self._inverse_norms_at(c) if normalize else None
            arrays, modules, lr = self.factor_arrays(c), self.gradients.modules(c), files.checkpoints[c].learning_rate
            if files.per_triple == 1 and not normalize:  # summed in place: one number weights the whole checkpoint
                checkpoint_estimates(files.plans, arrays, queries, modules, [Estimate(v, e) for v, e in out],
                                     [lr] * len(queries))  # fmt: skip
                continue
            parts = checkpoint_estimates(files.plans, arrays, queries, modules)
            for (value, error), query, part in zip(out, queries, parts):
                add_weighted(value, error, part, checkpoint_weight(files.checkpoints[c].learning_rate, query, norms),
                             files.per_triple)  # fmt: skip
        return [(value.cpu(), error.cpu()) for value, error in out]

    def scan_batch_size(self) -> int:
        """Test triples scanned together: up to SCAN_BATCH, as many as a quarter of the available memory holds
        the estimates of (per stored row and test triple: a checkpoint's estimate and bound, and the sums)."""
        available = available_memory()
        rows = self.files.num_triples * self.files.per_triple
        if available is None:
            return SCAN_BATCH
        return max(1, min(SCAN_BATCH, available // 4 // (40 * max(1, rows))))

    def _linear_inputs(self, c: int, examples: torch.Tensor) -> dict[str, LinearInputs]:
        """The factored blocks' Linear inputs for training ``examples`` at checkpoint c, from a forward
        pass that stops there."""
        modules = self.gradients.modules(c)
        wanted = {p.name: modules[p.name] for p in self.files.plans if p.kind == "factored"}
        return self.gradients.computer(c).linear_inputs(wanted, examples)

    @one_at_a_time
    def exact_scores(self, test: list[PerExampleGradients], rows: np.ndarray, batch_size: int = 256,
                     normalize: bool = False) -> torch.Tensor:  # fmt: skip
        """Exact TracIn of the given training rows on the test triples, (T, len(rows)) float64: their
        gradients recomputed at every checkpoint (``normalize``: the cosine form)."""
        train = torch.as_tensor(self.files.hrt[np.asarray(rows, dtype=np.int64)], dtype=torch.long).to(self.device)
        scores = torch.zeros(len(test[0]), len(train), dtype=torch.float64)
        for c in range(self.num_checkpoints):
            lr = self.files.checkpoints[c].learning_rate
            test_squared = test[c].squared_norms().double().cpu() if normalize else None
            for start in range(0, len(train), batch_size):
                g = self.gradients.computer(c).compute(train[start : start + batch_size])
                dots = test[c].dot(g).double().cpu()
                if normalize:
                    dots = cosine(dots, test_squared, g.squared_norms().double().cpu())
                scores[:, start : start + batch_size] += lr * dots
        return scores

    @one_at_a_time
    def query(self, hrt: torch.Tensor, top_k: int = 10, *, candidates: int | None = None, approximate: bool = False,
              test_indices: Sequence[int | None] | None = None, direction: str = DEFAULT_DIRECTION,
              normalize: bool = False) -> list[InfluenceResult]:  # fmt: skip
        """See :meth:`tracin_index.index.GradientIndex.query`."""
        files = self.files
        hrt = torch.as_tensor(hrt, dtype=torch.long).view(-1, 3)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise InputError(f"top-k must be a positive whole number, got {top_k!r}")
        if candidates is not None and candidates < top_k:
            raise InputError(f"--candidates {candidates} must be at least --top-k {top_k}")
        self._check_ids(hrt)
        check_direction(direction, files.inverse_triples)
        if self.passes is not None and len(hrt) > self.passes.tests:  # one pass over the files per part
            return self._in_passes(hrt, top_k, candidates=candidates, approximate=approximate,
                                   test_indices=test_indices, direction=direction, normalize=normalize)  # fmt: skip
        test = self.test_gradients(hrt, direction)
        labels = files.row_labels()
        indices = list(test_indices) if test_indices is not None else [None] * len(hrt)
        test_norms = sum(g.squared_norms().double().cpu() for g in test)
        sharded = None
        if self.search is not None:
            if approximate or candidates is not None:
                where, otherwise = ((f"scanned from its files in passes ({self.passes.describe()})", "give a larger --max-memory")
                                    if self.passes is not None else
                                    ("searched in shards on a cluster", "open it without the cluster"))  # fmt: skip
                raise InputError(f"--approximate and --candidates are not available on an index {where}; query it "
                                 f"without them (exact), or {otherwise}")  # fmt: skip
            # derived sides need their batch norm's scale only: 200 numbers travel, not the module
            modules = [{p.derived[0]: batch_norm_scale(self.gradients.modules(c)[p.derived[0]]).cpu() for p in files.plans
                        if p.derived} for c in range(self.num_checkpoints)]  # fmt: skip
            sharded = self.search.scan(test, modules, top_k, normalize)  # one round trip per shard for all test triples
        refinable_plans = refinable(files.plans)
        results, rescored, rounds_of, refined_of, fetched = [], [], [], [], []
        gone = vanished(test_norms)  # test triples whose gradients vanished: no proponents or opponents
        live = [t for t in range(len(hrt)) if not bool(gone[t])]
        scan_batch = self.scan_batch_size()
        scanned: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # the exact top k of a scanned batch settled together: their rescoring rounds share one pass
        together = candidates is None and not approximate
        settled: dict[int, tuple[torch.Tensor, torch.Tensor, Settled]] = {}
        shard_parts: dict[int, tuple[dict, CandidateStore]] = {}  # a sharded scan's sign counts and candidate factors

        def batch_from(t: int) -> list[int]:
            """Live test triple t and the next ones, a scan's batch."""
            start = bisect.bisect_left(live, t)
            return live[start : start + scan_batch]

        def estimates_of(t: int) -> tuple[torch.Tensor, torch.Tensor]:
            """Test triple t's estimates, from a batched scan of it and the next live test triples."""
            if t not in scanned:
                scanned.clear()
                batch = batch_from(t)
                scanned.update(zip(batch, self.batch_estimates(test, batch, normalize)))
            return scanned.pop(t)

        def settled_of(t: int) -> tuple[torch.Tensor, torch.Tensor, Settled]:
            """Test triple t's bounds and settled rows, from a batch scanned (or merged from the shards'
            candidates) and settled together."""
            if t not in settled:
                batch = batch_from(t)
                stores = ids = None
                if sharded is None:
                    bounds = {u: (v - e, v + e) for u, (v, e) in zip(batch, self.batch_estimates(test, batch, normalize))}
                else:  # bounds over each test triple's candidates only: the rows the shards' scans left
                    merged = {u: self._merge([per_test[u] for per_test in sharded]) for u in batch}
                    bounds = {u: (low, high) for u, (_, low, high, _, _) in merged.items()}
                    shard_parts.update({u: (base, store, rows) for u, (rows, _, _, base, store) in merged.items()})
                    stores = {u: store for u, (_, _, _, _, store) in merged.items()}
                    ids = {u: rows for u, (rows, _, _, _, _) in merged.items()}
                settled.update(self._settle_together(test, bounds, top_k, normalize, refinable_plans, stores, ids))
            return settled.pop(t)

        for t in range(len(hrt)):
            refined_of.append(0)
            triple = Triple(*labels.of(hrt[t].tolist()))
            if bool(gone[t]):
                warnings.warn(vanishing_message(f"({triple.head}, {triple.relation}, {triple.tail})", files.loss)
                              + "; it has no proponents or opponents", TracInWarning, stacklevel=3)  # fmt: skip
                results.append(InfluenceResult(indices[t], triple, (), (), 0, 0))
                rescored.append(0)
                rounds_of.append(0)
                continue
            if together:
                low, high, done = settled_of(t)
                base, store, ids = shard_parts.pop(t, (None, None, None))
                places, exact, rounds, refined_of[-1] = done.rows, done.scores, done.rounds, done.refined
                rows = places if ids is None else ids[places]  # places in the bounds -> training triples
                if store is not None:
                    fetched.append(store.fetched)
            else:
                value, error = estimates_of(t)
                low, high, base = value - error, value + error, None
                places = None
                if approximate:
                    results.append(counted_result(indices[t], triple, value.numpy(), np.arange(files.num_triples), top_k,
                                                  labels, low, high, exact_rows=None))  # fmt: skip
                    rescored.append(0)
                    rounds_of.append(0)
                    continue
                rows = places = np.union1d(*best_estimates(value, candidates))
                exact = self.exact_scores([g.index(slice(t, t + 1)) for g in test], rows, normalize=normalize)[0].numpy()
                rounds = 1
            rounds_of.append(rounds)
            results.append(counted_result(indices[t], triple, exact, rows, top_k, labels, low, high, exact_rows=places,
                                          base=base))  # fmt: skip
            rescored.append(len(rows))
        self.last_query = QueryStats(rescored, rounds_of, refined_of, fetched)
        return results

    def _in_passes(self, hrt: torch.Tensor, top_k: int, *, test_indices, **options) -> list[InfluenceResult]:
        """:meth:`query` of test triples more than a pass answers: one pass over the index's files per part."""
        size = self.passes.tests
        indices = list(test_indices) if test_indices is not None else [None] * len(hrt)
        results, stats = [], []
        for start in range(0, len(hrt), size):
            results += self.query(hrt[start : start + size], top_k, test_indices=indices[start : start + size], **options)
            stats.append(self.last_query)
        self.last_query = QueryStats(*([x for s in stats for x in getattr(s, f.name)] for f in dataclasses.fields(QueryStats)))
        return results

    def _settle_together(self, test: list[PerExampleGradients], bounds: dict[int, tuple[torch.Tensor, torch.Tensor]],
                         k: int, normalize: bool, refinable_plans: bool, stores: dict[int, CandidateStore] | None = None,
                         ids: dict[int, np.ndarray] | None = None) -> dict[int, tuple[torch.Tensor, torch.Tensor, Settled]]:  # fmt: skip
        """:func:`~tracin_index.search.settle.settling` for several test triples (positions in ``test``, with their
        scan's bounds) in lockstep: each round, the rows that the test triples ask to rescore are rescored
        once for all of them (their gradients computed once, dotted with every test gradient that asked);
        refining stays per test triple (from its ``stores`` entry where a sharded scan holds its candidates' factors).
        ``ids``: where a test triple's bounds cover only its candidates, the training triple at each place (its
        :class:`Settled` rows stay places in its bounds)."""
        steps = {u: settling(low, high, k, refinable_plans) for u, (low, high) in bounds.items()}
        requests = {u: next(step) for u, step in steps.items()}
        done: dict[int, tuple[torch.Tensor, torch.Tensor, Settled]] = {}

        def triples(u: int, places: np.ndarray) -> np.ndarray:
            return places if ids is None else ids[u][places]

        while requests:
            answers: dict[int, object] = {}
            rescoring = [u for u, (kind, _) in requests.items() if kind == "rescore"]
            if rescoring:
                asked = {u: triples(u, requests[u][1]) for u in rescoring}
                union = np.unique(np.concatenate(list(asked.values())))
                asking = torch.as_tensor(rescoring, dtype=torch.long)
                scores = self.exact_scores([g.index(asking) for g in test], union, normalize=normalize)
                for i, u in enumerate(rescoring):
                    answers[u] = scores[i, torch.as_tensor(np.searchsorted(union, asked[u]))]
            for u, (kind, places) in requests.items():
                if kind == "refine":
                    rows = triples(u, places)
                    store = None if stores is None else stores[u]
                    answers[u] = self.estimates([g.index(slice(u, u + 1)) for g in test], 0, normalize, rows=rows, store=store)
            following = {}
            for u, answer in answers.items():
                try:
                    following[u] = steps[u].send(answer)
                except StopIteration as stop:
                    done[u] = (*bounds[u], stop.value)
            requests = following
        return done

    def _merge(self, parts) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, dict, CandidateStore]:
        """One test triple's candidates from every search shard: the candidate training triples (sorted) and
        their bounds, the candidates' stored factors for refining, and the shards' sign counts (``base``, for
        :func:`~tracin_index.search.settle.counted_result`, over places in the candidates).

        Settling over the candidates alone finds what it would over every training triple with 0 and 0 where
        a shard ruled a row out (such a row can enter neither list, and k-th bounds are taken against 0 as
        well): memory per test triple is set by its candidates, not by the index."""
        rows = np.concatenate([p.rows for p in parts])
        scan_low, scan_high = np.concatenate([p.low for p in parts]), np.concatenate([p.high for p in parts])
        low, high = torch.from_numpy(scan_low.copy()), torch.from_numpy(scan_high.copy())  # settling tightens them in place
        stores = [{key: torch.from_numpy(np.concatenate([p.stored[c][key] for p in parts])) for key in parts[0].stored[c]}
                  for c in range(self.num_checkpoints)]  # fmt: skip
        shipped = np.concatenate([p.shipped for p in parts])
        store = CandidateStore(shipped, stores, self.files.per_triple, self.search.fetch, self.device)
        base = {"positive": sum(p.positive for p in parts), "negative": sum(p.negative for p in parts),
                "open_signs": sum(p.open_signs for p in parts), "rows": np.arange(len(rows)), "low": scan_low,
                "high": scan_high}  # fmt: skip
        return rows, low, high, base, store

    def _check_ids(self, hrt: torch.Tensor) -> None:
        for column, (name, size) in enumerate((("head", len(self.files.entity_labels)),
                                               ("relation", len(self.files.relation_labels)),
                                               ("tail", len(self.files.entity_labels)))):  # fmt: skip
            bad = hrt[:, column][(hrt[:, column] < 0) | (hrt[:, column] >= size)]
            if len(bad):
                raise InputError(f"{name} id {int(bad[0])} out of range; valid ids are 0..{size - 1}")
