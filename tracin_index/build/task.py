"""The build's task: one checkpoint x one range of stored rows -> one shard file and its record.

:func:`run_task` is a pure function of its inputs, which the :class:`BuildTask` names by digest (the
build's settings, plans and triples; the checkpoint's principal directions): it computes the rows'
per-example gradients, stores their factors (:func:`tracin_index.storage.encoding.encode`) and the
exact squared norms of their triples' gradients in the shard file, written atomically into the index
directory, and returns the record the manifest keeps. It runs in the building process (the default)
or on a Dask worker (:mod:`tracin_index.build.runners`; the index directory on a filesystem every
worker sees); either way a process loads the model and each checkpoint once and keeps them for its
later tasks (:class:`TaskInputs`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..gradients.blocks import merge_examples
from ..gradients.computer import CheckpointGradients, not_finite_message
from ..gradients.selection import recorded_selection
from ..kg.directions import training_examples
from ..storage.encoding import encode
from ..storage.layout import (
    MANIFEST,
    TRIPLES,
    ShardFile,
    bases_path,
    read_arrays,
    read_manifest,
    read_triples,
    sha256_file,
    write_arrays,
)
from ..storage.plans import BlockPlan, sketched_sides
from ..storage.reader import recorded_checkpoints, recorded_run
from ..storage.sketch import Basis, read_bases


@dataclass(frozen=True)
class BuildTask:
    """One shard file to compute and what it reads: the index directory (absolute: a worker may run
    elsewhere), the digest of what all tasks of the build share (:func:`build_digest`), the checkpoint's
    bases file digest (None where nothing is sketched), and how to compute (device, torch threads,
    whether the caller allowed unpickling a pickled model)."""

    directory: str
    shard: ShardFile
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


def run_task(task: BuildTask) -> dict:
    """The task: compute the shard file, write it (atomically) into the index directory, return its record."""
    if task.threads:
        torch.set_num_threads(task.threads)
    shard = task.shard
    arrays = task_inputs(task).compute(shard, task.bases)
    attrs = {"checkpoint": shard.checkpoint, "row_start": shard.row_start, "row_stop": shard.row_stop}
    digest = write_arrays(Path(task.directory) / shard.relative_path, arrays, attrs)
    return {"checkpoint": shard.checkpoint, "shard": shard.shard, "file": shard.relative_path,
            "row_start": shard.row_start, "row_stop": shard.row_stop, "sha256": digest}  # fmt: skip


_LOADED: dict[tuple, "TaskInputs"] = {}


def task_inputs(task: BuildTask) -> "TaskInputs":
    """This process's :class:`TaskInputs` for the task's build (loaded by the first task, kept for the next)."""
    key = (task.directory, task.build, task.device, task.allow_pickle)
    if key not in _LOADED:
        _LOADED.clear()  # one build at a time per process: free the previous one's model
        _LOADED[key] = TaskInputs.load(Path(task.directory), task.build, task.device, task.allow_pickle)
    return _LOADED[key]


class TaskInputs:
    """What the tasks of one build share, loaded once per process from the index directory: the model
    (one checkpoint at a time) and its gradients, the block plans, the training examples and their
    (head, relation) groups, and each checkpoint's principal directions."""

    def __init__(self, gradients: CheckpointGradients, manifest: dict, hrt: np.ndarray, groups: np.ndarray | None,
                 directory: Path, device: str):  # fmt: skip
        self.directory, self.device = directory, device
        self.gradients = gradients
        self.batch_size = int(manifest["settings"]["batch_size"])
        self.plans = [BlockPlan.from_json(p) for p in manifest["plans"]]
        self.per_fact = int(manifest.get("examples_per_triple", 1))
        self.examples = training_examples(torch.as_tensor(hrt, dtype=torch.long), self.per_fact == 2)
        self.groups = groups
        self.group_first = np.unique(groups, return_index=True)[1] if groups is not None else None
        self._bases: tuple[str | None, dict] | None = None

    @classmethod
    def load(cls, directory: Path, build: str, device: str, allow_pickle: bool) -> "TaskInputs":
        manifest = read_manifest(directory)
        if build_digest(manifest) != build:
            raise InputError(f"{directory / MANIFEST}: the index's inputs or settings changed while it was being built; "
                             "run the build again")  # fmt: skip
        triples = directory / TRIPLES
        if sha256_file(triples) != manifest["files"].get(TRIPLES):
            raise InputError(f"{triples}: changed while the index was being built; run the build again")
        hrt, _, _, groups = read_triples(triples)
        model = recorded_run(manifest, directory, allow_pickle).model.to(device).eval()
        settings = manifest["settings"]
        # per_pair: a replica computes the layers before the Linear once per (head, relation) pair
        gradients = CheckpointGradients(model, recorded_checkpoints(manifest, directory),
                                        lambda m: recorded_selection(m, settings), settings["loss"],
                                        per_pair=groups is not None, max_bytes=0)  # fmt: skip
        return cls(gradients, manifest, hrt, groups, directory, device)

    def bases(self, c: int, digest: str | None) -> dict[tuple[str, str], Basis]:
        """Checkpoint c's principal directions, read once, refused if the file is not the one the task names."""
        if digest is None:
            return {}
        if self._bases is None or self._bases[0] != digest:
            path = self.directory / bases_path(c)
            if sha256_file(path) != digest:
                raise InputError(f"{path}: changed while the index was being built; run the build again")
            matrices = read_bases(read_arrays(path), sketched_sides(self.plans))
            self._bases = (digest, {key: Basis.from_matrix(matrix, self.device) for key, matrix in matrices.items()})
        return self._bases[1]

    def compute(self, shard: ShardFile, bases_digest: str | None) -> dict[str, np.ndarray]:
        """The stored factors of rows [row_start, row_stop) at one checkpoint, and the exact squared
        norms of their triples' gradients (self-influence).

        A batch holds whole triples: with inverse triples, the forward examples of its triples, then
        their inverse examples, so that the triples' gradients (the sums) come from the same pass.
        Where the computer works per (head, relation) pair, the triples go through in the order of
        their (forward) groups, so that a batch holds few pairs. Per-row arrays are put back in row
        order, per-triple norms in triple order, and per-group arrays in group order (the groups that
        first appear in a range of rows are a range of group ids).
        """
        computer = self.gradients.computer(shard.checkpoint)
        bases = self.bases(shard.checkpoint, bases_digest)
        plans, groups, group_first = self.plans, self.groups, self.group_first
        k = self.per_fact
        facts = np.arange(shard.row_start // k, shard.row_stop // k)
        if groups is not None and computer.per_pair:
            facts = facts[np.argsort(groups[facts * k], kind="stable")]
        per_group = {f"{p.name}/in/" for p in plans if p.grouped}
        parts: dict[str, list[torch.Tensor]] = {}
        norms, order, group_order = [], [], []
        step = max(1, self.batch_size // k)
        for start in range(0, len(facts), step):
            batch_facts = facts[start : start + step]
            batch = (batch_facts[None, :] * k + np.arange(k)[:, None]).reshape(-1)  # example j of every triple, then j + 1
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
        position[rows - shard.row_start] = np.arange(len(rows))  # where each row (in row order) was computed
        fact_position = np.empty(len(facts), dtype=np.int64)
        fact_position[facts - shard.row_start // k] = np.arange(len(facts))
        group_position = np.argsort(np.concatenate(group_order), kind="stable") if group_order else None
        arrays = {"squared_norms": torch.cat(norms).numpy()[fact_position]}
        for key, values in parts.items():
            value = torch.cat(values).numpy()
            arrays[key] = value[group_position] if any(key.startswith(g) for g in per_group) else value[position]
        for key, value in arrays.items():
            if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
                raise InputError(not_finite_message(shard.checkpoint, f"training rows {shard.row_start}..{shard.row_stop - 1}"))
        return arrays
