r"""GradientIndex: exact TracIn as a lookup.

A query computes the test triple's gradient at every checkpoint, then for **every** training row an
estimate of its influence from the stored factors and a bound on the estimate's error
(:mod:`tracin_index.factors`):

.. math:: \bigl|\mathrm{influence}(z, q) - \hat I(z, q)\bigr| \le \epsilon(z, q).

The k-th largest lower bound :math:`L_k` is a lower bound of the k-th largest influence, so only
rows whose upper bound reaches :math:`L_k` (and 0) can be among the top-k proponents; likewise for
opponents. Those candidates are rescored exactly (their gradients recomputed at every checkpoint),
and the top k are taken from the exact scores: every printed influence is exact TracIn, and the
lists are the exact top k, without a fixed rerank depth.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import torch

from .builder import BuildSettings, build_index, fingerprint_ids, selection_from_manifest
from .checkpoints import Checkpoint, CheckpointModels
from .directions import DEFAULT_DIRECTION, check_direction, training_examples
from .errors import InputError, TracInError, TracInWarning
from .factors import BlockPlan, Stored, _Estimate, batch_norm_scale, checkpoint_estimate, refinable, refined_estimate, sketched_sides
from .gradients import (GradientComputer, LinearInputs, PerExampleGradients, cosine, inverse_norms, linear_input_values, vanished,
                        vanishing_message)
from .layers import ParameterSelection
from .replicas import pair_forward_applies
from .results import Influence, InfluenceResult, Triple, ranked_rows
from .sketch import Basis, dequantize, read_quantized_bases
from .store import TRIPLES, bases_path, read_arrays, read_manifest, read_triples, resolve_path, sha256_file

#: Rows rescored exactly in the first round of a query; each further round takes twice as many, up to
#: MAX_ROUND: small rounds stop soon after the k-th lower bound has risen enough, large ones keep the
#: overhead per row down.
FIRST_ROUND = 64
MAX_ROUND = 2048
#: Rows refined in the first round (where refining applies); each further round twice as many.
FIRST_REFINE_ROUND = 64
#: Refine only when the scan leaves more candidates than this (else rescore them directly, in rounds):
#: refining a row costs a fraction of rescoring it (a forward pass up to the Linear, inputs kept once per
#: (head, relation) pair), so only a pool about one exact round's size is rescored directly.
REFINE_MIN_CANDIDATES = 64
#: Test triples after which an opened index packs its large stored arrays for fbgemm by default (each
#: checkpoint's when it has been scanned this often): packing a 100k-triple ConvE index costs 3-5 s and
#: saves ~10 ms per query (1M: 21-35 s and ~90 ms), so by then it has paid for itself; a one-off query
#: never pays it. ``open(..., pack=True)`` (the server, benchmarks of warm queries) packs at once.
PACK_AFTER_SCANS = 300
#: A row's state in a query: bounds from the scan, refined bounds, exact score.
_SCANNED, _REFINED, _EXACT = 0, 1, 2


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class SelfInfluence:
    """A training triple and its self-influence sum_c lr_c ||g(z; theta_c)||^2."""

    train_index: int
    head: str
    relation: str
    tail: str
    self_influence: float


@dataclass
class QueryStats:
    """What the last query did, per test triple: rows rescored exactly (``candidates``), rows whose
    bounds were refined first (``refined``), in how many rounds of either (``rounds``)."""

    candidates: list[int]
    rounds: list[int]
    refined: list[int] = field(default_factory=list)
    #: a sharded query's: candidates whose stored factors were fetched from their shards while refining
    fetched: list[int] = field(default_factory=list)


class GradientIndex:
    """An index directory opened for queries. Make one with :meth:`build`, open one with :meth:`open`."""

    def __init__(self, directory: Path, manifest: dict, hrt: np.ndarray, entity_labels: list[str],
                 relation_labels: list[str], groups: np.ndarray | None, *, device: str, allow_pickle: bool = False):  # fmt: skip
        self.directory = directory
        self.manifest = manifest
        self.hrt = hrt
        self.entity_labels = entity_labels
        self.relation_labels = relation_labels
        self.groups = groups
        self.device = device
        self.loss = manifest["settings"]["loss"]
        #: stored rows per training triple: 2 (adjacent) for a model trained with inverse triples
        self.per_fact = int(manifest.get("examples_per_triple", 1))
        self.plans = [BlockPlan.from_json(p) for p in manifest["plans"]]
        self.checkpoints = recorded_checkpoints(manifest, directory)
        # Permission to unpickle comes from the caller (the command line), never from the index directory:
        # an index may come from someone else, and its manifest and digests are theirs to write.
        self._allow_pickle = allow_pickle
        self._run = None
        self._selection: ParameterSelection | None = None
        self._models: CheckpointModels | None = None
        self._computers: dict[int, GradientComputer] = {}
        self._stored: dict[int, Stored] = {}
        self._modules: dict[int, dict] = {}
        self._squared_norms: np.ndarray | None = None
        self._inverse_norms: dict[int, torch.Tensor] = {}  # per checkpoint, for normalized queries
        self.last_query: QueryStats | None = None
        self._search = None  # search shards on a Dask cluster (open(..., dask=client))
        self._candidate_store = None  # a sharded query's candidates' factors (tracin_index.sharded.CandidateStore)
        #: checkpoint scans after which the stored arrays are packed for fbgemm (None: never); see open()
        self.pack_after: int | None = PACK_AFTER_SCANS

    # ------------------------------------------------------------------------------------------
    # build and open

    @classmethod
    def build(cls, out: str | os.PathLike, *, model_path, allow_pickle: bool = False, training_path=None,
              checkpoint_paths=None, entity_to_id=None, relation_to_id=None, settings: BuildSettings | None = None,
              device: str | None = None, log=None, progress=None, runner=None, index_shards: int | None = None,
              **setting_values) -> "GradientIndex":  # fmt: skip
        """Build (or resume building) the index directory ``out`` and open it. Settings come as a
        :class:`~tracin_index.builder.BuildSettings` or as its fields (``sketch_dim=64``, ``loss="ce"``).
        ``runner``: where the shard tasks run, e.g. ``DaskRunner.local(2)`` (:mod:`tracin_index.cluster`)."""
        if settings is None:
            settings = BuildSettings(**{k: tuple(v) if k == "layer_names" else v for k, v in setting_values.items()})
        elif setting_values:
            raise InputError("give either settings= or setting keywords, not both")
        device = device or default_device()
        out, inputs = build_index(out, model_path=model_path, allow_pickle=allow_pickle, training_path=training_path,
                                  checkpoint_paths=checkpoint_paths, entity_to_id=entity_to_id,
                                  relation_to_id=relation_to_id, settings=settings, device=device, log=log,
                                  progress=progress, runner=runner, index_shards=index_shards)  # fmt: skip
        index = cls.open(out, device=device, allow_pickle=allow_pickle)
        index._run = inputs.run  # loaded already (and checked against its files by the build)
        return index

    @classmethod
    def open(cls, path: str | os.PathLike, *, device: str | None = None, allow_pickle: bool = False, dask=None,
             shards: int | None = None, pack: bool | None = None) -> "GradientIndex":  # fmt: skip
        """Open a complete index. The model is loaded when a query first needs it, and refused then if
        its files or the checkpoints changed since the build; a pickled model only with ``allow_pickle``
        (nothing in the index directory can grant that). ``dask``: a ``distributed.Client``; the
        stored factors are then held by its workers in search shards (:mod:`tracin_index.sharded`):
        the ranges the build recorded (``--index-shards``), else ``shards``, else one per worker.
        ``pack``: pack the large stored arrays for fbgemm's float16 GEMM (faster scans, a second copy in
        memory; :data:`~tracin_index.factors.PACK_MIN_ROWS`): at the first query (True), never (False),
        or once it has answered :data:`PACK_AFTER_SCANS` test triples (None)."""
        directory = Path(path)
        manifest = read_manifest(directory)
        if not manifest.get("complete"):
            raise InputError(f"{directory}: the build did not finish; run the same `tracin-index build` again to resume it")
        triples = directory / TRIPLES
        _check_file(triples, manifest["files"].get(TRIPLES), "triples file")
        hrt, entities, relations, groups = read_triples(triples)
        index = cls(directory, manifest, hrt, entities, relations, groups, device=device or default_device(),
                    allow_pickle=bool(allow_pickle))  # fmt: skip
        index.pack_after = PACK_AFTER_SCANS if pack is None else 0 if pack else None
        if dask is not None:
            from .sharded import ShardedSearch, search_ranges

            ranges = manifest.get("search_shards")
            if shards is not None or not ranges:
                ranges = search_ranges(len(hrt), shards or max(1, len(dask.scheduler_info()["workers"])))
            index._search = ShardedSearch(dask, directory, [tuple(r) for r in ranges], pack_after=index.pack_after)
        return index

    @property
    def run(self):
        """The model the index was built from, loaded on first use (queries need it; ``verify`` and
        self-influence do not). Refuses model or checkpoint files changed since the build."""
        if self._run is None:
            inputs = self.manifest["inputs"]
            source = resolve_path(inputs["model"]["source"], self.directory)
            for name, digest in inputs["model"]["files"].items():
                _check_file(source / name if source.is_dir() else source, digest, "model file")
            for record, checkpoint in zip(inputs["checkpoints"], self.checkpoints):
                if checkpoint.path is not None:
                    _check_file(checkpoint.path, record["sha256"], "checkpoint")
            self._run = recorded_run(self.manifest, self.directory, self._allow_pickle)
        return self._run

    @property
    def selection(self) -> ParameterSelection:
        if self._selection is None:
            model = self.run.model.to(self.device).eval()
            selection = selection_from_manifest(model, self.manifest)
            wanted = self.manifest["selection"]["parameters"]
            if selection.parameter_names != wanted:
                raise InputError(f"{self.directory}: the model's selected parameters differ from the index's; rebuild the index")
            self._selection = selection
        return self._selection

    @property
    def num_checkpoints(self) -> int:
        return len(self.checkpoints)

    @property
    def num_rows(self) -> int:
        return len(self.hrt)

    def _computer(self, c: int) -> GradientComputer:
        if self._models is None:
            self._models = CheckpointModels(self.run.model.to(self.device).eval(), self.checkpoints)
        model = self._models.model(c)
        if c not in self._computers or self._computers[c].model is not model:
            # the selection holds the modules to hook: each model copy needs its own
            selection = self.selection if model is self.run.model else selection_from_manifest(model, self.manifest)
            if pair_forward_applies(model, selection):  # candidates sharing a (head, relation) pair: one product
                model.pair_forward = True
            self._computers[c] = GradientComputer(model, selection, self.loss)
        return self._computers[c]

    def _modules_of(self, c: int) -> dict:
        """The modules of the model at checkpoint c by name (batch norm scales for derived sides)."""
        model = self._computer(c).model
        if self._modules.get(c, {}).get("") is not model:
            self._modules[c] = dict(model.named_modules())
        return self._modules[c]

    def stored(self, c: int) -> Stored:
        """Checkpoint c's stored factors for all rows, read once (shards concatenated in row order)."""
        if c not in self._stored:
            self._stored[c] = load_stored(self.directory, self.manifest, self.plans, c, self.groups).to(self.device)
            self._stored[c].pack_after = self.pack_after
        return self._stored[c]

    def squared_norms(self) -> np.ndarray:
        """||g(z; theta_c)||^2 per checkpoint and training triple, (C, N) float64 (exact, stored at build time)."""
        if self._squared_norms is None:
            self._squared_norms = read_squared_norms(self.directory, self.manifest)
        return self._squared_norms

    # ------------------------------------------------------------------------------------------
    # query

    def id_maps(self):
        from .triples import IdMaps

        return IdMaps(
            entity_to_id={label: i for i, label in enumerate(self.entity_labels)},
            relation_to_id={label: i for i, label in enumerate(self.relation_labels)},
        )

    def _row_labels(self) -> "_RowLabels":
        return _RowLabels(self.hrt, self.entity_labels, self.relation_labels)

    def test_gradients(self, hrt: torch.Tensor, direction: str = DEFAULT_DIRECTION) -> list[PerExampleGradients]:
        """The test triples' gradients at every checkpoint, of the prediction ``direction`` ("tail",
        "head" or "both"; see :mod:`tracin_index.directions`)."""
        hrt = torch.as_tensor(hrt, dtype=torch.long).view(-1, 3).to(self.device)
        return [self._computer(c).compute(hrt, direction) for c in range(self.num_checkpoints)]

    @property
    def inverse_triples(self) -> bool:
        """Whether the model was trained with inverse triples (each training triple is two examples)."""
        return self.per_fact == 2

    def estimates(self, test: list[PerExampleGradients], t: int = 0, normalize: bool = False,
                  rows: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Estimated influence of every training triple on test triple ``t`` and the bound on its error,
        (N,) float64 each (a triple's stored rows, its examples, summed). ``normalize``: of the cosine
        form, each checkpoint's part divided by the exact norms (stored, and the test gradient's): a
        positive factor per triple scales an estimate and its bound alike. ``rows``: only these
        training triples, refined (their Linear inputs recomputed, :func:`~tracin_index.factors.refined_estimate`)."""
        n = self.num_rows if rows is None else len(rows)
        value = torch.zeros(n, dtype=torch.float64, device=self.device)
        error = torch.zeros(n, dtype=torch.float64, device=self.device)
        if rows is not None:
            if not refinable(self.plans):
                raise ValueError("this index's blocks cannot be refined (no sketched Linear input side)")
            rows_t = torch.as_tensor(rows, dtype=torch.long)
            examples = training_examples(torch.as_tensor(self.hrt[rows], dtype=torch.long), self.inverse_triples)
            stored_rows = (rows_t[:, None] * self.per_fact + torch.arange(self.per_fact)).reshape(-1)
        for c in range(self.num_checkpoints):
            query = test[c].index(slice(t, t + 1))
            weight = self.checkpoints[c].learning_rate
            if normalize:
                if c not in self._inverse_norms:
                    self._inverse_norms[c] = inverse_norms(torch.from_numpy(self.squared_norms()[c])).to(self.device)
                norms = self._inverse_norms[c] if rows is None else self._inverse_norms[c][rows_t.to(self.device)]
                weight = weight * float(inverse_norms(query.squared_norms())[0]) * norms
            if rows is None:
                add_checkpoint(value, error, self.plans, self.stored(c), query, self._modules_of(c), weight, self.per_fact)
            else:
                inputs = self._linear_inputs(c, examples.to(self.device))
                stored, at = self.stored_rows(c, stored_rows)
                part = refined_estimate(self.plans, stored, query, self._modules_of(c), at, inputs)
                add_weighted(value, error, part, weight, self.per_fact)
        return value.cpu(), error.cpu()

    def stored_rows(self, c: int, rows: torch.Tensor) -> tuple[Stored, torch.Tensor]:
        """Where checkpoint c's stored factors of the stored ``rows`` are: the whole index's and the rows,
        or (a sharded query) the candidates' factors the shards sent and the rows' places in them."""
        if self._candidate_store is None:
            return self.stored(c), rows
        return self._candidate_store.rows(c, rows)

    def _linear_inputs(self, c: int, examples: torch.Tensor) -> dict[str, LinearInputs]:
        """The factored blocks' Linear inputs for training ``examples`` at checkpoint c, from a forward
        pass that stops there."""
        modules = self._modules_of(c)
        wanted = {p.name: modules[p.name] for p in self.plans if p.kind == "factored"}
        computer = self._computer(c)
        return linear_input_values(computer.model, wanted, examples, computer.model_parts().modules)

    def exact_scores(self, test: list[PerExampleGradients], rows: np.ndarray, batch_size: int = 256,
                     normalize: bool = False) -> torch.Tensor:  # fmt: skip
        """Exact TracIn of the given training rows on the test triples, (T, len(rows)) float64: their
        gradients recomputed at every checkpoint (``normalize``: the cosine form)."""
        train = torch.as_tensor(self.hrt[np.asarray(rows, dtype=np.int64)], dtype=torch.long).to(self.device)
        scores = torch.zeros(len(test[0]), len(train), dtype=torch.float64)
        for c in range(self.num_checkpoints):
            lr = self.checkpoints[c].learning_rate
            test_squared = test[c].squared_norms().double().cpu() if normalize else None
            for start in range(0, len(train), batch_size):
                g = self._computer(c).compute(train[start : start + batch_size])
                dots = test[c].dot(g).double().cpu()
                if normalize:
                    dots = cosine(dots, test_squared, g.squared_norms().double().cpu())
                scores[:, start : start + batch_size] += lr * dots
        return scores

    def query(self, triples, top_k: int = 10, *, candidates: int | None = None, approximate: bool = False,
              test_indices: Sequence[int | None] | None = None, direction: str = DEFAULT_DIRECTION,
              normalize: bool = False) -> list[InfluenceResult]:  # fmt: skip
        """Top-k proponents and opponents of test triples ((T, 3) ids), with exact TracIn scores.

        ``direction``: the prediction explained, for a model trained with inverse triples: "tail"
        (f(h, r, t)), "head" (f(t, r_inv, h)) or "both" (see :mod:`tracin_index.directions`).
        ``normalize``: the cosine form (each checkpoint's inner product over both gradients' norms). By default the candidates rescored exactly are those that the bounds cannot rule out, so the
        lists are the exact top k. ``candidates=K``: rescore the K best estimates each way instead
        (faster, not guaranteed). ``approximate``: return the estimates themselves, rescoring nothing.
        """
        hrt = torch.as_tensor(triples, dtype=torch.long).view(-1, 3)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise InputError(f"top-k must be a positive whole number, got {top_k!r}")
        if candidates is not None and candidates < top_k:
            raise InputError(f"--candidates {candidates} must be at least --top-k {top_k}")
        self._check_ids(hrt)
        check_direction(direction, self.inverse_triples)
        test = self.test_gradients(hrt, direction)
        labels = self._row_labels()
        indices = list(test_indices) if test_indices is not None else [None] * len(hrt)
        test_norms = sum(g.squared_norms().double().cpu() for g in test)
        sharded = None
        if self._search is not None:
            if approximate or candidates is not None:
                raise InputError("--approximate and --candidates are not available on an index searched in shards on a "
                                 "cluster; query it without them (exact), or open it without the cluster")  # fmt: skip
            # derived sides need their batch norm's scale only: 200 numbers travel, not the module
            modules = [{p.derived[0]: batch_norm_scale(self._modules_of(c)[p.derived[0]]).cpu() for p in self.plans if p.derived}
                       for c in range(self.num_checkpoints)]  # fmt: skip
            sharded = self._search.scan(test, modules, top_k, normalize)  # one round trip per shard for all test triples
        results, counts, rounds_of, refined_of, fetched = [], [], [], [], []
        for t in range(len(hrt)):
            refined_of.append(0)
            triple = Triple(*labels.of(hrt[t].tolist()))
            if bool(vanished(test_norms[t : t + 1])[0]):
                warnings.warn(vanishing_message(f"({triple.head}, {triple.relation}, {triple.tail})", self.loss)
                              + "; it has no proponents or opponents", TracInWarning, stacklevel=2)  # fmt: skip
                results.append(InfluenceResult(indices[t], triple, (), (), 0, 0))
                counts.append(0)
                rounds_of.append(0)
                continue
            if sharded is not None:
                low, high, base = self._merge([per_test[t] for per_test in sharded])
                try:
                    rows, exact, rounds, refined = self._rescore_until_settled(test, t, low, high, top_k, normalize)
                    fetched.append(self._candidate_store.fetched)
                finally:
                    self._candidate_store = None
                refined_of[-1] = refined
                rounds_of.append(rounds)
                results.append(self._result(indices[t], triple, exact, rows, top_k, labels, low, high, exact_rows=rows,
                                            base=base))  # fmt: skip
                counts.append(len(rows))
                continue
            value, error = self.estimates(test, t, normalize)
            low, high = value - error, value + error
            if approximate:
                results.append(self._result(indices[t], triple, value.numpy(), np.arange(self.num_rows), top_k, labels,
                                            low, high, exact_rows=None))  # fmt: skip
                counts.append(0)
                rounds_of.append(0)
                continue
            if candidates is not None:
                rows = np.union1d(*_best_estimates(value, candidates))
                exact = self.exact_scores([g.index(slice(t, t + 1)) for g in test], rows, normalize=normalize)[0].numpy()
                rounds = 1
            else:
                rows, exact, rounds, refined = self._rescore_until_settled(test, t, low, high, top_k, normalize)
                refined_of[-1] = refined
            rounds_of.append(rounds)
            results.append(self._result(indices[t], triple, exact, rows, top_k, labels, low, high, exact_rows=rows))
            counts.append(len(rows))
        self.last_query = QueryStats(counts, rounds_of, refined_of, fetched)
        return results

    def _merge(self, parts) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """One test triple's candidates from every search shard: bounds over all training triples (0 and 0
        where a shard ruled a row out: it can then enter neither list, and no k-th lower bound rises
        above 0 through it), the candidates' stored factors for refining (``_candidate_store``), and
        the shards' sign counts (``base``, for :meth:`_result`)."""
        rows = np.concatenate([p.rows for p in parts])
        low = torch.zeros(self.num_rows, dtype=torch.float64)
        high = torch.zeros(self.num_rows, dtype=torch.float64)
        scan_low, scan_high = np.concatenate([p.low for p in parts]), np.concatenate([p.high for p in parts])
        low[torch.as_tensor(rows, dtype=torch.long)] = torch.from_numpy(scan_low)
        high[torch.as_tensor(rows, dtype=torch.long)] = torch.from_numpy(scan_high)
        from .sharded import CandidateStore

        stores = [{key: torch.from_numpy(np.concatenate([p.stored[c][key] for p in parts])) for key in parts[0].stored[c]}
                  for c in range(self.num_checkpoints)]  # fmt: skip
        shipped = np.concatenate([p.shipped for p in parts])
        self._candidate_store = CandidateStore(shipped, stores, self.per_fact, self._search.fetch, self.device)
        base = {"positive": sum(p.positive for p in parts), "negative": sum(p.negative for p in parts),
                "open_signs": sum(p.open_signs for p in parts), "rows": rows, "low": scan_low, "high": scan_high}  # fmt: skip
        return low, high, base

    def _result(self, index, triple, scores: np.ndarray, rows: np.ndarray, top_k: int, labels, low, high,
                exact_rows, base: dict | None = None) -> InfluenceResult:  # fmt: skip
        """The result from scores of ``rows``; counts of each sign from exact scores where known, else
        from the estimates (the bounds say when every sign is certain). ``base``: a sharded query's
        counts over all rows from the scan, corrected here for its candidates."""

        def make(sign: int) -> tuple[Influence, ...]:
            return tuple(Influence(int(rows[p]), *labels[int(rows[p])], influence=float(scores[p]))
                         for p in ranked_rows(scores, rows, top_k, sign))  # fmt: skip

        low, high = low.numpy(), high.numpy()
        estimate = (low + high) / 2
        unsettled = (low < 0) & (high > 0)
        if exact_rows is not None:
            estimate[exact_rows] = scores
            unsettled[exact_rows] = False
        if base is not None:
            cand = base["rows"]
            before = (base["low"] + base["high"]) / 2
            positive = base["positive"] - int((before > 0).sum()) + int((estimate[cand] > 0).sum())
            negative = base["negative"] - int((before < 0).sum()) + int((estimate[cand] < 0).sum())
            open_signs = base["open_signs"] - int(((base["low"] < 0) & (base["high"] > 0)).sum()) + int(unsettled[cand].sum())
            return InfluenceResult(index, triple, make(+1), make(-1), positive, negative, counts_exact=open_signs == 0)
        return InfluenceResult(index, triple, make(+1), make(-1), int((estimate > 0).sum()), int((estimate < 0).sum()),
                               counts_exact=not bool(unsettled.any()))  # fmt: skip

    def _rescore_until_settled(self, test, t: int, low: torch.Tensor, high: torch.Tensor, k: int, normalize: bool = False):
        """Rescore candidates exactly in rounds, the most promising first (the highest upper bounds for
        proponents, the lowest lower bounds for opponents), until no row left unscored can still enter
        either top k: each round's exact scores raise the k-th lower bound towards the k-th influence
        and rule out more of the rest (a threshold algorithm). The first round takes at most
        :data:`FIRST_ROUND` rows, each next one twice as many (up to :data:`MAX_ROUND`).

        Where the plans allow it (a sketched Linear input side, :func:`~tracin_index.factors.refinable`),
        candidates are first *refined* in such rounds: their Linear inputs recomputed (a forward pass
        that stops at the Linear, a fraction of a gradient's cost), which leaves only float16 rounding
        in their bounds; most then drop out, and only the refined rows that can still enter a top k are
        rescored exactly.

        Updates ``low``/``high`` in place (exact where scored); returns the scored rows, their exact
        scores, the number of rounds (refining or rescoring) and the number of rows refined."""
        state = torch.zeros(len(low), dtype=torch.int8)  # _SCANNED, _REFINED or _EXACT
        refine = refinable(self.plans)
        pool = None
        rows_parts, score_parts = [], []
        steps, rounds = {_SCANNED: FIRST_REFINE_ROUND, _REFINED: FIRST_ROUND}, 0
        grads = [g.index(slice(t, t + 1)) for g in test]
        refined = 0
        # bounds only tighten and the k-th lower bound only rises, so a row ruled out stays out: after the
        # first pass over every row, later rounds look at the first candidates only (over fewer rows the
        # k-th lower bound can only be lower, which keeps more candidates, never fewer)
        while True:
            if pool is None:
                pro, opp = _candidates(low, high, k)
                pool = torch.as_tensor(np.union1d(pro, opp), dtype=torch.long)
                # few candidates: rescoring them directly costs less than refining first (more rounds, more calls)
                refine = refine and len(pool) > REFINE_MIN_CANDIDATES
            else:
                pro, opp = (pool.numpy()[rows] for rows in _candidates(low[pool], high[pool], k))
            pro, opp = pro[state[pro].numpy() != _EXACT], opp[state[opp].numpy() != _EXACT]
            if len(pro) + len(opp) == 0:
                break
            stage = _REFINED
            if refine:
                coarse_pro, coarse_opp = pro[state[pro].numpy() == _SCANNED], opp[state[opp].numpy() == _SCANNED]
                if len(coarse_pro) + len(coarse_opp):
                    stage, pro, opp = _SCANNED, coarse_pro, coarse_opp
            rows = self._most_promising(pro, opp, low, high, steps[stage])
            steps[stage] = min(2 * steps[stage], MAX_ROUND)
            where = torch.as_tensor(rows)
            if stage == _SCANNED and refine:
                value, error = self.estimates(grads, 0, normalize, rows=rows)
                low[where] = torch.maximum(low[where], value - error)
                high[where] = torch.minimum(high[where], value + error)
                state[where] = _REFINED
                refined += len(rows)
                rounds += 1
                continue
            exact = self.exact_scores(grads, rows, normalize=normalize)[0]
            low[where] = high[where] = exact
            state[where] = _EXACT
            rows_parts.append(rows)
            score_parts.append(exact.numpy())
            rounds += 1
        if not rows_parts:
            return np.zeros(0, dtype=np.int64), np.zeros(0), 0, refined
        return np.concatenate(rows_parts), np.concatenate(score_parts), rounds, refined

    @staticmethod
    def _most_promising(pro: np.ndarray, opp: np.ndarray, low: torch.Tensor, high: torch.Tensor, step: int) -> np.ndarray:
        """At most ``step // 2`` rows each way: the highest upper bounds of ``pro``, the lowest lower bounds of ``opp``."""
        half = max(1, step // 2)
        if len(pro) > half:
            pro = pro[torch.topk(high[torch.as_tensor(pro)], half).indices.numpy()]
        if len(opp) > half:
            opp = opp[torch.topk(-low[torch.as_tensor(opp)], half).indices.numpy()]
        return np.union1d(pro, opp)

    def _check_ids(self, hrt: torch.Tensor) -> None:
        for column, (name, size) in enumerate(
            (("head", len(self.entity_labels)), ("relation", len(self.relation_labels)), ("tail", len(self.entity_labels)))
        ):
            bad = hrt[:, column][(hrt[:, column] < 0) | (hrt[:, column] >= size)]
            if len(bad):
                raise InputError(f"{name} id {int(bad[0])} out of range; valid ids are 0..{size - 1}")

    # ------------------------------------------------------------------------------------------
    # self-influence and verification

    def self_influences(self) -> np.ndarray:
        """sum_c lr_c ||g(z; theta_c)||^2 for every training row (exact: stored at build time)."""
        rates = np.array([c.learning_rate for c in self.checkpoints], dtype=np.float64)
        return rates @ self.squared_norms()

    def self_influence(self, top_k: int | None = 10) -> list[SelfInfluence]:
        """Training triples by descending self-influence (mislabelled or odd facts tend to rank high)."""
        scores = self.self_influences()
        order = np.lexsort((np.arange(len(scores)), -scores))[: top_k or len(scores)]
        labels = self._row_labels()
        return [SelfInfluence(int(r), *labels[int(r)], float(scores[r])) for r in order]

    def verify(self) -> list[str]:
        """Problems found: any file of the index missing or not matching its sha256 in the manifest, and
        any input it was built from (model, checkpoints, training triples) missing or changed since."""
        return verify_directory(self.directory, self.manifest) + verify_inputs(self.directory, self.manifest)


@dataclass
class _ReplicaRun:
    """What a query needs of a run directory: the model (here a replica, see :mod:`tracin_index.replicas`)."""

    model: torch.nn.Module


def recorded_checkpoints(manifest: dict, directory: Path) -> list[Checkpoint]:
    """The checkpoints an index was built from, as its manifest records them (paths relative to it)."""
    return [Checkpoint(path=None if r["path"] is None else resolve_path(r["path"], directory), epoch=r["epoch"],
                       learning_rate=r["learning_rate"])
            for r in manifest["inputs"]["checkpoints"]]  # fmt: skip


def recorded_run(manifest: dict, directory: Path, allow_pickle: bool):
    """The model an index was built from (``.model``): its plain-torch replica where the build recorded
    one, else loaded through PyKEEN; a pickled one only with ``allow_pickle``, which comes from the
    caller (the command line), never from the index directory."""
    inputs = manifest["inputs"]
    source = resolve_path(inputs["model"]["source"], directory)
    spec = manifest.get("replica")
    if spec is not None and not inputs["model"]["pickled"] and source.is_dir():
        return _replica_run(spec, source, has_checkpoints=any(r["path"] for r in inputs["checkpoints"]))
    from .models import load_model  # PyKEEN: seconds to import

    return load_model(source, allow_pickle=allow_pickle)


def _replica_run(spec: dict, source: Path, has_checkpoints: bool) -> _ReplicaRun:
    """The run directory's model as a plain-torch replica (no PyKEEN import): the build checked that it agrees."""
    from .checkpoints import load_state_dict_into, read_state_dict
    from .replicas import build_replica

    model = build_replica(spec)
    weights = source / "model.pt"
    if weights.is_file():
        load_state_dict_into(model, read_state_dict(weights), str(weights))
    elif not has_checkpoints:
        raise InputError(f"{weights}: missing, and the index has no checkpoints to load weights from")
    return _ReplicaRun(model.eval())


def fold(per_row: torch.Tensor, per_fact: int) -> torch.Tensor:
    """Per stored row (example) -> per training triple: the sum of its ``per_fact`` adjacent rows."""
    return per_row if per_fact == 1 else per_row.view(-1, per_fact).sum(1)


def add_weighted(value: torch.Tensor, error: torch.Tensor, part, weight, per_fact: int) -> None:
    """``value`` and ``error`` (per training triple) += ``weight`` times a checkpoint's estimate and bound
    (per stored row, folded); ``weight``: the learning rate, or (the cosine form) a tensor per triple."""
    if torch.is_tensor(weight):
        value.addcmul_(weight, fold(part.value, per_fact))
        error.addcmul_(weight, fold(part.error, per_fact))
    else:
        value.add_(fold(part.value, per_fact), alpha=weight)
        error.add_(fold(part.error, per_fact), alpha=weight)


def add_checkpoint(value: torch.Tensor, error: torch.Tensor, plans: list[BlockPlan], stored: Stored,
                   query: PerExampleGradients, modules: dict, weight, per_fact: int) -> None:  # fmt: skip
    """``value`` and ``error`` (per training triple) += ``weight`` times one checkpoint's scan of every
    stored row (:func:`~tracin_index.factors.checkpoint_estimate`): summed in place where a triple is one
    row and the weight one number, else through :func:`add_weighted`."""
    if per_fact == 1 and not torch.is_tensor(weight):
        checkpoint_estimate(plans, stored, query, modules, _Estimate(value, error), weight)
    else:
        add_weighted(value, error, checkpoint_estimate(plans, stored, query, modules), weight, per_fact)


def read_squared_norms(directory: Path, manifest: dict, facts: tuple[int, int] | None = None) -> np.ndarray:
    """||g(z; theta_c)||^2 per checkpoint and training triple of ``facts`` = [start, stop) (all by
    default), (C, stop - start) float64, from the shard files."""
    per_fact = int(manifest.get("examples_per_triple", 1))
    start, stop = (0, int(manifest["num_rows"]) // per_fact) if facts is None else facts
    norms = np.zeros((len(manifest["inputs"]["checkpoints"]), stop - start), dtype=np.float64)
    for shard in manifest["shards"]:
        a, b = shard["row_start"] // per_fact, shard["row_stop"] // per_fact
        lo, hi = max(a, start), min(b, stop)
        if lo < hi:
            values = read_arrays(directory / shard["file"], ["squared_norms"])["squared_norms"]
            norms[shard["checkpoint"], lo - start : hi - start] = values[lo - a : hi - a]
    return norms


def load_stored(directory: Path, manifest: dict, plans: list[BlockPlan], c: int, groups: np.ndarray | None,
                facts: tuple[int, int] | None = None) -> Stored:  # fmt: skip
    """Checkpoint c's stored factors of the training triples ``facts`` = [start, stop) (all by default),
    from the shard files (their rows in row order). Grouped sides keep the groups those rows use,
    renumbered from 0 in group order."""
    per_fact = int(manifest.get("examples_per_triple", 1))
    start, stop = (0, int(manifest["num_rows"])) if facts is None else (facts[0] * per_fact, facts[1] * per_fact)
    shards = sorted((s for s in manifest["shards"] if s["checkpoint"] == c), key=lambda s: s["row_start"])
    grouped_keys = {f"{p.name}/in/" for p in plans if p.grouped}
    rows: dict[str, list[np.ndarray]] = {}
    per_group: dict[str, list[np.ndarray]] = {}
    for shard in shards:
        overlaps = shard["row_start"] < stop and shard["row_stop"] > start
        if not overlaps and not grouped_keys:
            continue
        path = directory / shard["file"]
        names = None
        if not overlaps:  # an earlier file may hold the groups these rows use
            with h5py.File(path, "r") as f:
                names = []
                f.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) and any(
                    name.startswith(g) for g in grouped_keys) else None)  # fmt: skip
        arrays = read_arrays(path, names)
        lo, hi = max(start, shard["row_start"]) - shard["row_start"], min(stop, shard["row_stop"]) - shard["row_start"]
        for key, value in arrays.items():
            if key == "squared_norms":
                continue
            if any(key.startswith(g) for g in grouped_keys):
                per_group.setdefault(key, []).append(value)
            elif overlaps:
                rows.setdefault(key, []).append(value[lo:hi])
    arrays = {key: torch.from_numpy(np.concatenate(parts)) for key, parts in rows.items()}
    stored_groups = {}
    if grouped_keys:
        mine = groups[start:stop]
        used, local = np.unique(mine, return_inverse=True) if facts is not None else (None, mine)
        for key, parts in per_group.items():
            whole = np.concatenate(parts)
            arrays[key] = torch.from_numpy(whole if used is None else whole[used])
        stored_groups = {p.name: torch.as_tensor(local) for p in plans if p.grouped}
    for key in arrays:  # the per-row numbers of the bounds in float64 once, not at every query
        if key.endswith(("/scale", "/norm", "/rho")):
            arrays[key] = arrays[key].double()
    bases, sketched = {}, sketched_sides(plans)
    if sketched:
        name = bases_path(c)
        _check_file(directory / name, manifest["files"].get(name), "principal directions file")
        quantized = read_quantized_bases(read_arrays(directory / name), sketched)
        bases = {key: Basis.from_matrix(dequantize(*q), quantized=q) for key, q in quantized.items()}
    for p in plans:
        if p.grouped and facts is None and len(arrays[f"{p.name}/in/values"]) != manifest["num_groups"]:
            raise InputError(f"{directory}: the shards of checkpoint {c + 1} do not hold every "
                             "(head, relation) group; rebuild the index")  # fmt: skip
    return Stored(arrays, bases, stored_groups, stop - start)


