r"""The build as a plan, tasks and a reduce.

- **Plan** (:class:`Builder`, in the building process): the block plans (:mod:`.plan`), the triples
  file, each checkpoint's principal directions (:mod:`.bases`), and the tasks: checkpoint x range of
  stored rows, one shard file each (:func:`~tracin_index.storage.layout.plan_shard_files`), each naming
  its inputs by digest (:class:`~.task.BuildTask`).
- **Task** (:func:`~.task.run_task`, here or on a Dask worker, :mod:`.runners`): the rows'
  per-example gradients, their stored factors and exact squared norms, written atomically as one
  shard file; returns its record.
- **Reduce** (:meth:`Builder._run_tasks`): each record goes into the manifest as its task completes.

Tasks are independent: a killed build resumes with the same call and skips every shard file whose
checksum matches; a shard or bases file that is missing or damaged is rebuilt, and a checkpoint
whose bases changed has all its shard files rebuilt.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..errors import DiskFullError, InputError
from ..files import disk_full, first_difference, mib
from ..gradients.computer import CheckpointGradients, GradientComputer
from ..kg.directions import examples_per_fact, uses_inverse_triples
from ..kg.replicas import build_replica, replica_agrees, replica_spec
from ..machine import default_device
from ..storage.layout import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    TRIPLES,
    ShardFile,
    another_build,
    bases_path,
    build_running,
    exclusive_lock,
    plan_shard_files,
    read_manifest,
    search_ranges,
    sha256_file,
    write_manifest,
    write_triples,
)
from ..storage.plans import BlockPlan
from ..version import __version__
from ..words import counted
from .bases import CheckpointBases
from .inputs import BuildInputs, inputs_record, load_inputs
from .plan import check_room, describe_plans, estimate_bytes, plan_storage
from .rows import BuildRows
from .runners import LocalRunner, Runner
from .settings import BuildSettings
from .task import BuildTask, build_digest

Progress = Callable[[str, int, int], None]  # (what, done, total)
Log = Callable[[str], None]

#: Rows on which the build checks that a model's plain-torch replica gives its scores and gradients.
REPLICA_CHECK_ROWS = 32


def unchanged(path: Path, digest: str) -> bool:
    return path.is_file() and sha256_file(path) == digest


class Builder:
    """Builds (or resumes) one index directory; see :func:`build_index`."""

    def __init__(self, out: Path, inputs: BuildInputs, settings: BuildSettings, device: str, log: Log, progress: Progress | None,
                 runner: Runner | None = None, allow_pickle: bool = False, index_shards: int | None = None):  # fmt: skip
        self.out, self.inputs, self.settings, self.device = out, inputs, settings, device
        #: where the tasks run: this process by default (see tracin_index.build.runners)
        self.runner = runner or LocalRunner()
        self.allow_pickle = allow_pickle
        self.index_shards = index_shards
        if index_shards is not None and index_shards < 1:
            raise InputError(f"--index-shards must be at least 1, got {index_shards}")
        self.log, self.progress = log, progress or (lambda what, done, total: None)
        model = inputs.run.model.to(device).eval()
        self.selection = settings.select(model)
        GradientComputer(model, self.selection, settings.loss)  # refuses impossible loss/selection pairs now
        # the model as loaded (PyKEEN's), one checkpoint at a time: what the plan is made on
        self.planning = CheckpointGradients(model, inputs.checkpoints, lambda m: self.selection if m is model else settings.select(m),
                                            settings.loss, max_bytes=0)  # fmt: skip
        # the stored rows are the examples the model was trained on: with inverse triples, rows 2i and
        # 2i + 1 are triple i's (h, 2r, t) and (t, 2r + 1, h) (see tracin_index.kg.directions)
        self.per_fact = examples_per_fact(uses_inverse_triples(model))
        self.rows = BuildRows(inputs.hrt, self.per_fact, model.num_relations, settings.seed)

    def run(self) -> dict:
        rows, settings, out = self.rows, self.settings, self.out
        model = self.inputs.run.model
        plans = plan_storage(self.planning, rows, settings, model.num_entities, self.inputs.id_maps, self.device)
        grouped = any(p.grouped for p in plans)
        groups, group_first = rows.pairs() if grouped else (None, None)
        num_groups = len(group_first) if grouped else None
        checkpoints = len(self.planning)
        sizes = estimate_bytes(plans, num_groups or rows.num_rows, rows, checkpoints, self.inputs.id_maps)
        self.log(f"parameters: {self.selection.describe()}")
        self.log(describe_plans(plans, rows.num_rows, num_groups))
        if self.per_fact == 2:
            self.log(f"the model was trained with inverse triples: each training triple is 2 examples, (h, r, t) "
                     f"and (t, r_inv, h); {rows.num_rows:,} stored rows")  # fmt: skip
        self.log(f"{rows.num_triples:,} training triples x {counted(checkpoints, 'checkpoint')}: about {mib(sizes['total'])} "
                 f"({sizes['total'] / (rows.num_triples * checkpoints):,.0f} bytes per triple and checkpoint)")  # fmt: skip
        check_room(out, sizes, plans, rows, model, settings.batch_size, self.log)

        inputs_json = inputs_record(self.inputs, self.planning.checkpoints, out)
        with exclusive_lock(out), self._disk_full_resumes(sizes["total"]):
            if (out / MANIFEST).is_file():  # our index: remove half-written files of a killed build
                for leftover in out.rglob(".tmp-*"):
                    leftover.unlink()
            manifest = self._start_manifest(inputs_json, plans, num_groups)
            if manifest["files"].get(TRIPLES) is None or not unchanged(out / TRIPLES, manifest["files"][TRIPLES]):
                id_maps = self.inputs.id_maps
                manifest["files"][TRIPLES] = write_triples(out / TRIPLES, self.inputs.hrt.numpy(), id_maps.id_to_entity,
                                                           id_maps.id_to_relation, str(self.inputs.training_path), groups)  # fmt: skip
            manifest["replica"], computing = self._replica(groups)
            write_manifest(out, manifest)
            # a shard file holds whole triples (their examples' rows are adjacent), so it can store their exact norms
            shard_rows = settings.shard_size * self.per_fact
            tasks = plan_shard_files(rows.num_rows, shard_rows, checkpoints)
            bases = CheckpointBases(out, computing, rows, groups, settings.seed, settings.batch_size, self.device, self.log)
            self._run_tasks(tasks, manifest, plans, bases)
            if self.index_shards is not None:  # how a cluster splits the search (tracin_index.search.shards); no effect on the files
                manifest["search_shards"] = [list(r) for r in search_ranges(rows.num_triples, self.index_shards)]
            manifest["complete"] = True
            write_manifest(out, manifest)
        return manifest

    @contextlib.contextmanager
    def _disk_full_resumes(self, total: int):
        """Something else took the space after :func:`check_room`: say how much more the index needs and that the
        same command resumes (the files already recorded are intact: each is written whole, then recorded)."""
        try:
            yield
        except DiskFullError as error:
            written = sum(p.stat().st_size for p in self.out.rglob("*") if p.is_file() and not p.name.startswith(".tmp-"))
            raise disk_full(error.path, error.free, f"the index needs about {mib(max(0, total - written))} more; free "
                            "that and run the same command: it resumes after the files already written") from None  # fmt: skip

    def _replica(self, groups: np.ndarray | None) -> tuple[dict | None, CheckpointGradients]:
        """The spec of a plain-torch replica of the model that gives its scores and gradients, if there is
        one, and the gradients the build computes from here on: the replica's (without PyKEEN's per-call
        overhead, and for ConvE's last layers the layers before them once per (head, relation) pair),
        else the model's own."""
        if self.inputs.run.config is None:  # a pickle: queries load it through PyKEEN (with --allow-pickle) anyway
            return None, self.planning
        model = self.planning.computer(0).model
        spec = replica_spec(model)
        if spec is None:
            return None, self.planning
        check = self.rows.examples[torch.as_tensor(self.rows.sample[:REPLICA_CHECK_ROWS])].to(self.device)
        replica = build_replica(spec).to(self.device)

        def gradients_of(m):
            return GradientComputer(m, self.settings.select(m), self.settings.loss).compute_examples(check)

        if not replica_agrees(replica, model, check, gradients_of):
            return None, self.planning
        computing = CheckpointGradients(replica, self.inputs.checkpoints, self.settings.select, self.settings.loss,
                                        per_pair=groups is not None, max_bytes=0)  # fmt: skip
        return spec, computing

    def _todo(self, tasks: list[ShardFile], manifest: dict) -> list[ShardFile]:
        """The shard files not recorded intact (a damaged or missing one is dropped from the manifest)."""
        done = {(s["checkpoint"], s["shard"]): s for s in manifest["shards"]}
        todo = []
        for task in tasks:
            record = done.get((task.checkpoint, task.shard))
            if record is not None and unchanged(self.out / task.relative_path, record["sha256"]):
                continue
            if record is not None:
                self.log(f"{task.relative_path}: missing or its checksum does not match; rebuilding it")
                manifest["shards"] = [s for s in manifest["shards"] if s is not record]
            todo.append(task)
        for c in sorted({t.checkpoint for t in tasks}):
            mine = [t for t in tasks if t.checkpoint == c]
            left = sum(t.checkpoint == c for t in todo)
            if 0 < left < len(mine):
                self.log(f"checkpoint {c + 1}: resuming, {len(mine) - left} of {len(mine)} shards already complete")
        return todo

    def _run_tasks(self, shards: list[ShardFile], manifest: dict, plans: list[BlockPlan], bases: CheckpointBases) -> None:
        """Checkpoint by checkpoint: its principal directions (read, or fitted from the previous
        checkpoint's: refitting makes its recorded shard files stale), then the tasks of its shard files
        not recorded intact, run here or on the runner's cluster (there the building process fits the
        next checkpoint's directions while the workers run this one's tasks); and reduce: record each
        shard file in the manifest as it completes, so that a build killed at any point resumes from
        what is recorded."""
        build = build_digest(manifest)
        directory = str(self.out.resolve())
        checkpoints = len(bases.gradients)
        totals: dict[int, int] = {}
        done_rows: dict[int, int] = {}

        def batches() -> Iterator[list[BuildTask]]:
            for c in range(checkpoints):
                bases.at(c, plans, manifest)
                write_manifest(self.out, manifest)
                todo = self._todo([s for s in shards if s.checkpoint == c], manifest)
                totals[c], done_rows[c] = sum(s.row_stop - s.row_start for s in todo), 0
                if todo:
                    self.progress(f"checkpoint {c + 1}/{checkpoints}", 0, totals[c])
                yield [BuildTask(directory, shard, build, manifest["files"].get(bases_path(c)), self.device,
                                 self.runner.threads, self.allow_pickle) for shard in todo]  # fmt: skip

        for task, record in self.runner.run(batches()):
            shard = task.shard
            manifest["shards"].append(record)
            manifest["shards"].sort(key=lambda s: (s["checkpoint"], s["shard"]))
            done_rows[shard.checkpoint] += shard.row_stop - shard.row_start
            complete = done_rows[shard.checkpoint] == totals[shard.checkpoint]
            # durable at checkpoint boundaries, atomic after every shard file
            write_manifest(self.out, manifest, durable=complete)
            self.progress(f"checkpoint {shard.checkpoint + 1}/{checkpoints}", done_rows[shard.checkpoint], totals[shard.checkpoint])

    def _start_manifest(self, inputs: dict, plans: list[BlockPlan], num_groups: int | None) -> dict:
        settings = self.settings.to_json()
        plans_json = [p.to_json() for p in plans]
        path = self.out / MANIFEST
        if path.is_file():
            manifest = read_manifest(self.out)
            for key, wanted in (("inputs", inputs), ("settings", settings), ("plans", plans_json)):
                difference = first_difference(manifest.get(key), wanted)
                if difference:
                    raise InputError(f"{self.out} holds an index built differently: {key}.{difference}; "
                                     "use another --out, or delete it")  # fmt: skip
            manifest["complete"] = False
            write_manifest(self.out, manifest)
            return manifest
        if any(p.name != ".lock" for p in self.out.iterdir()):
            raise InputError(f"{self.out}: exists and is not an index directory; choose an empty or new --out")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "tracin_index_version": __version__,
            "inputs": inputs,
            "settings": settings,
            "selection": self.selection.to_json(),
            "plans": plans_json,
            "num_groups": num_groups,
            # a training triple's stored rows: 2 for a model trained with inverse triples (see tracin_index.kg.directions)
            "examples_per_triple": self.per_fact,
            # stored rows (examples), not triples: the format's name for them
            "num_rows": self.rows.num_rows,
            "files": {},
            "shards": [],
            "complete": False,
        }
        write_manifest(self.out, manifest)
        return manifest


