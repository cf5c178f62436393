r"""An index directory opened for reading, checked against the digests its manifest records.

:class:`IndexFiles` holds what a query reads once: the manifest, the training triples' ids and labels,
the (head, relation) groups, the block plans and the recorded checkpoints. It loads a checkpoint's
stored arrays (:func:`load_factor_arrays`), the exact squared norms (:func:`read_squared_norms`), and
the model the index was built from (:func:`recorded_run`): its plain-torch replica where the build
recorded one, else through PyKEEN, and a pickled one only with the caller's permission (an index
directory may come from someone else: nothing in it grants that). ``verify`` checks every file and
every input against the manifest and loads no model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import torch

from ..errors import InputError, TracInError
from ..gradients.selection import ParameterSelection, recorded_selection
from ..kg.checkpoints import Checkpoint, check_state_dict, load_state_dict_into, read_state_dict
from ..kg.replicas import build_replica
from ..kg.triples import IdMaps
from .arrays import FactorArrays
from .layout import (
    MANIFEST,
    TRIPLES,
    bases_path,
    fingerprint_ids,
    read_arrays,
    read_manifest,
    read_triples,
    refuse_while_building,
    resolve_path,
    sha256_file,
)
from .plans import BlockPlan, is_input_side, sketched_sides
from .sketch import Basis, dequantize, read_quantized_bases


class IndexFiles:
    """A complete index directory, opened: see the module docstring. Make one with :meth:`open`."""

    def __init__(self, directory: Path, manifest: dict, hrt: np.ndarray, entity_labels: list[str],
                 relation_labels: list[str], groups: np.ndarray | None):  # fmt: skip
        self.directory = directory
        self.manifest = manifest
        self.hrt = hrt
        self.entity_labels = entity_labels
        self.relation_labels = relation_labels
        self.groups = groups
        self.loss: str = manifest["settings"]["loss"]
        #: stored rows (examples) per training triple: 2 (adjacent) for a model trained with inverse triples
        self.per_triple = int(manifest.get("examples_per_triple", 1))
        self.plans = [BlockPlan.from_json(p) for p in manifest["plans"]]
        broken = next((p for p, f in zip(self.plans, self.plans[1:] + [None]) if not _plan_is_whole(p, f)), None)
        if broken is not None:
            raise InputError(f"{directory / MANIFEST}: the plan of {broken.name!r} is not one a build makes (its sketch "
                             "or derived side); the manifest is damaged or was edited: rebuild the index")  # fmt: skip
        self.checkpoints = recorded_checkpoints(manifest, directory)

    @classmethod
    def open(cls, path) -> "IndexFiles":
        """Open the index directory ``path``; refuses one that a build is writing right now, one whose build
        did not finish, or whose triples file does not match its digest."""
        directory = Path(path)
        if not (directory / MANIFEST).is_file():
            refuse_while_building(directory)  # a build that has not written its manifest yet
        manifest = read_manifest(directory)
        if not manifest.get("complete"):
            refuse_while_building(directory)
            raise InputError(f"{directory}: the build did not finish; run the same `tracin-index build` again to resume it")
        triples = directory / TRIPLES
        check_file(triples, manifest["files"].get(TRIPLES), "triples file")
        hrt, entity_labels, relation_labels, groups = read_triples(triples)
        check_agreement(directory, manifest, hrt, entity_labels, relation_labels, groups)
        return cls(directory, manifest, hrt, entity_labels, relation_labels, groups)

    @property
    def num_triples(self) -> int:
        return len(self.hrt)

    @property
    def inverse_triples(self) -> bool:
        """Whether the model was trained with inverse triples (each training triple is two examples)."""
        return self.per_triple == 2

    def id_maps(self) -> IdMaps:
        """The label maps the index was built with (from its triples file)."""
        return IdMaps(entity_to_id={label: i for i, label in enumerate(self.entity_labels)},
                      relation_to_id={label: i for i, label in enumerate(self.relation_labels)})  # fmt: skip

    def row_labels(self) -> "RowLabels":
        return RowLabels(self.hrt, self.entity_labels, self.relation_labels)

    def load_run(self, allow_pickle: bool):
        """The model the index was built from (:func:`recorded_run`), refused if its files or the checkpoints
        changed since the build (naming the file)."""
        inputs = self.manifest["inputs"]
        source = resolve_path(inputs["model"]["source"], self.directory)
        for name, digest in inputs["model"]["files"].items():
            check_file(source / name if source.is_dir() else source, digest, "model file")
        for record, checkpoint in zip(inputs["checkpoints"], self.checkpoints):
            if checkpoint.path is not None:
                check_file(checkpoint.path, record["sha256"], "checkpoint")
        return recorded_run(self.manifest, self.directory, allow_pickle)

    def selection_of(self, model: torch.nn.Module) -> ParameterSelection:
        """The parameter selection the index was built with, found again in ``model`` (refused where it
        selects other parameters)."""
        selection = recorded_selection(model, self.manifest["settings"])
        if selection.parameter_names != self.manifest["selection"]["parameters"]:
            raise InputError(f"{self.directory}: the model's selected parameters differ from the index's; rebuild the index")
        misfit = next((p for p, m in zip(self.plans, selection.modules)
                       if p.name != m.name or not _plan_holds(p, m.num_parameters)), None)  # fmt: skip
        if misfit is not None or len(self.plans) != len(selection.modules):
            what = f"the plan of {misfit.name!r}" if misfit else f"{len(self.plans)} block plans"
            raise InputError(f"{self.directory / MANIFEST}: {what} does not fit the model's selected layers "
                             f"({', '.join(m.name for m in selection.modules)}); the manifest is damaged or was edited: "
                             "rebuild the index")  # fmt: skip
        return selection

    def factor_arrays(self, c: int, triples: tuple[int, int] | None = None, bases: dict | None = None) -> FactorArrays:
        """Checkpoint c's stored arrays (of the training triples ``triples`` = [start, stop), all by default);
        ``bases``: checkpoint c's principal directions, where the caller has them already."""
        return load_factor_arrays(self.directory, self.manifest, self.plans, c, self.groups, triples, bases)

    def bases(self, c: int) -> dict[tuple[str, str], Basis]:
        """Checkpoint c's principal directions (:func:`read_bases`)."""
        return read_bases(self.directory, self.manifest, self.plans, c)

    def stored_rows(self, c: int, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Checkpoint c's stored arrays of the stored ``rows`` (sorted, unique), input sides left out (:func:`read_rows`)."""
        return read_rows(self.directory, self.manifest, self.plans, c, rows)

    def arrays_bytes(self) -> int:
        """Bytes of the stored arrays of every checkpoint (the shard files' sizes): what holding them all takes."""
        return sum((self.directory / s["file"]).stat().st_size for s in self.manifest["shards"])

    def squared_norms(self, triples: tuple[int, int] | None = None) -> np.ndarray:
        """||g(z; theta_c)||^2 per checkpoint and training triple, (C, N) float64 (exact, stored at build time)."""
        return read_squared_norms(self.directory, self.manifest, triples)

    def self_influences(self) -> np.ndarray:
        """sum_c lr_c ||g(z; theta_c)||^2 for every training triple (exact: stored at build time)."""
        rates = np.array([c.learning_rate for c in self.checkpoints], dtype=np.float64)
        return rates @ self.squared_norms()

    def verify(self) -> list[str]:
        """Problems found: any file of the index missing or not matching its sha256 in the manifest, and
        any input it was built from (model, checkpoints, training triples) missing or changed since."""
        return verify_directory(self.directory, self.manifest) + verify_inputs(self.directory, self.manifest)


@dataclass
class ReplicaRun:
    """What a query needs of a run directory: the model (here a replica, see :mod:`tracin_index.kg.replicas`)."""

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
        checkpoints = [resolve_path(r["path"], directory) for r in inputs["checkpoints"] if r["path"]]
        return _replica_run(spec, source, checkpoints, str(directory / MANIFEST))
    from ..kg.runs import load_model  # PyKEEN: seconds to import

    return load_model(source, allow_pickle=allow_pickle)


def _replica_run(spec: dict, source: Path, checkpoints: list[Path], manifest: str) -> ReplicaRun:
    """The run directory's model as a plain-torch replica (no PyKEEN import): the build checked that it agrees.
    Its sizes come from the manifest: checked against the weights before anything of that size is allocated."""
    weights = source / "model.pt"
    if not weights.is_file() and not checkpoints:
        raise InputError(f"{weights}: missing, and the index has no checkpoints to load weights from")
    reference = weights if weights.is_file() else checkpoints[0]
    state = read_state_dict(reference)
    with torch.device("meta"):
        check_state_dict(_built_replica(spec, manifest), state, str(reference))
    model = _built_replica(spec, manifest)
    if weights.is_file():
        load_state_dict_into(model, state, str(weights))
    return ReplicaRun(model.eval())


def _built_replica(spec: dict, manifest: str) -> torch.nn.Module:
    try:
        return build_replica(spec)
    except (RuntimeError, ValueError) as error:  # sizes that make no layer (a kernel wider than the image, ...)
        raise InputError(f"{manifest}: the recorded model {spec['model']} cannot be built ({str(error)[:120]}); the "
                         "manifest is damaged or was edited: rebuild the index")  # fmt: skip


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


def load_factor_arrays(directory: Path, manifest: dict, plans: list[BlockPlan], c: int, groups: np.ndarray | None,
                facts: tuple[int, int] | None = None, bases: dict | None = None) -> FactorArrays:  # fmt: skip
    """Checkpoint c's stored factors of the training triples ``facts`` = [start, stop) (all by default),
    from the shard files (their rows in row order). Grouped sides keep the groups those rows use,
    renumbered from 0 in group order."""
    per_fact = int(manifest.get("examples_per_triple", 1))
    start, stop = (0, int(manifest["num_rows"])) if facts is None else (facts[0] * per_fact, facts[1] * per_fact)
    shards = sorted((s for s in manifest["shards"] if s["checkpoint"] == c), key=lambda s: s["row_start"])
    grouped_keys = {f"{p.name}/in/" for p in plans if p.grouped}
    per_group: dict[str, list[np.ndarray]] = {}
    # read straight into place: no second copy of the rows while they load; key -> (buffer, its columns)
    rows: dict[str, tuple[np.ndarray, slice | None]] = {}
    joined: dict[str, np.ndarray] = {}  # arrays stored parameter by parameter, read side by side
    for shard in shards:
        if shard["row_start"] >= stop and shard["row_start"] > start:
            break  # the groups of rows before a file are held in it or in earlier ones
        overlaps = shard["row_start"] < stop and shard["row_stop"] > start
        if not overlaps and not grouped_keys:
            continue
        path = directory / shard["file"]
        lo, hi = max(start, shard["row_start"]) - shard["row_start"], min(stop, shard["row_stop"]) - shard["row_start"]
        at = shard["row_start"] + lo - start
        try:
            with h5py.File(path, "r") as f:
                names: list[str] = []
                f.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None)
                for key in names:
                    grouped = any(key.startswith(g) for g in grouped_keys)
                    if grouped:  # an earlier file may hold the groups these rows use
                        per_group.setdefault(key, []).append(f[key][...])
                    elif overlaps and key != "squared_norms":
                        dataset = f[key]
                        if key not in rows:
                            _allocate(rows, joined, f, key, stop - start)
                        buffer, columns = rows[key]
                        into = (slice(at, at + hi - lo),) if columns is None else \
                            (slice(at, at + hi - lo), *[slice(None)] * (buffer.ndim - 2), columns)
                        dataset.read_direct(buffer, np.s_[lo:hi], into)
        except (OSError, KeyError, TypeError, ValueError) as error:
            raise InputError(f"{path}: unreadable ({error}); run the same `tracin-index build` again to rebuild it") from None
    arrays = {key: torch.from_numpy(buffer) if columns is None else torch.from_numpy(buffer)[..., columns]
              for key, (buffer, columns) in rows.items()}  # fmt: skip
    stored_groups = {}
    if grouped_keys:
        mine = groups[start:stop]
        used, local = np.unique(mine, return_inverse=True) if facts is not None else (None, mine)
        for key, parts in per_group.items():
            whole = np.concatenate(parts)
            arrays[key] = torch.from_numpy(whole if used is None else whole[used])
        stored_groups = {p.name: torch.as_tensor(local) for p in plans if p.grouped}
    _widen(arrays)
    if bases is None:
        bases = read_bases(directory, manifest, plans, c)
    for p in plans:
        out, inp = (arrays.get(f"{p.name}/{side}/values") for side in ("out", "in"))
        sides = [v for v in (out, inp) if v is not None]
        if p.kind == "factored" and inp is not None and (
                (out is not None) != (p.derived is None) or any(v.ndim != 3 or v.shape[1] != p.examples for v in sides)):
            raise InputError(f"{directory / MANIFEST}: the plan of {p.name!r} (examples per row, a stored or derived "
                             "output side) disagrees with its stored arrays; the manifest is damaged or was edited: "
                             "rebuild the index")  # fmt: skip
        if p.grouped and facts is None and len(arrays[f"{p.name}/in/values"]) != manifest["num_groups"]:
            raise InputError(f"{directory}: the shards of checkpoint {c + 1} do not hold every "
                             "(head, relation) group; rebuild the index")  # fmt: skip
    whole = {name: torch.from_numpy(buffer).reshape(-1, buffer.shape[-1]) for name, buffer in joined.items()}
    return FactorArrays(arrays, bases, stored_groups, stop - start, joined=whole)


