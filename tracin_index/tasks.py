"""The build's task: one checkpoint x one range of training rows -> one shard file and its record.

:func:`run_job` is a pure function of its inputs, which the :class:`ShardJob` names by digest (the
build's settings, plans and triples; the checkpoint's principal directions): it computes the rows'
per-example gradients (:class:`~tracin_index.gradients.GradientComputer`), stores their factors
(:func:`tracin_index.factors.encode`) and exact squared norms in the shard file, written atomically
into the index directory, and returns the record the manifest keeps. It runs in the building
process (the default) or on a Dask worker (``--dask-workers``, ``--dask-scheduler``; the index
directory on a filesystem every worker sees); either way a process loads the model and each
checkpoint once and keeps them for its later tasks (:class:`ShardWorker`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoints import Checkpoint, CheckpointModels
from .errors import InputError
from .factors import BlockPlan, encode, sketched_sides
from .gradients import GradientComputer, merge_examples
from .directions import training_examples
from .sketch import Basis, read_bases
from .store import MANIFEST, TRIPLES, ShardTask, bases_path, read_arrays, read_manifest, read_triples, sha256_file, write_arrays


@dataclass(frozen=True)
class ShardJob:
    """One task and what it reads: the index directory (absolute: a worker may run elsewhere), the
    digest of what all tasks of the build share (:func:`build_digest`), the checkpoint's bases file
    digest (None where nothing is sketched), and how to compute (device, torch threads, whether the
    caller allowed unpickling a pickled model)."""

    directory: str
    task: ShardTask
    build: str
    bases: str | None
    device: str = "cpu"
    threads: int | None = None
    allow_pickle: bool = False


def build_digest(manifest: dict) -> str:
    """What every task of a build depends on besides its checkpoint: inputs, settings, plans, the replica, the triples."""
    shared = {key: manifest.get(key) for key in ("inputs", "settings", "plans", "replica", "examples_per_triple", "num_groups")}
    shared["triples"] = manifest["files"].get(TRIPLES)
    return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()


def run_job(job: ShardJob) -> dict:
    """The task: compute the shard, write it (atomically) into the index directory, return its record."""
    if job.threads:
        torch.set_num_threads(job.threads)
    task = job.task
    arrays = shard_worker(job).compute(task, job.bases)
    attrs = {"checkpoint": task.checkpoint, "row_start": task.row_start, "row_stop": task.row_stop}
    digest = write_arrays(Path(job.directory) / task.relative_path, arrays, attrs)
    return {"checkpoint": task.checkpoint, "shard": task.shard, "file": task.relative_path,
            "row_start": task.row_start, "row_stop": task.row_stop, "sha256": digest}  # fmt: skip


_WORKERS: dict[tuple, "ShardWorker"] = {}


def shard_worker(job: ShardJob) -> "ShardWorker":
    """This process's :class:`ShardWorker` for the job's build (loaded by the first task, kept for the next)."""
    key = (job.directory, job.build, job.device, job.allow_pickle)
    if key not in _WORKERS:
        _WORKERS.clear()  # one build at a time per process: free the previous one's model
        _WORKERS[key] = ShardWorker.load(Path(job.directory), job.build, job.device, job.allow_pickle)
    return _WORKERS[key]


class ShardWorker:
    """What the tasks of one build share, loaded once per process from the index directory: the model
    (one checkpoint at a time), the selection and block plans, the training examples and their
    (head, relation) groups, and each checkpoint's principal directions."""

    def __init__(self, model: torch.nn.Module, checkpoints: list[Checkpoint], manifest: dict, hrt: np.ndarray,
                 groups: np.ndarray | None, directory: Path, device: str):  # fmt: skip
        from .builder import selection_from_manifest

        self.directory, self.device = directory, device
        self.models = CheckpointModels(model.to(device).eval(), checkpoints, max_bytes=0)
        self.selection = selection_from_manifest(model, manifest)
        self.loss = manifest["settings"]["loss"]
        self.batch_size = int(manifest["settings"]["batch_size"])
        self.plans = [BlockPlan.from_json(p) for p in manifest["plans"]]
        self.per_fact = int(manifest.get("examples_per_triple", 1))
        self.examples = training_examples(torch.as_tensor(hrt, dtype=torch.long), self.per_fact == 2)
        self.groups = groups
        self.group_first = np.unique(groups, return_index=True)[1] if groups is not None else None
        self._computer: GradientComputer | None = None
        self._bases: tuple[str | None, dict] | None = None

    @classmethod
    def load(cls, directory: Path, build: str, device: str, allow_pickle: bool) -> "ShardWorker":
        manifest = read_manifest(directory)
        if build_digest(manifest) != build:
            raise InputError(f"{directory / MANIFEST}: the index's inputs or settings changed while it was being built; "
                             "run the build again")  # fmt: skip
        triples = directory / TRIPLES
        if sha256_file(triples) != manifest["files"].get(TRIPLES):
            raise InputError(f"{triples}: changed while the index was being built; run the build again")
        hrt, _, _, groups = read_triples(triples)
        from .index import recorded_checkpoints, recorded_run
        from .replicas import pair_forward_applies

        model = recorded_run(manifest, directory, allow_pickle).model
        worker = cls(model, recorded_checkpoints(manifest, directory), manifest, hrt, groups, directory, device)
        if pair_forward_applies(model, worker.selection):  # a replica: the layers before the Linear once per pair
            model.pair_forward = groups is not None
        return worker

    def computer(self, c: int) -> GradientComputer:
        model = self.models.model(c)
        if self._computer is None or self._computer.model is not model:
            self._computer = GradientComputer(model, self.selection, self.loss)
        return self._computer

    def bases(self, c: int, digest: str | None) -> dict[tuple[str, str], Basis]:
        """Checkpoint c's principal directions, read once, refused if the file is not the one the job names."""
        if digest is None:
            return {}
        if self._bases is None or self._bases[0] != digest:
            path = self.directory / bases_path(c)
            if sha256_file(path) != digest:
                raise InputError(f"{path}: changed while the index was being built; run the build again")
            matrices = read_bases(read_arrays(path), sketched_sides(self.plans))
            self._bases = (digest, {key: Basis.from_matrix(matrix, self.device) for key, matrix in matrices.items()})
        return self._bases[1]

    def compute(self, task: ShardTask, bases_digest: str | None) -> dict[str, np.ndarray]:
        """The stored factors of rows [row_start, row_stop) at one checkpoint, and the exact squared
        norms of their facts' gradients (self-influence).

        A batch holds whole facts: with inverse triples, the forward examples of its facts, then their
        inverse examples, so that the facts' gradients (the sums) come from the same pass. With a
        replica that computes per (head, relation) pair, the facts go through in the order of their
        (forward) groups, so that a batch holds few pairs (UMLS: 6.4 rows per pair). Per-row arrays
        are put back in row order, per-fact norms in fact order, and per-group arrays in group order
        (the groups that first appear in a range of rows are a range of group ids).
        """
        from .builder import _not_finite

        computer = self.computer(task.checkpoint)
        bases = self.bases(task.checkpoint, bases_digest)
        plans, groups, group_first = self.plans, self.groups, self.group_first
        k = self.per_fact
        facts = np.arange(task.row_start // k, task.row_stop // k)
        if groups is not None and getattr(computer.model, "pair_forward", False):
            facts = facts[np.argsort(groups[facts * k], kind="stable")]
        per_group = {f"{p.name}/in/" for p in plans if p.grouped}
        parts: dict[str, list[torch.Tensor]] = {}
        norms, order, group_order = [], [], []
        step = max(1, self.batch_size // k)
        for start in range(0, len(facts), step):
            batch_facts = facts[start : start + step]
            batch = (batch_facts[None, :] * k + np.arange(k)[:, None]).reshape(-1)  # example j of every fact, then j + 1
            grads = computer.compute_examples(self.examples[torch.from_numpy(batch)].to(self.device))
            first = None
            if groups is not None:
                at = np.flatnonzero(group_first[groups[batch]] == batch)
                first = torch.as_tensor(at, dtype=torch.long)
                group_order.append(groups[batch[at]])
            for key, value in encode(plans, grads, bases, first).items():
                parts.setdefault(key, []).append(value)
            fact_grads = grads if k == 1 else merge_examples(grads, k)
            norms.append(fact_grads.squared_norms().double().cpu())
            order.append(batch)
        rows = np.concatenate(order)
        position = np.empty(len(rows), dtype=np.int64)
        position[rows - task.row_start] = np.arange(len(rows))  # where each row (in row order) was computed
        fact_position = np.empty(len(facts), dtype=np.int64)
        fact_position[facts - task.row_start // k] = np.arange(len(facts))
        group_position = np.argsort(np.concatenate(group_order), kind="stable") if group_order else None
        arrays = {"squared_norms": torch.cat(norms).numpy()[fact_position]}
        for key, values in parts.items():
            value = torch.cat(values).numpy()
            arrays[key] = value[group_position] if any(key.startswith(g) for g in per_group) else value[position]
        for key, value in arrays.items():
            if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
                raise InputError(_not_finite(task.checkpoint, f"training rows {task.row_start}..{task.row_stop - 1}"))
        return arrays