def build_index(out: str | os.PathLike, *, model_path, allow_pickle: bool = False, training_path=None,
                checkpoint_paths: Sequence | None = None, entity_to_id=None, relation_to_id=None,
                settings: BuildSettings | None = None, device: str | None = None, log: Log | None = None,
                progress: Progress | None = None, runner: Runner | None = None,
                index_shards: int | None = None) -> tuple[Path, BuildInputs]:  # fmt: skip
    """Build (or resume building) the index directory ``out``; returns it and the loaded inputs. ``runner``:
    where the tasks run (:mod:`tracin_index.build.runners`; default this process). ``index_shards``: the
    search shards a cluster holds the index in (:mod:`tracin_index.search.shards`)."""
    log = log or (lambda message: None)
    settings = settings or BuildSettings()
    device = device or default_device()
    if build_running(Path(out)):  # refused before loading anything (the lock is taken once the plan is made)
        raise another_build(Path(out))
    inputs = load_inputs(model_path=model_path, allow_pickle=allow_pickle, training_path=training_path,
                         checkpoint_paths=checkpoint_paths, entity_to_id=entity_to_id, relation_to_id=relation_to_id,
                         log=log)  # fmt: skip
    builder = Builder(Path(out), inputs, settings, device, log, progress, runner, allow_pickle, index_shards)
    builder.run()
    return Path(out), inputs