def verify_directory(directory: Path, manifest: dict) -> list[str]:
    """Every file the manifest records (triples, bases, shards), checked against its sha256."""
    problems = []
    recorded = [(name, digest) for name, digest in manifest["files"].items()]
    recorded += [(s["file"], s["sha256"]) for s in manifest["shards"]]
    for name, digest in recorded:
        path = directory / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{path}: checksum does not match the manifest (corrupted or replaced)")
    return problems


def verify_inputs(directory: Path, manifest: dict) -> list[str]:
    """What the index was built from, checked as a query checks it (the model's files and the checkpoints,
    by sha256) and the training triples (their ids, by the fingerprint the build recorded), loading no
    model: one line per input that is missing or changed, saying what to do."""
    inputs = manifest["inputs"]
    source = resolve_path(inputs["model"]["source"], directory).resolve()  # resolved: messages name the file plainly
    recorded = [(source / name if source.is_dir() else source, digest, "model file")
                for name, digest in inputs["model"]["files"].items()]  # fmt: skip
    recorded += [(resolve_path(r["path"], directory).resolve(), r["sha256"], "checkpoint") for r in inputs["checkpoints"] if r["path"]]
    problems = [problem for path, digest, what in recorded if (problem := _file_problem(path, digest, what))]
    training = resolve_path(inputs["training"]["source"], directory).resolve()
    if not training.is_file():
        problems.append(f"{training}: training triples recorded in the index are missing; put them back (or rebuild the index)")
    else:
        from .triples import IdMaps

        _, entities, relations, _ = read_triples(directory / TRIPLES)
        maps = IdMaps({label: i for i, label in enumerate(entities)}, {label: i for i, label in enumerate(relations)})
        try:
            same = fingerprint_ids(maps.read_ids(training).numpy()) == inputs["training"]["fingerprint"]
        except TracInError:
            same = False
        if not same:
            problems.append(f"{training}: training triples changed since the index was built; rebuild the index "
                            "(or restore the file)")  # fmt: skip
    return problems


