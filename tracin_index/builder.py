r"""The build as a plan, a task and a reducer.

- **Plan** (:class:`Builder`, in the building process): settings validated once, the block plans
  (:func:`tracin_index.factors.plan_blocks`), the triples file, each checkpoint's principal
  directions (fitted on a seeded sample of training rows, each checkpoint starting from the previous
  one's, stored in ``bases/``), and the tasks: checkpoint x range of training rows
  (:func:`tracin_index.store.plan_shards`), each naming its inputs by digest
  (:class:`~tracin_index.tasks.ShardJob`).
- **Task** (:func:`tracin_index.tasks.run_job`, here or on a Dask worker, :mod:`tracin_index.cluster`):
  the rows' per-example gradients, their stored factors and exact squared norms, written atomically
  as one shard file; returns its record.
- **Reduce** (:meth:`Builder._run_tasks`): each record goes into the manifest as its task completes.

Tasks are independent: a killed build resumes with the same call and skips every shard whose
checksum matches; a shard or bases file that is missing or damaged is rebuilt, and a checkpoint
whose bases changed has all its shards rebuilt.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from . import __version__
from .checkpoints import Checkpoint, CheckpointModels
from .errors import InputError, VanishingGradientError
from .files import available_memory
from .factors import DEFAULT_SKETCH_DIM, BlockPlan, plan_blocks, sketch_sample, sketched_sides
from .directions import examples_per_fact, training_examples, uses_inverse_triples
from .gradients import LOSSES, GradientComputer, linear_inputs, vanished, vanishing_message
from .layers import ParameterSelection, select_parameters
from .sketch import Basis, dequantize, fit_basis, quantize, read_bases, stable_seed
from .cluster import LocalRunner, Runner
from .tasks import ShardJob, build_digest
from .store import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    TRIPLES,
    ShardTask,
    bases_path,
    exclusive_lock,
    plan_shards,
    read_arrays,
    read_manifest,
    relative_path,
    sha256_file,
    write_arrays,
    write_manifest,
    write_triples,
)

DEFAULT_SHARD_SIZE = 16384
#: Training rows whose factors define a checkpoint's principal directions: at least this many, and
#: SAMPLE_PER_DIRECTION per direction (fewer for very wide sides) ...
SKETCH_SAMPLE = 1024
SAMPLE_PER_DIRECTION = 8
#: ... and at most this many bytes of sampled factors per side. (A ConvE on 100k planted triples, inputs
#: held out: 256 directions fitted on 1,024 rows keep 0.81 of their energy, on 4,096 rows 0.84; 512
#: directions 0.89 and 0.92.)
SKETCH_SAMPLE_BYTES = 256 * 2**20
#: With the default sketch dim, sides whose 128 directions leave more than this share of the sampled
#: inputs' energy get 256 (UMLS ConvE: 0.03 left; a ConvE on 100k planted triples: 0.45) ...
AUTO_RESIDUAL = 0.1
WIDE_SKETCH_DIM = 256
#: ... and those that 256 still leave more than AUTO_RESIDUAL out get 512 where the extra coordinates
#: cost each checkpoint's scan at most WIDEST_SCAN_BYTES and keep the index under WIDEST_BYTES per
#: stored row and checkpoint. Looser bounds cost a query refinements (about 30 us per row and
#: checkpoint) whose number does not grow with the graph, while the scan does: on the 100k planted
#: ConvE, 512 directions cut the rows refined per query from ~270 to ~100 (and the query's p50 from 83
#: to 60 ms), where the 1M graph, refining ~125 rows with 256, would pay ~30 ms more of scan.
WIDEST_SKETCH_DIM = 512
WIDEST_SCAN_BYTES = 64 * 2**20
WIDEST_BYTES = 1536
#: Rows on which the build checks its plan (grouping, derived sides) and that gradients do not vanish.
CHECK_ROWS = 64

Progress = Callable[[str, int, int], None]  # (what, done, total)
Log = Callable[[str], None]


@dataclass(frozen=True)
class BuildSettings:
    """What defines an index besides its inputs; validated once, recorded in the manifest."""

    selection: str = "last"  # last | all | names
    num_last_layers: int = 2
    layer_names: tuple[str, ...] = ()
    loss: str = "bce"
    #: principal directions of a sketched side; None: 128, or 256 where 128 leave more than
    #: AUTO_RESIDUAL of the sampled inputs' energy out (inputs far from low-rank: looser bounds, more rescoring)
    sketch_dim: int | None = None
    seed: int = 0
    batch_size: int = 256
    shard_size: int = DEFAULT_SHARD_SIZE
    #: store a Linear layer's input once per (head, relation) pair where it depends on nothing else (ConvE)
    share_pairs: bool = True

    def __post_init__(self):
        if self.selection not in ("last", "all", "names"):
            raise InputError(f"unknown parameter selection {self.selection!r}; valid: last, all, names")
        if self.selection == "names" and not self.layer_names:
            raise InputError("no layer names given; pass module or parameter names, e.g. interaction.hr1d.0")
        if self.loss not in LOSSES:
            raise InputError(f"unknown loss {self.loss!r}; valid: {', '.join(LOSSES)}")
        for name in ("num_last_layers", "sketch_dim", "batch_size", "shard_size"):
            value = getattr(self, name)
            if name == "sketch_dim" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name.replace('_', '-')} must be a positive whole number, got {value!r}")

    def to_json(self) -> dict:
        return {**asdict(self), "layer_names": list(self.layer_names)}

    def select(self, model: torch.nn.Module) -> ParameterSelection:
        if self.selection == "names":
            return select_parameters(model, mode="names", names=list(self.layer_names))
        return select_parameters(model, mode=self.selection, num_last_layers=self.num_last_layers)


def selection_from_manifest(model: torch.nn.Module, manifest: dict) -> ParameterSelection:
    """The parameter selection an index was built with, found again in ``model``."""
    settings = manifest["settings"]
    return BuildSettings(**{**settings, "layer_names": tuple(settings["layer_names"])}).select(model)


@dataclass
class _Inputs:
    """The build's inputs, loaded: model, checkpoints, training ids, id maps and where they came from."""

    run: Any
    model_path: Path
    training_path: Path
    checkpoints: list[Checkpoint]
    hrt: torch.Tensor
    id_maps: Any
    fingerprints: dict = field(default_factory=dict)


