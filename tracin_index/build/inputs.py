"""The build's inputs: the model, its checkpoints and the training triples, loaded once, and the
record of them the manifest keeps (paths relative to the index, sha256 of every file, a fingerprint
of the training ids) so that queries and ``verify`` can tell when one changed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ..kg.checkpoints import Checkpoint, find_checkpoints
from ..kg.triples import IdMaps, warn_duplicates
from ..storage.layout import fingerprint_ids, relative_path, sha256_file

if TYPE_CHECKING:
    from ..kg.runs import LoadedRun


@dataclass
class BuildInputs:
    """The build's inputs, loaded: model, checkpoints, training ids, id maps and where they came from."""

    run: "LoadedRun"
    model_path: Path
    training_path: Path
    checkpoints: list[Checkpoint]
    hrt: torch.Tensor
    id_maps: IdMaps


def model_files(source: Path) -> list[Path]:
    """The files whose bytes define the model as loaded from ``source``."""
    if source.is_dir():
        return [p for p in (source / "config.json", source / "model.pt", source / "trained_model.pkl") if p.is_file()]
    return [source]


def load_inputs(*, model_path, allow_pickle: bool, training_path, checkpoint_paths: Sequence | None, entity_to_id,
                relation_to_id, log: Callable[[str], None]) -> BuildInputs:  # fmt: skip
    """Load the model (a pickled one only with ``allow_pickle``), the training triples (streamed: the labels
    of millions of rows are never held at once) and the checkpoints (given, else the run directory's)."""
    from ..kg.runs import load_model  # PyKEEN: seconds to import; a query of a built index may not need it

    run = load_model(model_path, allow_pickle=allow_pickle)
    id_maps = run.resolve_id_maps(entity_to_id, relation_to_id)
    training = run.read_training(training_path, id_maps)  # labels, or PyKEEN's numeric triples
    hrt = training.ids
    warn_duplicates(hrt, str(training.path), training.line_numbers)
    checkpoints = find_checkpoints(checkpoint_paths) if checkpoint_paths else run.checkpoints
    if not checkpoints:
        log("no checkpoints: the model itself is the only checkpoint (learning rate 1.0)")
    return BuildInputs(run, Path(model_path), training.path, list(checkpoints), hrt, id_maps)


def inputs_record(inputs: BuildInputs, checkpoints: Sequence[Checkpoint], out: Path) -> dict[str, Any]:
    """The manifest's ``inputs``: where the model, the ``checkpoints`` and the training triples came from,
    and the digests that tell whether they changed."""
    return {
        "model": {
            "source": relative_path(inputs.model_path, out),
            "pickled": inputs.run.config is None,  # a fact about the file; never a permission to unpickle it
            "files": {p.name: sha256_file(p) for p in model_files(inputs.model_path.resolve())},
        },
        "checkpoints": [
            {"path": None if c.path is None else relative_path(c.path, out),
             "sha256": None if c.path is None else sha256_file(c.path),
             "learning_rate": c.learning_rate, "epoch": c.epoch}
            for c in checkpoints
        ],  # fmt: skip
        "training": {"source": relative_path(inputs.training_path, out), "num_triples": int(inputs.hrt.shape[0]),
                     "fingerprint": fingerprint_ids(inputs.hrt.numpy())},  # fmt: skip
    }