def _allocate(rows: dict, joined: dict, f: h5py.File, key: str, count: int) -> None:
    """Room for ``count`` rows of array ``key`` (as file ``f`` holds it): its own buffer, or for an array stored
    parameter by parameter (``block/values/values0``, ``values1``, ...) one buffer for all its parameters side
    by side, each reading into its columns (a batch's products over them are then one matrix product,
    :meth:`FactorArrays._joined`, without joining them in memory later)."""
    prefix, name = key.rsplit("/", 1)
    if not (name.startswith("values") and name[6:].isdigit()):
        dataset = f[key]
        rows[key] = (np.empty((count, *dataset.shape[1:]), dtype=dataset.dtype), None)
        return
    parts = []
    while f"{prefix}/values{len(parts)}" in f:
        parts.append(f[f"{prefix}/values{len(parts)}"])
    buffer = np.empty((count, *parts[0].shape[1:-1], sum(d.shape[-1] for d in parts)), dtype=parts[0].dtype)
    start = 0
    for i, dataset in enumerate(parts):
        rows[f"{prefix}/values{i}"] = (buffer, slice(start, start + dataset.shape[-1]))
        start += dataset.shape[-1]
    joined["+".join(f"{prefix}/values{i}" for i in range(len(parts)))] = buffer


def read_bases(directory: Path, manifest: dict, plans: list[BlockPlan], c: int) -> dict[tuple[str, str], Basis]:
    """Checkpoint c's principal directions of every sketched side (none where nothing is sketched), checked
    against the manifest's digest."""
    sketched = sketched_sides(plans)
    if not sketched:
        return {}
    name = bases_path(c)
    check_file(directory / name, manifest["files"].get(name), "principal directions file")
    try:
        quantized = read_quantized_bases(read_arrays(directory / name), sketched)
    except KeyError as error:  # the plans name a sketched side the file does not hold
        raise InputError(f"{directory / name}: holds no principal directions of {error}; the manifest's plans and the "
                         "index's files disagree: rebuild the index") from None  # fmt: skip
    return {key: Basis.from_matrix(dequantize(*q), quantized=q) for key, q in quantized.items()}


