r"""GradientIndex: exact TracIn as a lookup.

A value you build, open and query: an index directory on disk (:mod:`tracin_index.storage`), the
model at every checkpoint (:mod:`tracin_index.gradients`), and the query engine that scans, refines
and rescores (:mod:`tracin_index.search`). Every printed influence is exact TracIn and every list the
exact top k (``docs/exact-index.md``).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from .build.builder import build_index
from .build.settings import BuildSettings
from .errors import InputError
from .gradients.blocks import PerExampleGradients
from .gradients.computer import CheckpointGradients
from .gradients.selection import ParameterSelection
from .kg.triples import IdMaps
from .machine import default_device
from .results import InfluenceResult, SelfInfluence, rank_self_influence
from .search.engine import PACK_AFTER_SCANS, QueryEngine
from .storage.arrays import FactorArrays
from .storage.layout import search_ranges
from .storage.reader import IndexFiles


class GradientIndex:
    """An index directory opened for queries. Make one with :meth:`build`, open one with :meth:`open`. Threads
    may share one: it answers their calls one at a time (:class:`~tracin_index.search.engine.QueryEngine`)."""

    def __init__(self, files: IndexFiles, *, device: str, allow_pickle: bool = False,
                 pack_after: int | None = PACK_AFTER_SCANS, search=None, max_memory: int | None = None):  # fmt: skip
        self.files = files
        self.device = device
        # Permission to unpickle comes from the caller (the command line), never from the index directory:
        # an index may come from someone else, and its manifest and digests are theirs to write.
        self._allow_pickle = allow_pickle
        self._run = None
        self._selection: ParameterSelection | None = None
        self.engine = QueryEngine(files, self._load_gradients, device, pack_after=pack_after, search=search,
                                  max_memory=max_memory)  # fmt: skip

    @classmethod
    def build(cls, out: str | os.PathLike, *, model_path, allow_pickle: bool = False, training_path=None,
              checkpoint_paths=None, entity_to_id=None, relation_to_id=None, settings: BuildSettings | None = None,
              device: str | None = None, log=None, progress=None, runner=None, index_shards: int | None = None,
              **setting_values) -> "GradientIndex":  # fmt: skip
        """Build (or resume building) the index directory ``out`` and open it. Settings come as a
        :class:`~tracin_index.build.settings.BuildSettings` or as its fields (``sketch_dim=64``, ``loss="ce"``).
        ``runner``: where the build's tasks run, e.g. ``DaskRunner.local(2)`` (:mod:`tracin_index.build.runners`)."""
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
             shards: int | None = None, pack: bool | None = None, max_memory: int | None = None) -> "GradientIndex":  # fmt: skip
        """Open a complete index. The model is loaded when a query first needs it, and refused then if
        its files or the checkpoints changed since the build; a pickled model only with ``allow_pickle``
        (nothing in the index directory can grant that). ``dask``: a ``distributed.Client``; the
        stored factors are then held by its workers in search shards (:mod:`tracin_index.search.shards`):
        the ranges the build recorded (``--index-shards``), else ``shards``, else one per worker.
        ``pack``: pack the large stored arrays for fbgemm's float16 GEMM (faster scans, a second copy in
        memory; :data:`~tracin_index.storage.arrays.PACK_MIN_ROWS`): at the first query (True), never
        (False), or once it has answered :data:`~tracin_index.search.engine.PACK_AFTER_SCANS` test triples (None).
        ``max_memory``: the query process's memory budget in bytes (default: a quarter of the memory available);
        an index whose stored arrays take more than a quarter of it is not held but read from its files in
        passes, each answering many test triples (:mod:`tracin_index.search.passes`; ``passes`` says how)."""
        files = IndexFiles.open(path)
        pack_after = PACK_AFTER_SCANS if pack is None else 0 if pack else None
        search = None
        if dask is not None:
            from .search.shards import ShardedSearch

            ranges = files.manifest.get("search_shards")
            if shards is not None or not ranges:
                ranges = search_ranges(files.num_triples, shards or max(1, len(dask.scheduler_info()["workers"])))
            search = ShardedSearch(dask, files.directory, [tuple(r) for r in ranges], pack_after=pack_after)
        return cls(files, device=device or default_device(), allow_pickle=bool(allow_pickle), pack_after=pack_after,
                   search=search, max_memory=max_memory)  # fmt: skip

    # -- what it holds ---------------------------------------------------------------------------

    directory = property(lambda self: self.files.directory)
    manifest = property(lambda self: self.files.manifest)
    hrt = property(lambda self: self.files.hrt, doc="The training triples' ids, (N, 3).")
    entity_labels = property(lambda self: self.files.entity_labels)
    relation_labels = property(lambda self: self.files.relation_labels)
    plans = property(lambda self: self.files.plans)
    checkpoints = property(lambda self: self.files.checkpoints)
    loss = property(lambda self: self.files.loss)
    num_triples = property(lambda self: self.files.num_triples, doc="Training triples (each one or two stored rows).")
    num_checkpoints = property(lambda self: len(self.files.checkpoints))
    inverse_triples = property(lambda self: self.files.inverse_triples,
                               doc="Whether the model was trained with inverse triples (two examples per triple).")
    last_query = property(lambda self: self.engine.last_query, doc="What the last query did (QueryStats).")
    passes = property(lambda self: self.engine.passes,
                      doc="How queries scan an index larger than the memory budget (PassPlan), None where it is held.")

    def id_maps(self) -> IdMaps:
        return self.files.id_maps()

    @property
    def run(self):
        """The model the index was built from, loaded on first use (queries need it; ``verify`` and
        self-influence do not). Refuses model or checkpoint files changed since the build."""
        if self._run is None:
            self._run = self.files.load_run(self._allow_pickle)
        return self._run

    @property
    def selection(self) -> ParameterSelection:
        if self._selection is None:
            self._selection = self.files.selection_of(self.run.model.to(self.device).eval())
        return self._selection

    def _load_gradients(self) -> CheckpointGradients:
        selection = self.selection  # checked against the index's first
        base = self.run.model.to(self.device).eval()

        def select(model: torch.nn.Module) -> ParameterSelection:
            return selection if model is base else self.files.selection_of(model)

        # per_pair: candidates sharing a (head, relation) pair cost one product where the model's twin allows it
        return CheckpointGradients(base, self.files.checkpoints, select, self.files.loss, per_pair=True)

    # -- queries ---------------------------------------------------------------------------------

    def query(self, triples, top_k: int = 10, *, candidates: int | None = None, approximate: bool = False,
              test_indices: Sequence[int | None] | None = None, direction: str = "tail",
              normalize: bool = False) -> list[InfluenceResult]:  # fmt: skip
        """Top-k proponents and opponents of test triples ((T, 3) ids), with exact TracIn scores.

        ``direction``: the prediction explained, for a model trained with inverse triples: "tail"
        (f(h, r, t)), "head" (f(t, r_inv, h)) or "both" (see :mod:`tracin_index.kg.directions`).
        ``normalize``: the cosine form (each checkpoint's inner product over both gradients' norms). By
        default the candidates rescored exactly are those that the bounds cannot rule out, so the lists are
        the exact top k. ``candidates=K``: rescore the K best estimates each way instead (faster, not
        guaranteed). ``approximate``: return the estimates themselves, rescoring nothing.
        """
        return self.engine.query(triples, top_k, candidates=candidates, approximate=approximate,
                                 test_indices=test_indices, direction=direction, normalize=normalize)  # fmt: skip

    def test_gradients(self, hrt, direction: str = "tail") -> list[PerExampleGradients]:
        """The test triples' gradients at every checkpoint (:meth:`QueryEngine.test_gradients`)."""
        return self.engine.test_gradients(hrt, direction)

    def estimates(self, test: list[PerExampleGradients], t: int = 0, normalize: bool = False,
                  rows: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Every training triple's estimated influence on test triple ``t`` and its error bound
        (:meth:`QueryEngine.estimates`)."""
        return self.engine.estimates(test, t, normalize, rows)

    def exact_scores(self, test: list[PerExampleGradients], rows: np.ndarray, batch_size: int = 256,
                     normalize: bool = False) -> torch.Tensor:  # fmt: skip
        """Exact TracIn of the training triples ``rows`` on the test triples (:meth:`QueryEngine.exact_scores`)."""
        return self.engine.exact_scores(test, rows, batch_size, normalize)

    def factor_arrays(self, c: int) -> FactorArrays:
        """Checkpoint c's stored arrays, as queries scan them (read once)."""
        return self.engine.factor_arrays(c)

    # -- self-influence and verification ---------------------------------------------------------

    def squared_norms(self) -> np.ndarray:
        """||g(z; theta_c)||^2 per checkpoint and training triple, (C, N) float64 (exact, stored at build time)."""
        return self.files.squared_norms()

    def self_influences(self) -> np.ndarray:
        """sum_c lr_c ||g(z; theta_c)||^2 for every training triple (exact: stored at build time)."""
        return self.files.self_influences()

    def self_influence(self, top_k: int | None = 10) -> list[SelfInfluence]:
        """Training triples by descending self-influence (mislabelled or odd facts tend to rank high)."""
        return rank_self_influence(self.self_influences(), self.files.row_labels(), top_k)

    def verify(self) -> list[str]:
        """Problems found: any file of the index missing or not matching its sha256 in the manifest, and
        any input it was built from (model, checkpoints, training triples) missing or changed since."""
        return self.files.verify()
