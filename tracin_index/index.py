r"""GradientIndex: TracIn as a lookup.

Build: for every checkpoint c and every shard of training rows, per-example gradients (one
batched pass), projected and scaled by :math:`\sqrt{\eta_c}`, go to an HDF5 shard; then a FAISS
inner-product index is built over the per-row concatenation of the C checkpoint vectors, so that

.. math:: \langle v(z), v(z') \rangle = \sum_c \eta_c \langle P_c g(z; \theta_c), P_c g(z'; \theta_c) \rangle

is the whole TracInCP score in one inner product. Query: the test triple's vector the same way,
then maximum inner-product search for proponents and, with the negated query, opponents.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from . import __version__
from .errors import InputError
from .gradients import GradientComputer, LOSSES
from .layers import ParameterSelection, select_parameters
from .projection import GradientProjector, ProjectionSpec, fit_principal_bases
from .results import Influence, InfluenceResult, Triple, ranked_rows, top_influences
from .search import INDEX_TYPES, InnerProductIndex
from .store import (
    FAISS_INDEX,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    TRIPLES,
    ShardTask,
    bases_path,
    exclusive_lock,
    plan_shards,
    read_bases,
    read_manifest,
    read_shard,
    read_triples,
    sha256_file,
    write_bases,
    write_manifest,
    write_shard,
    write_triples,
)

DTYPES = {"float16": np.float16, "float32": np.float32}
DEFAULT_PROJECTION_DIM = 16384  # benchmarks/agreement.py: smallest dim with recall@10 >= 0.9 on UMLS and Kinships ConvE
#: Training triples whose layer inputs define the principal directions of a checkpoint.
PRINCIPAL_SAMPLE = 2048
DEFAULT_SHARD_SIZE = 16384
#: Exact (unprojected) vectors above this many bytes in all are refused with advice to project.
MAX_EXACT_BYTES = 4 * 2**30
#: A build holds one model copy per checkpoint (and streams rows straight into FAISS) while they
#: take at most this many bytes together; beyond, it loads checkpoints in turn and reads shards back.
MODEL_COPIES_BYTES = 2 * 2**30
#: An ivf index is trained (k-means) on a random sample of at most this many leading rows ...
IVF_SAMPLE_ROWS = 100_000
#: ... and at most this many bytes.
IVF_SAMPLE_BYTES = 2**30
#: Rows go to FAISS in float32 pieces of at most this many bytes.
FEED_BYTES = 64 * 2**20


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


def _model_files(source: Path) -> list[Path]:
    """The files whose bytes define the model as loaded from ``source``."""
    if source.is_dir():
        return [p for p in (source / "config.json", source / "model.pt", source / "trained_model.pkl") if p.is_file()]
    return [source]


def _fingerprint_ids(hrt: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(hrt, dtype=np.int64).tobytes()).hexdigest()


def _first_difference(recorded: Any, wanted: Any, path: str = "") -> str | None:
    """The first key path where two JSON values differ, e.g. ``projection.dim``."""
    if isinstance(recorded, dict) and isinstance(wanted, dict):
        for key in sorted(set(recorded) | set(wanted)):
            found = _first_difference(recorded.get(key), wanted.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    if isinstance(recorded, list) and isinstance(wanted, list) and len(recorded) == len(wanted):
        for i, (a, b) in enumerate(zip(recorded, wanted)):
            found = _first_difference(a, b, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if recorded == wanted else f"{path} (index: {recorded!r}, now: {wanted!r})"


class _ShardWorker:
    """Computes shards: returns each task with its shard's checksum and its vectors.

    ``all_checkpoints``: keep one model copy per checkpoint, for tasks that come row range by row
    range (each task switches checkpoint); otherwise one model, reloaded when the checkpoint
    changes (tasks come checkpoint by checkpoint).
    """

    def __init__(self, directory: Path, model, manifest: dict, checkpoints, projection, dtype, batch_size, hrt, device,
                 all_checkpoints: bool):  # fmt: skip
        # everything a task needs is here or on disk (checkpoints, bases), so tasks could run elsewhere
        self.directory = directory
        self.model = model
        self.manifest = manifest
        self.checkpoints = checkpoints
        self.projection = projection
        self.torch_dtype = {"float16": torch.float16, "float32": torch.float32}[dtype]
        self.batch_size = batch_size
        self.hrt = hrt
        self.device = device
        self.all_checkpoints = all_checkpoints
        self._at: dict[int, tuple[GradientComputer, GradientProjector]] = {}

    def _at_checkpoint(self, index: int) -> tuple[GradientComputer, GradientProjector]:
        if index not in self._at:
            if self.all_checkpoints:
                model = copy.deepcopy(self.model) if self._at else self.model
            else:
                self._at.clear()
                model = self.model
            self.checkpoints[index].load_into(model)
            selection = _selection_from_manifest(model, self.manifest)
            bases = read_bases(self.directory, index) if self.projection.dim else None
            projector = GradientProjector(selection, self.projection, index, device=self.device, bases=bases)
            self._at[index] = (GradientComputer(model, selection, self.manifest["loss"]), projector)
        return self._at[index]

    def __call__(self, task: ShardTask) -> tuple[ShardTask, str, np.ndarray]:
        computer, projector = self._at_checkpoint(task.checkpoint)
        lr = self.checkpoints[task.checkpoint].learning_rate
        scale = math.sqrt(lr)
        rows = task.row_stop - task.row_start
        vectors = torch.empty((rows, projector.size), dtype=self.torch_dtype)
        norms = torch.empty(rows, dtype=torch.float64)
        for start in range(task.row_start, task.row_stop, self.batch_size):
            stop = min(start + self.batch_size, task.row_stop)
            grads = computer.compute(self.hrt[start:stop])
            with torch.no_grad():
                # cast in torch: numpy's float32 -> float16 conversion is several times slower
                v = (projector.project(grads) * scale).to(self.torch_dtype)
                vectors[start - task.row_start : stop - task.row_start] = v.cpu()
                norms[start - task.row_start : stop - task.row_start] = grads.squared_norms().double().cpu()
        attrs = {"checkpoint": task.checkpoint, "row_start": task.row_start, "row_stop": task.row_stop,
                 "learning_rate": lr}  # fmt: skip
        digest = write_shard(self.directory / task.relative_path, vectors.numpy(), norms.numpy(), attrs)
        return task, digest, vectors.numpy()


class GradientIndex:
    """An index directory opened for queries. Make one with :meth:`build`, open one with :meth:`open`."""

    def __init__(self, directory: Path, manifest: dict, checkpoints, hrt: np.ndarray, entity_labels: list[str],
                 relation_labels: list[str], *, device: str, allow_pickle: bool = False, use_gpu: bool | None = None,
                 search_index: InnerProductIndex | None = None):  # fmt: skip
        self.directory = directory
        self.manifest = manifest
        self.checkpoints = checkpoints
        self.hrt = hrt
        self.entity_labels = entity_labels
        self.relation_labels = relation_labels
        self.device = device
        self.loss = manifest["loss"]
        self.projection = ProjectionSpec(**manifest["projection"]["spec"])
        # Permission to unpickle comes from the caller (the command line), never from the index directory:
        # an index may come from someone else, and its manifest and digests are theirs to write.
        self._allow_pickle = allow_pickle
        self._use_gpu = use_gpu
        self._search_index = search_index
        self._run = None
        self._selection: ParameterSelection | None = None
        self._models: list | None = None

    @property
    def search_index(self) -> InnerProductIndex:
        """The FAISS index, read on first use (``verify`` and self-influence never need it)."""
        if self._search_index is None:
            index_file = self.directory / self.manifest["index"]["file"]
            if not index_file.is_file():
                raise InputError(f"{index_file}: missing; run the same `tracin-index build` again to rebuild it from the shards")
            self._search_index = InnerProductIndex.open(index_file, use_gpu=self._use_gpu)
        return self._search_index

    @property
    def run(self):
        """The model the index was built from, loaded on first use (queries need it; ``verify`` and
        self-influence do not). Refuses model or checkpoint files changed since the build."""
        if self._run is None:
            from .models import load_model

            inputs = self.manifest["inputs"]
            source = Path(inputs["model"]["source"])
            for name, digest in inputs["model"]["files"].items():
                self._check_unchanged(source / name if source.is_dir() else source, digest, "model file")
            for record in inputs["checkpoints"]:
                if record["path"] is not None:
                    self._check_unchanged(Path(record["path"]), record["sha256"], "checkpoint")
            run = load_model(source, allow_pickle=self._allow_pickle)
            run.model.to(self.device).eval()
            selection = _selection_from_manifest(run.model, self.manifest)
            if selection.parameter_names != self.manifest["settings"]["selection"]["parameters"]:
                raise InputError(f"{self.directory}: the model's selected parameters differ from the index's; rebuild the index")
            self._run, self._selection = run, selection
        return self._run

    @property
    def selection(self) -> ParameterSelection:
        if self._selection is None:
            self.run  # noqa: B018 - loads the model and finds the selection in it
        return self._selection

    # ------------------------------------------------------------------------------------------
    # build

    @classmethod
    def build(
        cls,
        out: str | os.PathLike,
        *,
        model_path: str | os.PathLike,
        allow_pickle: bool = False,
        training_path: str | os.PathLike | None = None,
        checkpoint_paths: Sequence[str | os.PathLike] | None = None,
        entity_to_id: str | os.PathLike | None = None,
        relation_to_id: str | os.PathLike | None = None,
        selection: str = "last",
        num_last_layers: int = 2,
        layer_names: Sequence[str] | None = None,
        loss: str = "bce",
        projection_dim: int = DEFAULT_PROJECTION_DIM,
        projection_kind: str = "gaussian",
        seed: int = 0,
        dtype: str = "float16",
        index_type: str = "flat",
        device: str | None = None,
        batch_size: int = 256,
        shard_size: int = DEFAULT_SHARD_SIZE,
        executor: Callable[[Callable, Iterable], Iterator] | None = None,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> "GradientIndex":
        """Build (or resume building) the index directory ``out``; returns it opened.

        ``executor`` maps the shard function over shard tasks, keeping their order (``map`` by
        default, in process; a ``concurrent.futures`` executor's ``map`` fits); the function returns
        the task, its shard's sha256 and its vectors. Complete shards whose checksum matches are
        skipped, so a killed build resumes with the same call.
        """
        from .models import Checkpoint, find_checkpoints, load_model
        log = log or (lambda message: None)
        out = Path(out)
        if loss not in LOSSES:
            raise InputError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
        if dtype not in DTYPES:
            raise InputError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
        if index_type not in INDEX_TYPES:
            raise InputError(f"unknown index type {index_type!r}; valid: {', '.join(INDEX_TYPES)}")
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        spec = ProjectionSpec(projection_dim, projection_kind, seed)
        device = device or default_device()

        run = load_model(model_path, allow_pickle=allow_pickle)
        model = run.model.to(device).eval()
        id_maps = run.resolve_id_maps(entity_to_id, relation_to_id)
        training_file = training_path or run.training_path
        if training_file is None:
            raise InputError(f"{model_path}: no training triples found; pass --train")
        hrt = id_maps.read_ids(training_file)  # streamed: the labels of millions of rows are never held at once
        checkpoints = find_checkpoints(checkpoint_paths) if checkpoint_paths else run.checkpoints
        if not checkpoints:
            checkpoints = [Checkpoint(path=None, epoch=None, learning_rate=1.0)]
            log("no checkpoints: the model itself is the only checkpoint (learning rate 1.0)")

        if selection == "names":
            chosen = select_parameters(model, mode="names", names=list(layer_names or ()))
        else:
            chosen = select_parameters(model, mode=selection, num_last_layers=num_last_layers)
        GradientComputer(model, chosen, loss)  # refuses impossible loss/selection pairs now, before any writing
        dim_per_checkpoint = GradientProjector(chosen, spec, 0).size
        total_dim = dim_per_checkpoint * len(checkpoints)
        num_rows = hrt.shape[0]
        shard_bytes = num_rows * total_dim * np.dtype(DTYPES[dtype]).itemsize
        index_bytes = num_rows * total_dim * (2 if index_type == "flat-fp16" else 4)
        if projection_dim == 0 and shard_bytes > MAX_EXACT_BYTES:
            raise InputError(
                f"exact vectors would take {shard_bytes / 2**30:.1f} GiB ({num_rows:,} rows x {total_dim:,} numbers); "
                f"pass --projection-dim (e.g. {DEFAULT_PROJECTION_DIM}) to project them"
            )
        log(f"parameters: {chosen.describe()}")
        log(
            f"{num_rows:,} training triples x {len(checkpoints)} checkpoint(s) x {dim_per_checkpoint:,} numbers: "
            f"about {shard_bytes / 2**20:,.1f} MiB of shards ({dtype}) and {index_bytes / 2**20:,.1f} MiB of "
            f"{index_type} index"
        )

        inputs = {
            "model": {
                "source": str(Path(model_path).resolve()),
                "pickled": run.config is None,  # a fact about the file; never a permission to unpickle it
                "files": {p.name: sha256_file(p) for p in _model_files(Path(model_path).resolve())},
            },
            "checkpoints": [
                {
                    "path": None if c.path is None else str(Path(c.path).resolve()),
                    "sha256": None if c.path is None else sha256_file(c.path),
                    "learning_rate": c.learning_rate,
                    "epoch": c.epoch,
                }
                for c in checkpoints
            ],
            "training": {"source": str(Path(training_file).resolve()), "num_triples": num_rows,
                         "fingerprint": _fingerprint_ids(hrt.numpy())},  # fmt: skip
        }
        settings = {
            "selection": chosen.to_json(),
            "loss": loss,
            "projection": {"spec": spec.to_json(), "dim_per_checkpoint": dim_per_checkpoint,
                           "blocks": [layout.to_json() for layout in GradientProjector(chosen, spec, 0).layouts]},  # fmt: skip
            "dtype": dtype,
            "batch_size": batch_size,
            "shard_size": shard_size,
        }

        with exclusive_lock(out):
            manifest = cls._start_manifest(out, inputs, settings, index_type, log)
            if not (out / TRIPLES).is_file():
                write_triples(out / TRIPLES, hrt.numpy(), id_maps.id_to_entity, id_maps.id_to_relation, str(training_file))
            # rows first when one model copy per checkpoint fits: complete rows then go to FAISS as
            # they are computed, instead of being read back from the shards
            rows_first = len(checkpoints) * _model_bytes(model) <= MODEL_COPIES_BYTES
            tasks = plan_shards(num_rows, shard_size, len(checkpoints), rows_first=rows_first)
            done = {(s["checkpoint"], s["shard"]): s for s in manifest["shards"]}
            stale = cls._stale_bases(out, manifest, len(checkpoints))
            if stale:
                log(f"principal directions of checkpoint(s) {', '.join(str(c + 1) for c in stale)} missing or changed; "
                    "rebuilding their shards")
                manifest["shards"] = [s for s in manifest["shards"] if s["checkpoint"] not in stale]
            todo = []
            for task in tasks:
                record = done.get((task.checkpoint, task.shard))
                path = out / task.relative_path
                if record is not None and path.is_file() and sha256_file(path) == record["sha256"]:
                    continue
                if record is not None:
                    log(f"{task.relative_path}: missing or its checksum does not match; rebuilding it")
                    manifest["shards"].remove(record)
                todo.append(task)
            if tasks and not todo:
                log("all shards complete")
            elif len(todo) < len(tasks):
                log(f"resuming: {len(tasks) - len(todo)} of {len(tasks)} shards already complete")

            cls._prepare_bases(out, manifest, model, chosen, loss, checkpoints, spec, hrt, batch_size, device, todo, log)
            previous = manifest.pop("reusable_index", None)
            search_index = None
            if not todo and previous is not None and previous["type"] == index_type and _index_file_unchanged(out, previous):
                log(f"the {index_type} index is up to date")
                manifest["index"] = previous
            else:
                worker = _ShardWorker(out, model, manifest, checkpoints, spec, dtype, batch_size, hrt.to(device), device,
                                      all_checkpoints=rows_first)  # fmt: skip
                search_index = cls._compute(out, manifest, tasks, todo, worker, executor or map, index_type, rows_first,
                                            progress)  # fmt: skip
                search_index.save(out / FAISS_INDEX)
                stat = (out / FAISS_INDEX).stat()
                manifest["index"] = {"type": index_type, "file": FAISS_INDEX, "dim": search_index.dim,
                                     "ntotal": search_index.ntotal, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}  # fmt: skip
            manifest["complete"] = True
            write_manifest(out, manifest)
        opened = cls._open(out, device=device, allow_pickle=allow_pickle, search_index=search_index)
        opened._run, opened._selection = run, chosen  # the model is loaded already
        return opened

    @staticmethod
    def _start_manifest(out: Path, inputs: dict, settings: dict, index_type: str, log) -> dict:
        path = out / MANIFEST
        if path.is_file():
            manifest = read_manifest(out)
            for key, wanted in (("inputs", inputs), ("settings", settings)):
                difference = _first_difference(manifest.get(key), wanted)
                if difference:
                    raise InputError(
                        f"{out} holds an index built differently: {key}.{difference}; use another --out, or delete it"
                    )
            # an index from a finished build may be kept if no shard changes; "complete" is cleared on
            # disk first, so a build killed after changing shards never keeps a stale index
            manifest["reusable_index"] = manifest.get("index") if manifest.get("complete") else None
            manifest["complete"] = False
            manifest["index"] = None
            write_manifest(out, manifest)
            return manifest
        if any(p.name not in {".lock"} for p in out.iterdir()):
            raise InputError(f"{out}: exists and is not an index directory; choose an empty or new --out")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "tracin_index_version": __version__,
            "inputs": inputs,
            "settings": settings,
            "loss": settings["loss"],
            "projection": settings["projection"],
            "index": None,
            "requested_index_type": index_type,
            "shards": [],
            "complete": False,
        }
        write_manifest(out, manifest)
        return manifest

    @staticmethod
    def _stale_bases(out: Path, manifest: dict, num_checkpoints: int) -> list[int]:
        recorded = manifest.setdefault("bases", {})
        stale = []
        for c in range(num_checkpoints):
            digest = recorded.get(str(c))
            if digest is None:
                continue
            path = bases_path(out, c)
            if not path.is_file() or sha256_file(path) != digest:
                stale.append(c)
                del recorded[str(c)]
        return stale

    @staticmethod
    def _prepare_bases(out, manifest, model, selection, loss, checkpoints, spec, hrt, batch_size, device, todo, log):
        """Fit each checkpoint's principal directions once, before its shards (they must all use the same)."""
        if not GradientProjector(selection, spec, 0).needs_bases:
            return
        rng = np.random.default_rng(spec.seed)
        sample_rows = np.sort(rng.choice(len(hrt), size=min(len(hrt), PRINCIPAL_SAMPLE), replace=False))
        sample = hrt[torch.as_tensor(sample_rows)].to(device)
        computer = GradientComputer(model, selection, loss)
        for c in sorted({t.checkpoint for t in todo}):
            if str(c) in manifest["bases"] and bases_path(out, c).is_file():
                continue
            checkpoints[c].load_into(model)
            log(f"checkpoint {c + 1}: fitting principal directions of the layer inputs on {len(sample):,} triples")
            bases = fit_principal_bases(selection, spec, computer, sample, batch_size)
            manifest["bases"][str(c)] = write_bases(out, c, bases)
            write_manifest(out, manifest)

    @staticmethod
    def _compute(out: Path, manifest: dict, tasks: list[ShardTask], todo: list[ShardTask], worker, executor,
                 index_type: str, rows_first: bool, progress: bool) -> InnerProductIndex:  # fmt: skip
        """Run the shard tasks still to do through ``executor`` and feed every row, checkpoints side by
        side, to a new FAISS index (the only thing held whole in memory); returns the index.

        Rows first, a row range goes to FAISS as soon as its last checkpoint is computed (vectors that
        the executor returns, or that earlier builds wrote); checkpoint first, the shards are read
        back once all are written. An ``ivf`` index only assigns rows to lists on the way and adds
        them in a second read of the shards, into lists of their exact sizes.
        """
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        num_checkpoints = len({t.checkpoint for t in tasks})
        ranges = sorted({(t.shard, t.row_start, t.row_stop) for t in tasks})
        feeder = _IndexFeeder(manifest["projection"]["dim_per_checkpoint"] * num_checkpoints, index_type,
                              num_rows=ranges[-1][2] if ranges else 0)  # fmt: skip
        pending = {(t.checkpoint, t.shard) for t in todo}
        computed: dict[tuple[int, int], np.ndarray] = {}

        def pieces(shard: int) -> Iterator[np.ndarray]:
            """One row range, checkpoints side by side, in float32 pieces of at most FEED_BYTES (one
            buffer, reused: FAISS copies each piece); converted in torch (numpy's float16 -> float32 is slow)."""
            parts = [computed.pop((c, shard), None) for c in range(num_checkpoints)]
            parts = [p if p is not None else read_shard(out / ShardTask(c, shard, 0, 0).relative_path)[0]
                     for c, p in enumerate(parts)]  # fmt: skip
            rows = len(parts[0])
            step = max(1, min(rows, FEED_BYTES // (4 * feeder.dim)))
            buffer = torch.empty((step, feeder.dim), dtype=torch.float32)
            for start in range(0, rows, step):
                piece = buffer[: min(step, rows - start)]
                offset = 0
                for p in parts:
                    piece[:, offset : offset + p.shape[1]] = torch.from_numpy(p[start : start + step])
                    offset += p.shape[1]
                yield piece.numpy()

        def feed(shard: int) -> None:
            for piece in pieces(shard):
                feeder.add(piece)

        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       disable=not progress, transient=False)  # fmt: skip
        with bar:
            bars = {}
            for c in sorted({t.checkpoint for t in todo}):
                total = sum(t.row_stop - t.row_start for t in todo if t.checkpoint == c)
                bars[c] = bar.add_task(f"checkpoint {c + 1}/{num_checkpoints}", total=total)
            next_range = 0
            for task, digest, vectors in executor(worker, todo):
                manifest["shards"].append({
                    "checkpoint": task.checkpoint, "shard": task.shard, "file": task.relative_path,
                    "row_start": task.row_start, "row_stop": task.row_stop, "sha256": digest,
                })  # fmt: skip
                manifest["shards"].sort(key=lambda s: (s["checkpoint"], s["shard"]))
                write_manifest(out, manifest)
                bar.advance(bars[task.checkpoint], task.row_stop - task.row_start)
                pending.discard((task.checkpoint, task.shard))
                if rows_first:
                    computed[(task.checkpoint, task.shard)] = vectors
                    # feed every row range whose checkpoints are all on hand, in row order
                    while next_range < len(ranges) and not any((c, ranges[next_range][0]) in pending
                                                               for c in range(num_checkpoints)):  # fmt: skip
                        feed(ranges[next_range][0])
                        next_range += 1
                del vectors
            if len(ranges) > next_range:
                reading = bar.add_task("FAISS index", total=ranges[-1][2] - ranges[next_range][1])
                for shard, start, stop in ranges[next_range:]:
                    feed(shard)
                    bar.advance(reading, stop - start)

            def pieces_again() -> Iterator[np.ndarray]:
                adding = bar.add_task("FAISS lists", total=ranges[-1][2] if ranges else 0)
                for shard, start, stop in ranges:
                    yield from pieces(shard)
                    bar.advance(adding, stop - start)

            return feeder.finish(pieces_again)

    # ------------------------------------------------------------------------------------------
    # open

    @classmethod
    def open(cls, path: str | os.PathLike, *, device: str | None = None, allow_pickle: bool = False,
             use_gpu: bool | None = None) -> "GradientIndex":  # fmt: skip
        """Open a complete index. The model is loaded when a query first needs it, and refused then if
        its files or the checkpoints changed since the build; a pickled model only with ``allow_pickle``
        (nothing in the index directory can grant that)."""
        return cls._open(Path(path), device=device, allow_pickle=allow_pickle, use_gpu=use_gpu)

    @classmethod
    def _open(cls, directory: Path, *, device: str | None, allow_pickle: bool = False, use_gpu: bool | None = None,
              search_index: InnerProductIndex | None = None) -> "GradientIndex":  # fmt: skip
        """:meth:`open`, with the FAISS index given when the build has just made it (not read back)."""
        from .models import Checkpoint

        manifest = read_manifest(directory)
        if not manifest.get("complete"):
            raise InputError(f"{directory}: the build did not finish; run the same `tracin-index build` again to resume it")
        checkpoints = [
            Checkpoint(path=None if r["path"] is None else Path(r["path"]), epoch=r["epoch"], learning_rate=r["learning_rate"])
            for r in manifest["inputs"]["checkpoints"]
        ]
        hrt, entities, relations = read_triples(directory / TRIPLES) if (directory / TRIPLES).is_file() else (None,) * 3
        if hrt is None:
            raise InputError(f"{directory}: no {TRIPLES}; rebuild the index")
        if search_index is not None:
            search_index.place(use_gpu, what=str(directory / manifest["index"]["file"]))
        return cls(directory, manifest, checkpoints, hrt, entities, relations, device=device or default_device(),
                   allow_pickle=bool(allow_pickle), use_gpu=use_gpu, search_index=search_index)  # fmt: skip

    @staticmethod
    def _check_unchanged(path: Path, digest: str, what: str) -> None:
        if not path.is_file():
            raise InputError(f"{path}: {what} recorded in the index is missing; rebuild the index")
        if sha256_file(path) != digest:
            raise InputError(f"{path}: {what} changed since the index was built (sha256 differs); rebuild the index")

    # ------------------------------------------------------------------------------------------
    # query

    @property
    def num_checkpoints(self) -> int:
        return len(self.checkpoints)

    def _at_checkpoints(self) -> list[tuple[GradientComputer, GradientProjector, float]]:
        """One model copy per checkpoint, loaded once per opened index (queries then load nothing)."""
        if self._models is None:
            self._models = []
            for c, checkpoint in enumerate(self.checkpoints):
                model = self.run.model if checkpoint.path is None else copy.deepcopy(self.run.model)
                checkpoint.load_into(model)
                model = model.to(self.device).eval()
                selection = _selection_from_manifest(model, self.manifest)
                bases = read_bases(self.directory, c) if self.projection.dim else None
                projector = GradientProjector(selection, self.projection, c, self.device, bases=bases)
                self._models.append((GradientComputer(model, selection, self.loss), projector, checkpoint.learning_rate))
        return self._models

    def id_maps(self):
        from .triples import IdMaps

        return IdMaps(
            entity_to_id={label: i for i, label in enumerate(self.entity_labels)},
            relation_to_id={label: i for i, label in enumerate(self.relation_labels)},
        )

    def query_vectors(self, hrt: torch.Tensor) -> np.ndarray:
        """The concatenated sqrt(lr_c)-scaled projected gradients of test triples, (T, index dim), float32."""
        hrt = torch.as_tensor(hrt, dtype=torch.long).view(-1, 3).to(self.device)
        parts = []
        for computer, projector, lr in self._at_checkpoints():
            grads = computer.compute(hrt)
            with torch.no_grad():
                parts.append((projector.project(grads) * math.sqrt(lr)).float().cpu())
        return torch.cat(parts, dim=1).numpy()

    def exact_scores(self, test_hrt: torch.Tensor, train_rows: np.ndarray, batch_size: int = 256) -> torch.Tensor:
        """Exact TracIn (unprojected) of the given training rows on the test triples, (T, len(rows))."""
        test_hrt = torch.as_tensor(test_hrt, dtype=torch.long).view(-1, 3).to(self.device)
        train = torch.as_tensor(self.hrt[np.asarray(train_rows, dtype=np.int64)], dtype=torch.long).to(self.device)
        scores = torch.zeros(test_hrt.shape[0], train.shape[0], dtype=torch.float64)
        for computer, _, lr in self._at_checkpoints():
            g_test = computer.compute(test_hrt)
            for start in range(0, train.shape[0], batch_size):
                g = computer.compute(train[start : start + batch_size])
                scores[:, start : start + batch_size] += lr * g_test.dot(g).double().cpu()
        return scores

    def _row_labels(self) -> "_RowLabels":
        return _RowLabels(self.hrt, self.entity_labels, self.relation_labels)

    def query(
        self,
        triples,
        top_k: int = 10,
        *,
        rerank: int | None = None,
        test_indices: Sequence[int | None] | None = None,
    ) -> list[InfluenceResult]:
        """Top-k proponents and opponents of test triples ((T, 3) ids), from the index.

        ``rerank=K``: take K candidates each way from the index, rescore them exactly at every
        checkpoint and return the exact top-k among them.
        """
        hrt = torch.as_tensor(triples, dtype=torch.long).view(-1, 3)
        if top_k < 1:
            raise InputError(f"top-k must be at least 1, got {top_k}")
        if rerank is not None and rerank < top_k:
            raise InputError(f"--rerank {rerank} must be at least --top-k {top_k}")
        self._check_ids(hrt)
        vectors = self.query_vectors(hrt)
        labels = self._row_labels()
        test_labels = [labels.of(row) for row in hrt.tolist()]
        indices = list(test_indices) if test_indices is not None else [None] * len(hrt)
        results = []
        if rerank:
            proponents, opponents = self.search_index.search_both(vectors, rerank)
            for t in range(len(hrt)):
                rows = np.unique(np.concatenate([proponents.rows[t], opponents.rows[t]]))
                rows = rows[rows >= 0]
                exact = self.exact_scores(hrt[t : t + 1], rows)[0]
                pro, opp = top_influences(exact, top_k, labels, torch.as_tensor(rows))
                results.append(InfluenceResult(indices[t], Triple(*test_labels[t]), pro, opp))
            return results
        proponents, opponents = self.search_index.search_both(vectors, top_k)
        for t in range(len(hrt)):
            results.append(
                InfluenceResult(
                    indices[t],
                    Triple(*test_labels[t]),
                    _influences(proponents.rows[t], proponents.scores[t], labels, +1),
                    _influences(opponents.rows[t], opponents.scores[t], labels, -1),
                )
            )
        return results

    def _check_ids(self, hrt: torch.Tensor) -> None:
        for column, (name, size) in enumerate(
            (("head", len(self.entity_labels)), ("relation", len(self.relation_labels)), ("tail", len(self.entity_labels)))
        ):
            bad = hrt[:, column][(hrt[:, column] < 0) | (hrt[:, column] >= size)]
            if len(bad):
                raise InputError(f"{name} id {int(bad[0])} out of range; valid ids are 0..{size - 1}")

    def self_influences(self) -> np.ndarray:
        """sum_c lr_c ||g(z; theta_c)||^2 for every training row (exact: stored at build time)."""
        total = np.zeros(len(self.hrt), dtype=np.float64)
        for shard in self.manifest["shards"]:
            _, norms = read_shard(self.directory / shard["file"], vectors=False)
            lr = self.checkpoints[shard["checkpoint"]].learning_rate
            total[shard["row_start"] : shard["row_stop"]] += lr * norms
        return total

    def self_influence(self, top_k: int | None = 10) -> list[SelfInfluence]:
        """Training triples by descending self-influence (mislabelled or odd facts tend to rank high)."""
        scores = self.self_influences()
        order = np.argsort(-scores, kind="stable")[: top_k or len(scores)]
        labels = self._row_labels()
        return [SelfInfluence(int(r), *labels[int(r)], float(scores[r])) for r in order]

    def verify(self) -> list[str]:
        """Problems found: shards missing or whose checksum does not match the manifest (empty: all good)."""
        problems = []
        for shard in self.manifest["shards"]:
            path = self.directory / shard["file"]
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif sha256_file(path) != shard["sha256"]:
                problems.append(f"{path}: checksum does not match the manifest (corrupted)")
        record = self.manifest["index"]
        path = self.directory / record["file"]
        if not path.is_file():
            problems.append(f"{path}: missing (run the same `tracin-index build` again to rebuild it from the shards)")
        elif "bytes" in record and path.stat().st_size != record["bytes"]:
            problems.append(f"{path}: {path.stat().st_size:,} bytes, the manifest says {record['bytes']:,} (rebuild it)")
        return problems


class _IndexFeeder:
    """Adds row pieces, in row order, to a new FAISS index.

    ``ivf``: trained first on a random sample of the leading rows (at most :data:`IVF_SAMPLE_ROWS`
    rows and :data:`IVF_SAMPLE_BYTES` bytes, held until then); after that, pieces are only assigned
    to their lists, and :meth:`finish` adds the rows, read again, into lists allocated to their exact
    sizes (lists grown piece by piece would hold up to twice the room they need).
    """

    def __init__(self, dim: int, index_type: str, num_rows: int):
        self.dim = dim
        self.index = InnerProductIndex.create(dim, index_type)
        self.index.reserve(num_rows)
        self._ivf = self.index.needs_training
        self._waiting: list[np.ndarray] | None = [] if self._ivf else None
        self._lists: list[np.ndarray] = []
        self._sample_rows = max(1, min(IVF_SAMPLE_ROWS, IVF_SAMPLE_BYTES // (4 * dim)))

    def add(self, piece: np.ndarray) -> None:
        if not self._ivf:
            self.index.add(piece)
        elif self._waiting is None:
            self._lists.append(self.index.assign(piece))
        else:
            self._waiting.append(piece.copy())  # the caller reuses its buffer
            if sum(len(b) for b in self._waiting) >= self._sample_rows:
                self._train()

    def _train(self) -> None:
        blocks, self._waiting = self._waiting, None
        total = sum(len(b) for b in blocks)
        if total == 0:
            return
        if total <= self._sample_rows:  # every row: the sample is the rows themselves, in order
            sample = np.concatenate(blocks)
            blocks = [sample]
        else:
            picked = np.sort(np.random.default_rng(0).permutation(total)[: self._sample_rows])
            sample = np.empty((len(picked), self.dim), dtype=np.float32)
            filled, lo = 0, 0
            for block in blocks:
                mine = picked[(picked >= lo) & (picked < lo + len(block))] - lo
                np.take(block, mine, axis=0, out=sample[filled : filled + len(mine)])
                filled, lo = filled + len(mine), lo + len(block)
        self.index.train(sample)
        del sample
        self._lists = [self.index.assign(b) for b in blocks]

    def finish(self, pieces_again: Callable[[], Iterable[np.ndarray]]) -> InnerProductIndex:
        """The index, complete; ``pieces_again()`` gives the same pieces once more (``ivf`` reads them)."""
        if not self._ivf:
            return self.index
        if self._waiting is not None:
            self._train()
        if not self._lists:
            return self.index
        lists = np.concatenate(self._lists)
        self._lists = []
        self.index.reserve(len(lists), list_sizes=np.bincount(lists, minlength=self.index.nlist))
        start = 0
        for piece in pieces_again():
            self.index.add(piece, lists=lists[start : start + len(piece)])
            start += len(piece)
        return self.index


def _model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _index_file_unchanged(out: Path, record: dict) -> bool:
    """The FAISS file is the one the manifest records (written atomically: same size and mtime)."""
    path = out / record["file"]
    if not path.is_file() or "bytes" not in record:
        return False
    stat = path.stat()
    return stat.st_size == record["bytes"] and stat.st_mtime_ns == record["mtime_ns"]


def _selection_from_manifest(model, manifest: dict) -> ParameterSelection:
    """The parameter selection the index was built with, found again in ``model``."""
    sel = manifest["settings"]["selection"]
    if sel["mode"] == "names":
        return select_parameters(model, mode="names", names=sel["requested_names"])
    return select_parameters(model, mode=sel["mode"], num_last_layers=sel["num_last_layers"] or 2)


class _RowLabels:
    """Labels of training rows, computed on access (an index may have millions of rows)."""

    def __init__(self, hrt: np.ndarray, entities: list[str], relations: list[str]):
        self.hrt, self.entities, self.relations = hrt, entities, relations

    def of(self, ids: Sequence[int]) -> tuple[str, str, str]:
        h, r, t = ids
        return self.entities[h], self.relations[r], self.entities[t]

    def __getitem__(self, row: int) -> tuple[str, str, str]:
        return self.of(self.hrt[row])


def _influences(rows: np.ndarray, scores: np.ndarray, labels: _RowLabels, sign: int) -> tuple[Influence, ...]:
    """Search hits of the list's sign only (an approximate index may return others), ties by row."""
    found = rows >= 0
    rows, scores = rows[found], scores[found].astype(np.float64)
    return tuple(Influence(int(rows[p]), *labels[int(rows[p])], influence=float(scores[p]))
                 for p in ranked_rows(scores, rows, len(rows), sign))  # fmt: skip