def _widen(arrays: dict[str, torch.Tensor]) -> None:
    """The per-row numbers of the bounds in float64, once, not at every query."""
    for key in arrays:
        if key.endswith(("/scale", "/norm", "/rho")):
            arrays[key] = arrays[key].double()


def read_rows(directory: Path, manifest: dict, plans: list[BlockPlan], c: int, rows: np.ndarray) -> dict[str, torch.Tensor]:
    """Checkpoint c's stored arrays of the stored ``rows`` (examples, sorted, unique) but the Linear input
    sides (refining recomputes those): what refining a few candidates needs, read from the shard files that
    hold them, without loading the rest."""
    shards = sorted((s for s in manifest["shards"] if s["checkpoint"] == c), key=lambda s: s["row_start"])
    parts: dict[str, list[np.ndarray]] = {}
    for shard in shards:
        lo, hi = np.searchsorted(rows, [shard["row_start"], shard["row_stop"]])
        if lo == hi:
            continue
        local = rows[lo:hi] - shard["row_start"]
        path = directory / shard["file"]
        try:
            with h5py.File(path, "r") as f:
                names = []
                f.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) and name != "squared_norms"
                             and not is_input_side(name, plans) else None)  # fmt: skip
                for name in names:
                    parts.setdefault(name, []).append(f[name][local])
        except (OSError, KeyError) as error:
            raise InputError(f"{path}: unreadable ({error}); run the same `tracin-index build` again to rebuild it") from None
    arrays = {key: torch.from_numpy(np.concatenate(values)) for key, values in parts.items()}
    _widen(arrays)
    return arrays


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