def _model_files(source: Path) -> list[Path]:
    """The files whose bytes define the model as loaded from ``source``."""
    if source.is_dir():
        return [p for p in (source / "config.json", source / "model.pt", source / "trained_model.pkl") if p.is_file()]
    return [source]


def fingerprint_ids(hrt: np.ndarray) -> str:
    """The training triples' ids as the manifest fingerprints them (sha256 of the int64 (n, 3) array)."""
    return hashlib.sha256(np.ascontiguousarray(hrt, dtype=np.int64).tobytes()).hexdigest()


def _first_difference(recorded: Any, wanted: Any, path: str = "") -> str | None:
    """The first key path where two JSON values differ, e.g. ``settings.sketch_dim``."""
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


def group_rows(hrt: np.ndarray, num_relations: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's (head, relation) group, numbered in order of first appearance, and each group's first row.

    Numbered that way, the groups first seen in a range of rows are a range of group ids, so each
    shard stores the input sides of a contiguous block of groups.
    """
    keys = hrt[:, 0].astype(np.int64) * max(1, num_relations) + hrt[:, 1]
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    renumber = np.empty_like(order)
    renumber[order] = np.arange(len(order))
    return renumber[inverse.reshape(-1)], first[order]


class Builder:
    """Builds (or resumes) one index directory; see :func:`build_index`."""

    def __init__(self, out: Path, inputs: _Inputs, settings: BuildSettings, device: str, log: Log, progress: Progress | None,
                 runner: "Runner | None" = None, allow_pickle: bool = False, index_shards: int | None = None):  # fmt: skip
        self.out, self.inputs, self.settings, self.device = out, inputs, settings, device
        #: where the shard tasks run: this process by default (see tracin_index.cluster)
        self.runner = runner or LocalRunner()
        self.allow_pickle = allow_pickle
        self.index_shards = index_shards
        if index_shards is not None and index_shards < 1:
            raise InputError(f"--index-shards must be at least 1, got {index_shards}")
        self.log, self.progress = log, progress or (lambda what, done, total: None)
        model = inputs.run.model.to(device).eval()
        self.selection = settings.select(model)
        GradientComputer(model, self.selection, settings.loss)  # refuses impossible loss/selection pairs now
        # one model at a time: the build goes checkpoint by checkpoint
        self.models = CheckpointModels(model, inputs.checkpoints, max_bytes=0)
        # the stored rows are the examples the model was trained on: with inverse triples, rows 2i and
        # 2i + 1 are fact i's (h, 2r, t) and (t, 2r + 1, h) (see tracin_index.directions)
        self.per_fact = examples_per_fact(uses_inverse_triples(model))
        self.examples = training_examples(inputs.hrt, self.per_fact == 2)
        self.num_facts = int(inputs.hrt.shape[0])
        self.num_rows = int(self.examples.shape[0])
        rng = np.random.default_rng(stable_seed(settings.seed, "sample"))
        self.sample_rows = np.sort(rng.choice(self.num_rows, size=min(self.num_rows, SKETCH_SAMPLE), replace=False))
        self._computers: dict[int, GradientComputer] = {}
        self._halves: dict[int, dict[tuple[str, str], torch.Tensor]] = {}  # the last fitted bases: the next start
        self.groups: np.ndarray | None = None
        self._pair_groups: tuple[np.ndarray, np.ndarray] | None = None
        self._more_samples: dict[int, np.ndarray] = {}

    def computer(self, c: int) -> GradientComputer:
        model = self.models.model(c)
        if c not in self._computers or self._computers[c].model is not model:
            self._computers = {c: GradientComputer(model, self.selection, self.settings.loss)}
        return self._computers[c]

    # -- the plan -----------------------------------------------------------------------------

    def plan(self) -> list[BlockPlan]:
        """Block plans from checks at the first checkpoint; refuses gradients that vanish everywhere."""
        check = self.examples[torch.as_tensor(self.sample_rows[:CHECK_ROWS])].to(self.device)
        self.computer(0).check(check[:8])
        def plan_with(dim: int) -> list[BlockPlan]:
            return plan_blocks(self.models.model(0), self.selection, self.computer(0), check, self.inputs.run.model.num_entities,
                               dim, self.settings.seed, share_pairs=self.settings.share_pairs)  # fmt: skip

        plans = plan_with(self.settings.sketch_dim or DEFAULT_SKETCH_DIM)
        if self.settings.sketch_dim is None and self._residual_energy(plans) > AUTO_RESIDUAL:
            plans = plan_with(WIDE_SKETCH_DIM)
            widest = plan_with(WIDEST_SKETCH_DIM)
            if self._affordable(widest) and self._residual_energy(plans) > AUTO_RESIDUAL:
                plans = widest
        norms = torch.zeros(len(check), dtype=torch.float64)
        for c in sorted({0, len(self.models) - 1}):
            norms += self.computer(c).compute_examples(check).squared_norms().double().cpu()
            if not bool(torch.isfinite(norms).all()):
                raise InputError(_not_finite(c, "sampled training triples"))
        if bool(vanished(norms).all()):
            raise VanishingGradientError(vanishing_message(f"all {len(check)} sampled training examples", self.settings.loss))
        return plans

    def _affordable(self, plans: list[BlockPlan]) -> bool:
        """Whether ``plans`` keep each checkpoint's scan of the sketched sides within WIDEST_SCAN_BYTES
        and the index within WIDEST_BYTES per stored row and checkpoint (see WIDEST_SKETCH_DIM)."""
        stored = self.num_rows
        if any(p.grouped for p in plans):
            stored = len(self._pairs()[1])
        scan = sum(stored if p.grouped else self.num_rows for p in plans for _, _, dim in p.sides() if dim)
        scan_bytes = 2 * scan * max((dim for p in plans for _, _, dim in p.sides()), default=0)
        total = self.estimate_bytes(plans, stored)["total"]
        return scan_bytes <= WIDEST_SCAN_BYTES and total <= WIDEST_BYTES * self.num_rows * len(self.models)

    def _pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """:func:`group_rows` of the stored rows, computed once (the plan's size check and the build use it)."""
        if self._pair_groups is None:
            self._pair_groups = group_rows(self.examples.numpy(), self.inputs.run.model.num_relations)
        return self._pair_groups

    def _sample_rows(self, dim: int, wide: int) -> np.ndarray:
        """The sampled rows for a side of ``dim`` directions and ``wide`` numbers: :attr:`sample_rows`, with
        more rows (seeded, drawn from the rest; drawn once per size) for many directions, fewer for very
        wide sides."""
        size = min(self.num_rows, max(SKETCH_SAMPLE, SAMPLE_PER_DIRECTION * dim), max(1, SKETCH_SAMPLE_BYTES // (4 * wide)))
        if size <= len(self.sample_rows):
            return self.sample_rows[:size]
        if size not in self._more_samples:
            rest = np.setdiff1d(np.arange(self.num_rows), self.sample_rows, assume_unique=True)
            rng = np.random.default_rng(stable_seed(self.settings.seed, "sample", "more"))
            more = rng.choice(rest, size=size - len(self.sample_rows), replace=False)
            self._more_samples[size] = np.sort(np.concatenate([self.sample_rows, more]))
        return self._more_samples[size]

    def _residual_energy(self, plans: list[BlockPlan]) -> float:
        """The largest share of the sampled inputs' energy that the planned sketches leave out, at the
        first checkpoint (0 when nothing is sketched)."""
        wanted = sketched_sides(plans)
        if not wanted:
            return 0.0
        worst = 0.0
        for key, sample in self._sketch_sample(0, plans, wanted).items():
            fitted = fit_basis(sample, wanted[key], stable_seed(self.settings.seed, "basis", 0, *key))
            basis = Basis.from_matrix(dequantize(**quantize(fitted)))
            _, rho = basis.sketch(sample)
            worst = max(worst, float(rho.pow(2).sum() / sample.double().pow(2).sum().clamp_min(1e-300)))
        return worst

    def estimate_bytes(self, plans: list[BlockPlan], num_groups: int) -> dict[str, float]:
        per_group = self.num_rows / max(1, num_groups)
        checkpoints = len(self.models)
        shards = checkpoints * (8 * self.num_facts + self.num_rows * sum(p.row_bytes(per_group) for p in plans))
        bases = checkpoints * sum(dim * (size + 4) for p in plans for _, size, dim in p.sides() if dim)  # int8 + a scale per row
        labels = sum(len(x) + 8 for x in self.inputs.id_maps.entity_to_id) + sum(
            len(x) + 8 for x in self.inputs.id_maps.relation_to_id
        )
        triples = self.num_facts * 24 + self.num_rows * (8 if any(p.grouped for p in plans) else 0) + labels
        return {"shards": shards, "bases": bases, "triples": triples, "total": shards + bases + triples}

    # -- running it ---------------------------------------------------------------------------

    def replica(self) -> dict | None:
        """The spec of a plain-torch replica of the model that gives its scores and gradients, if there is one."""
        from .replicas import build_replica, pair_forward_applies, replica_agrees, replica_spec

        if self.inputs.run.config is None:  # a pickle: queries load it through PyKEEN (with --allow-pickle) anyway
            return None
        model = self.models.model(0)
        spec = replica_spec(model)
        if spec is None:
            return None
        check = self.examples[torch.as_tensor(self.sample_rows[:32])].to(self.device)
        replica = build_replica(spec).to(self.device)

        def gradients_of(m):
            return GradientComputer(m, self.settings.select(m), self.settings.loss).compute_examples(check)

        if not replica_agrees(replica, model, check, gradients_of):
            return None
        # the replica gives the same gradients without PyKEEN's per-call overhead, and for ConvE's last
        # layers computes the layers before them once per (head, relation) pair: the build uses it from here on
        self.models = CheckpointModels(replica, self.inputs.checkpoints, max_bytes=0)
        self.selection = self.settings.select(replica)
        replica.pair_forward = self.groups is not None and pair_forward_applies(replica, self.selection)
        self._computers = {}
        return spec

    def run(self) -> dict:
        plans = self.plan()
        grouped = any(p.grouped for p in plans)
        hrt_np = self.inputs.hrt.numpy()
        groups, group_first = self._pairs() if grouped else (None, None)
        self.groups = groups
        sizes = self.estimate_bytes(plans, len(group_first) if grouped else self.num_rows)
        checkpoints = len(self.models)
        self.log(f"parameters: {self.selection.describe()}")
        self.log(_describe_plans(plans, self.num_rows, len(group_first) if grouped else None))
        if self.per_fact == 2:
            self.log(f"the model was trained with inverse triples: each training triple is 2 examples, (h, r, t) "
                     f"and (t, r_inv, h); {self.num_rows:,} stored rows")  # fmt: skip
        self.log(f"{self.num_facts:,} training triples x {checkpoints} checkpoint(s): about {_mib(sizes['total'])} "
                 f"({sizes['total'] / (self.num_facts * checkpoints):,.0f} bytes per triple and checkpoint)")  # fmt: skip
        self._check_room(sizes, plans)

        inputs_json = self._inputs_json()
        with exclusive_lock(self.out):
            if (self.out / MANIFEST).is_file():  # our index: remove half-written files of a killed build
                for leftover in self.out.rglob(".tmp-*"):
                    leftover.unlink()
            manifest = self._start_manifest(inputs_json, plans, len(group_first) if grouped else None)
            if manifest["files"].get(TRIPLES) is None or not _unchanged(self.out / TRIPLES, manifest["files"][TRIPLES]):
                ids_maps = self.inputs.id_maps
                manifest["files"][TRIPLES] = write_triples(self.out / TRIPLES, hrt_np, ids_maps.id_to_entity,
                                                           ids_maps.id_to_relation, str(self.inputs.training_path), groups)  # fmt: skip
            manifest["replica"] = self.replica()
            write_manifest(self.out, manifest)
            # a shard holds whole facts (their examples' rows are adjacent), so it can store their exact norms
            shard_rows = self.settings.shard_size * self.per_fact
            tasks = plan_shards(self.num_rows, shard_rows, checkpoints)
            self._run_tasks(tasks, manifest, plans)
            if self.index_shards is not None:  # how a cluster splits the search (tracin_index.sharded); no effect on the files
                from .sharded import search_ranges

                manifest["search_shards"] = [list(r) for r in search_ranges(self.num_facts, self.index_shards)]
            manifest["complete"] = True
            write_manifest(self.out, manifest)
        return manifest

    def _todo(self, tasks: list[ShardTask], manifest: dict) -> list[ShardTask]:
        """The tasks whose shard is not recorded intact (a damaged or missing one is dropped from the manifest)."""
        done = {(s["checkpoint"], s["shard"]): s for s in manifest["shards"]}
        todo = []
        for task in tasks:
            record = done.get((task.checkpoint, task.shard))
            if record is not None and _unchanged(self.out / task.relative_path, record["sha256"]):
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

    def _run_tasks(self, tasks: list[ShardTask], manifest: dict, plans: list[BlockPlan]) -> None:
        """Checkpoint by checkpoint: its principal directions (read, or fitted from the previous
        checkpoint's: refitting makes its recorded shards stale), then the tasks of its shards not
        recorded intact, run here or on the runner's cluster (there the building process fits the next
        checkpoint's directions while the workers run this one's tasks); and reduce: record each shard
        in the manifest as it completes, so that a build killed at any point resumes from what is recorded."""
        build = build_digest(manifest)
        directory = str(self.out.resolve())
        checkpoints = len(self.models)
        totals: dict[int, int] = {}
        done_rows: dict[int, int] = {}

        def batches() -> Iterator[list[ShardJob]]:
            for c in range(checkpoints):
                self._bases(c, plans, manifest)
                write_manifest(self.out, manifest)
                todo = self._todo([t for t in tasks if t.checkpoint == c], manifest)
                totals[c], done_rows[c] = sum(t.row_stop - t.row_start for t in todo), 0
                if todo:
                    self.progress(f"checkpoint {c + 1}/{checkpoints}", 0, totals[c])
                yield [ShardJob(directory, task, build, manifest["files"].get(bases_path(c)), self.device,
                                self.runner.threads, self.allow_pickle) for task in todo]  # fmt: skip

        for job, record in self.runner.run(batches()):
            task = job.task
            manifest["shards"].append(record)
            manifest["shards"].sort(key=lambda s: (s["checkpoint"], s["shard"]))
            done_rows[task.checkpoint] += task.row_stop - task.row_start
            complete = done_rows[task.checkpoint] == totals[task.checkpoint]
            # durable at checkpoint boundaries (15 ms each), atomic after every shard
            write_manifest(self.out, manifest, durable=complete)
            self.progress(f"checkpoint {task.checkpoint + 1}/{checkpoints}", done_rows[task.checkpoint], totals[task.checkpoint])

    def _bases(self, c: int, plans: list[BlockPlan], manifest: dict) -> dict[tuple[str, str], Basis]:
        """Checkpoint c's principal directions: read when intact, else fitted again (and then every shard
        of the checkpoint is stale: they were sketched on the old directions)."""
        wanted = sketched_sides(plans)
        if not wanted:
            return {}
        name = bases_path(c)
        digest = manifest["files"].get(name)
        if digest is not None and _unchanged(self.out / name, digest):
            self._halves = {c: read_bases(read_arrays(self.out / name), wanted)}
            return {key: Basis.from_matrix(matrix, self.device) for key, matrix in self._halves[c].items()}
        stale = [s for s in manifest["shards"] if s["checkpoint"] == c]
        if digest is not None or stale:
            self.log(f"{name}: missing or changed; fitting it again and rebuilding the {len(stale)} shard(s) of checkpoint {c + 1}")
            manifest["shards"] = [s for s in manifest["shards"] if s["checkpoint"] != c]
        # (a build killed from here on finds the recorded digest wrong, or missing, and drops these shards again)
        manifest["files"].pop(name, None)
        samples = self._sketch_sample(c, plans, wanted)
        previous = self._halves.get(c - 1, {})
        stored = {key: quantize(fit_basis(samples[key], dim, stable_seed(self.settings.seed, "basis", c, *key),
                                          start=previous.get(key)))
                  for key, dim in wanted.items()}  # fmt: skip
        arrays = {f"{k[0]}/{k[1]}/{part}": v.numpy() for k, parts in stored.items() for part, v in parts.items()}
        manifest["files"][name] = write_arrays(self.out / name, arrays)
        write_manifest(self.out, manifest, durable=False)
        self._halves = {c: {key: dequantize(**parts) for key, parts in stored.items()}}
        return {key: Basis.from_matrix(matrix, self.device) for key, matrix in self._halves[c].items()}

    def _sketch_sample(self, c: int, plans: list[BlockPlan], wanted: dict) -> dict[tuple[str, str], torch.Tensor]:
        """The sampled factors each sketched side is fitted on, at checkpoint c. When only Linear inputs
        are sketched (ConvE), a forward pass that stops at those layers gives them (no gradients)."""
        wide = max(size for p in plans for _, size, dim in p.sides() if dim)
        rows = self._sample_rows(max(wanted.values()), wide)
        parts: dict[tuple[str, str], list[torch.Tensor]] = {key: [] for key in wanted}
        model = self.models.model(c)
        modules = {m.name: m for m in self.selection.modules}
        grouped = {p.name for p in plans if p.grouped}
        if all(side == "in" for _, side in wanted):
            weights = None
            if self.groups is not None and all(name in grouped for name, _ in wanted):
                # rows of one (head, relation) group have the same input: one row each, weighted by its count
                _, first, counts = np.unique(self.groups[rows], return_index=True, return_counts=True)
                rows, weights = rows[first], torch.from_numpy(np.sqrt(counts)).float()[:, None]
            sample = self.examples[torch.as_tensor(rows)].to(self.device)
            linears = {name: (modules[name].module, "bias" in modules[name].parameter_names) for name, _ in wanted}
            for start in range(0, len(sample), self.settings.batch_size):
                found = linear_inputs(model, linears, sample[start : start + self.settings.batch_size])
                for name, side in wanted:
                    parts[(name, side)].append(found[name].float().cpu())
            if weights is not None:
                return {key: torch.cat(value) * weights for key, value in parts.items()}
        else:
            sample = self.examples[torch.as_tensor(rows)].to(self.device)
            computer = self.computer(c)
            for start in range(0, len(sample), self.settings.batch_size):
                found = sketch_sample(plans, computer.compute_examples(sample[start : start + self.settings.batch_size]))
                for key in wanted:
                    parts[key].append(found[key].float().cpu())
        return {key: torch.cat(value) for key, value in parts.items()}

    # -- the manifest -------------------------------------------------------------------------

    def _inputs_json(self) -> dict:
        inputs, out = self.inputs, self.out
        return {
            "model": {
                "source": relative_path(inputs.model_path, out),
                "pickled": inputs.run.config is None,  # a fact about the file; never a permission to unpickle it
                "files": {p.name: sha256_file(p) for p in _model_files(inputs.model_path.resolve())},
            },
            "checkpoints": [
                {"path": None if c.path is None else relative_path(c.path, out),
                 "sha256": None if c.path is None else sha256_file(c.path),
                 "learning_rate": c.learning_rate, "epoch": c.epoch}
                for c in self.models.checkpoints
            ],  # fmt: skip
            "training": {"source": relative_path(inputs.training_path, out), "num_triples": self.num_facts,
                         "fingerprint": fingerprint_ids(inputs.hrt.numpy())},  # fmt: skip
        }

    def _start_manifest(self, inputs: dict, plans: list[BlockPlan], num_groups: int | None) -> dict:
        settings = self.settings.to_json()
        plans_json = [p.to_json() for p in plans]
        path = self.out / MANIFEST
        if path.is_file():
            manifest = read_manifest(self.out)
            for key, wanted in (("inputs", inputs), ("settings", settings), ("plans", plans_json)):
                difference = _first_difference(manifest.get(key), wanted)
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
            # a training triple's stored rows: 2 for a model trained with inverse triples (see tracin_index.directions)
            "examples_per_triple": self.per_fact,
            "num_rows": self.num_rows,
            "files": {},
            "shards": [],
            "complete": False,
        }
        write_manifest(self.out, manifest)
        return manifest

    def _check_room(self, sizes: dict[str, float], plans: list[BlockPlan]) -> None:
        """Refuse, before anything is written, a build that the disk or the memory cannot hold."""
        existing = self.out
        while not existing.exists():
            existing = existing.parent
        already = sum(p.stat().st_size for p in self.out.rglob("*") if p.is_file()) if self.out.is_dir() else 0
        free = shutil.disk_usage(existing).free
        if sizes["total"] - already > free:
            raise InputError(f"{self.out}: the index needs about {_mib(sizes['total'])} but the disk has {_mib(free)} free; "
                             "free some space or choose another --out")  # fmt: skip
        available = available_memory()
        if available is None:
            return
        model_bytes = sum(t.numel() * t.element_size() for t in self.inputs.run.model.state_dict().values())
        sample = sum(4 * size * len(self._sample_rows(dim, size)) for p in plans for _, size, dim in p.sides() if dim)
        per_row = sum(4 * (sum(p.sizes) if p.kind != "rows" else p.sizes[1] * p.sizes[2]) for p in plans)
        need = 2 * model_bytes + sample + 4 * self.settings.batch_size * per_row + 32 * self.num_rows
        if need > available:
            raise InputError(f"the build needs about {_mib(need)} of memory (models, the sketch sample, a batch of "
                             f"gradients, the training ids) but {_mib(available)} is available; "
                             "lower --batch-size or --sketch-dim, or free memory")  # fmt: skip
        query_bytes = sizes["shards"]
        if query_bytes > available:
            self.log(f"warning: queries hold the stored factors in memory ({_mib(query_bytes)}), more than the "
                     f"{_mib(available)} available now")  # fmt: skip


def _not_finite(c: int, rows: str) -> str:
    return (f"checkpoint {c + 1}: the gradients of {rows} are not finite (inf or NaN: the model's scores or "
            "weights overflow float32); check that checkpoint, or select other layers")  # fmt: skip


def _unchanged(path: Path, digest: str) -> bool:
    return path.is_file() and sha256_file(path) == digest


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def _describe_plans(plans: list[BlockPlan], num_rows: int, num_groups: int | None) -> str:
    parts = []
    for p in plans:
        if p.kind == "factored":
            out = "derived from the batch norm" if p.derived else (f"sketched to {p.sketch[0]}" if p.sketch[0] else "whole")
            inp = f"sketched to {p.sketch[1]}" if p.sketch[1] else "whole"
            grouped = f", once per (head, relation) pair ({num_groups:,} for {num_rows:,} rows)" if p.grouped else ""
            parts.append(f"{p.name}: output side ({p.sizes[0]}) {out}, input side ({p.sizes[1]:,}) {inp}{grouped}")
        elif p.kind == "dense":
            parts.append(f"{p.name}: {sum(p.sizes):,} values " + (f"sketched to {p.sketch[0]}" if p.sketch[0] else "whole"))
        elif p.kind == "rows":
            parts.append(f"{p.name}: {p.sizes[2]} embedding rows of {p.sizes[1]} per triple, whole")
        else:
            parts.append(f"{p.name}: norms only (rescored exactly)")
    return "stored: " + "; ".join(parts)


def load_inputs(*, model_path, allow_pickle, training_path, checkpoint_paths, entity_to_id, relation_to_id, log) -> _Inputs:
    from .models import find_checkpoints, load_model
    from .triples import warn_duplicates

    run = load_model(model_path, allow_pickle=allow_pickle)
    id_maps = run.resolve_id_maps(entity_to_id, relation_to_id)
    training_file = training_path or run.training_path
    if training_file is None:
        raise InputError(f"{model_path}: no training triples found; pass --train")
    hrt = id_maps.read_ids(training_file)  # streamed: the labels of millions of rows are never held at once
    warn_duplicates(hrt, str(training_file))
    checkpoints = find_checkpoints(checkpoint_paths) if checkpoint_paths else run.checkpoints
    if not checkpoints:
        log("no checkpoints: the model itself is the only checkpoint (learning rate 1.0)")
    return _Inputs(run, Path(model_path), Path(training_file), list(checkpoints), hrt, id_maps)


def build_index(out: str | os.PathLike, *, model_path, allow_pickle: bool = False, training_path=None,
                checkpoint_paths: Sequence | None = None, entity_to_id=None, relation_to_id=None,
                settings: BuildSettings | None = None, device: str | None = None, log: Log | None = None,
                progress: Progress | None = None, runner: Runner | None = None,
                index_shards: int | None = None) -> tuple[Path, Any]:  # fmt: skip
    """Build (or resume building) the index directory ``out``; returns it and the loaded run. ``runner``:
    where the shard tasks run (:mod:`tracin_index.cluster`; default this process). ``index_shards``:
    the search shards a cluster holds the index in (:mod:`tracin_index.sharded`)."""
    log = log or (lambda message: None)
    settings = settings or BuildSettings()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    inputs = load_inputs(model_path=model_path, allow_pickle=allow_pickle, training_path=training_path,
                         checkpoint_paths=checkpoint_paths, entity_to_id=entity_to_id, relation_to_id=relation_to_id,
                         log=log)  # fmt: skip
    builder = Builder(Path(out), inputs, settings, device, log, progress, runner, allow_pickle, index_shards)
    builder.run()
    return Path(out), inputs