def _file_problem(path: Path, digest: str | None, what: str) -> str | None:
    if not path.is_file():
        return f"{path}: {what} recorded in the index is missing; rebuild the index (or put it back)"
    if digest is not None and sha256_file(path) != digest:
        return f"{path}: {what} changed since the index was built (sha256 differs); rebuild the index (or restore the file)"
    return None


def _check_file(path: Path, digest: str | None, what: str) -> None:
    problem = _file_problem(path, digest, what)
    if problem is not None:
        raise InputError(problem)


def _candidates(low: torch.Tensor, high: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows that may be top-k proponents and rows that may be top-k opponents, from bounds on every row.

    The k-th largest lower bound is at most the k-th largest influence, so a row can be a top-k
    proponent only if its upper bound reaches it and exceeds 0; opponents mirrored.
    """
    n = min(k, len(low))
    kth_low = float(torch.topk(low, n).values[-1]) if n else 0.0
    kth_high = float(torch.topk(high, n, largest=False).values[-1]) if n else 0.0
    pro = torch.nonzero((high >= max(kth_low, 0.0)) & (high > 0)).view(-1).numpy()
    opp = torch.nonzero((low <= min(kth_high, 0.0)) & (low < 0)).view(-1).numpy()
    return pro, opp


def _best_estimates(value: torch.Tensor, fixed: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``fixed`` best estimates each way (of their sign)."""
    n = min(fixed, len(value))
    pro = torch.topk(value, n).indices.numpy()
    opp = torch.topk(-value, n).indices.numpy()
    return pro[value[pro].numpy() > 0], opp[value[opp].numpy() < 0]


class _RowLabels:
    """Labels of training rows, computed on access (an index may have millions of rows)."""

    def __init__(self, hrt: np.ndarray, entities: list[str], relations: list[str]):
        self.hrt, self.entities, self.relations = hrt, entities, relations

    def of(self, ids: Sequence[int]) -> tuple[str, str, str]:
        h, r, t = ids
        return self.entities[h], self.relations[r], self.entities[t]

    def __getitem__(self, row: int) -> tuple[str, str, str]:
        return self.of(self.hrt[row])