def check_agreement(directory: Path, manifest: dict, hrt: np.ndarray, entity_labels: list[str], relation_labels: list[str],
                    groups: np.ndarray | None) -> None:  # fmt: skip
    """Refuse a manifest whose numbers disagree with the triples file: a count of rows, shards that do not cover
    every row of every checkpoint once, a model of other sizes (layout.read_manifest checked each value alone)."""
    def damaged(what: str) -> InputError:
        return InputError(f"{directory / MANIFEST}: {what}; the manifest is damaged or was edited: rebuild the index "
                          "(the same `tracin-index build`, another --out)")  # fmt: skip

    per = manifest["examples_per_triple"]
    rows, checkpoints = manifest["num_rows"], len(manifest["inputs"]["checkpoints"])
    records = manifest["inputs"]["checkpoints"]
    if any((r["path"] is None) != (r["sha256"] is None) for r in records) or (len(records) > 1 and not all(r["path"] for r in records)):
        raise damaged("a checkpoint is recorded without its file or its checksum (only an index of the model alone, one "
                      "checkpoint, has neither)")  # fmt: skip
    if rows != per * len(hrt):
        raise damaged(f"num_rows is {rows:,} but the triples file holds {len(hrt):,} triples of {per} rows each")
    for c in range(checkpoints):
        covered = 0
        for shard in sorted((s for s in manifest["shards"] if s["checkpoint"] == c), key=lambda s: s["row_start"]):
            start, stop = shard["row_start"], shard["row_stop"]
            if start != covered or not start < stop <= rows or start % per or stop % per:
                raise damaged(f"shard {shard['file']!r} holds rows {start:,}..{stop:,}, where checkpoint {c + 1}'s next "
                              f"shard starts at row {covered:,} (of {rows:,}, {per} per triple)")  # fmt: skip
            covered = stop
        if covered != rows:
            raise damaged(f"the shards of checkpoint {c + 1} hold rows 0..{covered:,} of {rows:,}")
    strays = [s["file"] for s in manifest["shards"] if s["checkpoint"] >= checkpoints]
    if strays:
        raise damaged(f"shard {strays[0]!r} belongs to a checkpoint beyond the {checkpoints} recorded")
    if any(p["grouped"] for p in manifest["plans"]) and (groups is None or manifest["num_groups"] is None):
        raise damaged("a block is stored per (head, relation) group, but no groups are recorded")
    replica = manifest.get("replica")
    if replica and (replica["num_entities"], replica["num_relations"]) != (len(entity_labels), per * len(relation_labels)):
        raise damaged(f"the model has {replica['num_entities']:,} entities and {replica['num_relations']:,} relations, the "
                      f"triples file {len(entity_labels):,} and {per * len(relation_labels):,}")  # fmt: skip


def _plan_holds(plan: BlockPlan, parameters: int) -> bool:
    """Whether ``plan``'s sizes (storage.plans.plan_blocks) hold a module's ``parameters``: factored: out x in (a bias
    one more input); dense: each parameter's size; rows: table rows x row dim (and ids per example)."""
    sizes = plan.sizes
    if plan.kind == "factored":
        return len(sizes) == 2 and sizes[0] * sizes[1] == parameters
    if plan.kind == "dense":
        return sum(sizes) == parameters
    if plan.kind == "rows":
        return len(sizes) == 3 and sizes[0] * sizes[1] == parameters
    return True  # opaque: its norm only


def _plan_is_whole(plan: BlockPlan, following: BlockPlan | None) -> bool:
    """Whether ``plan`` is one storage.plans.plan_blocks can make: a sketch per side, no wider than the side; an output
    side derived from a part of the ``following`` block, a dense one."""
    sizes, sketch, derived = plan.sizes, plan.sketch, plan.derived
    if plan.kind == "factored":
        from_following = derived is None or (
            following is not None and following.kind == "dense" and len(derived) == 2 and derived[0] == following.name
            and isinstance(derived[1], int) and 0 <= derived[1] < len(following.sizes))  # fmt: skip
        return from_following and len(sizes) == 2 == len(sketch) and all(d <= n for d, n in zip(sketch, sizes))
    if plan.kind == "dense":  # below: examples count the (delta, a) pairs of a factored block's row only
        return derived is None and plan.examples == 1 and len(sketch) == 1 and sketch[0] <= sum(sizes)
    return derived is None and plan.examples == 1 and not any(sketch)


def check_file(path: Path, digest: str | None, what: str) -> None:
    problem = _file_problem(path, digest, what)
    if problem is not None:
        raise InputError(problem)


class RowLabels:
    """Labels of training rows, computed on access (an index may have millions of rows)."""

    def __init__(self, hrt: np.ndarray, entities: list[str], relations: list[str]):
        self.hrt, self.entities, self.relations = hrt, entities, relations

    def of(self, ids: Sequence[int]) -> tuple[str, str, str]:
        h, r, t = ids
        return self.entities[h], self.relations[r], self.entities[t]

    def __getitem__(self, row: int) -> tuple[str, str, str]:
        return self.of(self.hrt[row])
