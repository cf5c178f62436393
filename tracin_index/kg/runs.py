"""PyKEEN models and run directories: rebuilding a model from its configuration, loading one for a command.

A run directory is what ``tracin-index train`` and :class:`~tracin_index.kg.callback.TracInCheckpointCallback` write: enough to
rebuild the model without unpickling anything (``config.json`` + plain tensors), the label maps, the
training triples in training-index order, and one checkpoint file per saved epoch with the learning
rate used during that epoch (TracIn weighs each checkpoint by it)::

    run/
      config.json                 {"format": "tracin-index-run", "format_version": 1, "model": ..., ...}
      model.pt                    {"model_state_dict": ...}
      checkpoints/epoch-0005.pt   {"model_state_dict": ..., "learning_rate": float, "epoch": int}
      entity_to_id.tsv.gz, relation_to_id.tsv.gz
      train.tsv, valid.tsv, test.tsv

PyKEEN's own folder, ``PipelineResult.save_to_directory``, is one too (its model a pickle, loaded only when
allowed); its training factory, written by ``TriplesFactory.to_path_binary``, is read back by PyKEEN::

    pkl/
      trained_model.pkl           the model, pickled
      training_triples/           base.pth (sizes, inverse triples; pickled), numeric_triples.tsv.gz
                                  (ids, row i is training index i), entity_to_id.tsv.gz, relation_to_id.tsv.gz
"""

from __future__ import annotations

import contextlib
import difflib
import json
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from pykeen.models import Model
from pykeen.triples import CoreTriplesFactory, TriplesFactory

from ..errors import InputError, ModelLoadError, PickleRefusedError, TracInWarning
from ..files import write_atomic, write_json_atomic
from .checkpoints import (
    CHECKPOINT_SUFFIXES,
    Checkpoint,
    NeedsPickle,
    find_checkpoints,
    load_state_dict_into,
    load_weights_only,
    read_state_dict,
)
from .support import check_supported
from .triples import IdMaps, LabeledTriples, write_id_map, write_labeled_triples

__all__ = [
    "RUN_FORMAT",
    "RUN_FORMAT_VERSION",
    "Checkpoint",
    "LoadedRun",
    "TrainingTriples",
    "ModelConfig",
    "TracInWarning",
    "build_model",
    "find_checkpoints",
    "load_model",
    "load_state_dict_into",
    "model_class",
    "save_run_directory",
]

RUN_FORMAT = "tracin-index-run"
RUN_FORMAT_VERSION = 1

CONFIG_FILE = "config.json"
MODEL_FILE = "model.pt"
CHECKPOINT_DIR = "checkpoints"
ENTITY_MAP_FILE = "entity_to_id.tsv.gz"
RELATION_MAP_FILE = "relation_to_id.tsv.gz"
TRAIN_FILE = "train.tsv"
VALID_FILE = "valid.tsv"
TEST_FILE = "test.tsv"
PYKEEN_PICKLE_FILE = "trained_model.pkl"  # PipelineResult.save_to_directory
PYKEEN_TRAINING_DIR = "training_triples"  # ... and its training factory, with the label maps

_PICKLE_REFUSED = (
    "{path}: is a pickled PyKEEN model; unpickling runs arbitrary code. Pass --allow-pickle if you trust "
    "this file, or use a run directory written by `tracin-index train`"
)


# --------------------------------------------------------------------------------------------------
# Configuration and model construction


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild an untrained PyKEEN model of the right shape (``config.json``).

    ``num_relations`` counts the base relations; PyKEEN doubles it when ``create_inverse_triples``.
    ``extra`` holds the other top-level keys of ``config.json`` (``pykeen_version``, ``dataset``,
    ``training``, ...), kept as they are.
    """

    model: str
    model_kwargs: dict = field(default_factory=dict)
    num_entities: int = 0
    num_relations: int = 0
    create_inverse_triples: bool = False
    random_seed: int | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "format": RUN_FORMAT,
            "format_version": RUN_FORMAT_VERSION,
            "model": self.model,
            "model_kwargs": dict(self.model_kwargs),
            "num_entities": self.num_entities,
            "num_relations": self.num_relations,
            "create_inverse_triples": self.create_inverse_triples,
            "random_seed": self.random_seed,
            **self.extra,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any], source: str) -> ModelConfig:
        if not isinstance(d, Mapping):
            raise ModelLoadError(f"{source}: expected a JSON object, found {type(d).__name__}")
        fmt = d.get("format", RUN_FORMAT)
        if fmt != RUN_FORMAT:
            raise ModelLoadError(f"{source}: format is {fmt!r}, expected {RUN_FORMAT!r}")
        version = d.get("format_version", RUN_FORMAT_VERSION)
        if not isinstance(version, int) or version > RUN_FORMAT_VERSION:
            raise ModelLoadError(
                f"{source}: format_version {version!r} is newer than this tracin-index reads "
                f"({RUN_FORMAT_VERSION}); upgrade tracin-index"
            )

        def get(key: str, types: type | tuple[type, ...], type_name: str) -> Any:
            if key not in d:
                raise ModelLoadError(f"{source}: missing key {key!r}")
            value = d[key]
            # bool is an int in Python; a count must not be true/false
            if not isinstance(value, types) or (type_name == "an integer" and isinstance(value, bool)):
                raise ModelLoadError(f"{source}: key {key!r} must be {type_name}, found {value!r}")
            return value

        seed = d.get("random_seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ModelLoadError(f"{source}: key 'random_seed' must be an integer or null, found {seed!r}")
        core = {
            "format", "format_version", "model", "model_kwargs", "num_entities", "num_relations",
            "create_inverse_triples", "random_seed",
        }  # fmt: skip
        return cls(
            model=get("model", str, "a string"),
            model_kwargs=dict(get("model_kwargs", dict, "an object")),
            num_entities=get("num_entities", int, "an integer"),
            num_relations=get("num_relations", int, "an integer"),
            create_inverse_triples=get("create_inverse_triples", bool, "true or false"),
            random_seed=seed,
            extra={k: v for k, v in d.items() if k not in core},
        )


def model_class(name: str) -> type[Model]:
    """The PyKEEN model class called ``name`` (any spelling PyKEEN's resolver accepts)."""
    from pykeen.models import model_resolver

    try:
        return model_resolver.lookup(name)
    except (KeyError, ValueError, TypeError):
        pass
    names = sorted(cls.__name__ for cls in model_resolver)
    by_lower = {n.lower(): n for n in names}
    close = [by_lower[c] for c in difflib.get_close_matches(str(name).lower(), list(by_lower), n=5, cutoff=0.5)]
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ModelLoadError(f"unknown PyKEEN model {name!r}; {hint}known models: {', '.join(names)}")


@contextlib.contextmanager
def _preserved_random_state() -> Iterator[None]:
    """PyKEEN seeds the global RNGs when a model is built; loading a model should not reseed the caller."""
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.random.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def build_model(config: ModelConfig) -> Model:
    """An untrained model of the configured class and shape, on CPU, in eval mode.

    PyKEEN models need a triples factory only for its sizes (and, for message-passing models such
    as R-GCN, its graph; those are not supported here); a factory with one dummy triple stands in.
    """
    from pykeen.models import model_resolver

    cls = model_class(config.model)
    check_supported(cls.__name__)
    factory = CoreTriplesFactory.create(
        mapped_triples=torch.zeros((1, 3), dtype=torch.long),
        num_entities=config.num_entities,
        num_relations=config.num_relations,
        create_inverse_triples=config.create_inverse_triples,
    )
    # the weights are overwritten by a state dict; a fixed seed only keeps PyKEEN from warning
    seed = config.random_seed if config.random_seed is not None else 0
    try:
        with _preserved_random_state():
            model = model_resolver.make(cls, config.model_kwargs, triples_factory=factory, random_seed=seed)
    except Exception as error:  # PyKEEN raises whatever the constructor raises
        raise ModelLoadError(
            f"cannot build {cls.__name__} with model_kwargs {config.model_kwargs}: {type(error).__name__}: {error}"
        ) from error
    return model.cpu().eval()


# --------------------------------------------------------------------------------------------------
# Loading a model for the CLI


@dataclass(frozen=True)
class TrainingTriples:
    """Training triples as ids, row i being training index i, and the file they are (or were read) from."""

    path: Path
    ids: torch.LongTensor  # (n, 3)
    line_numbers: np.ndarray | None = None  # 1-based, of each row in ``path``; None where not read from it


@dataclass
class LoadedRun:
    """What ``--model-path`` gives: the model (CPU, eval mode) and whatever its directory holds.

    ``training_ids`` are the training triples of a ``save_to_directory`` folder as PyKEEN read them
    (``training_path`` is their ``numeric_triples.tsv.gz``); a run directory's are ``training_path``'s labels.
    """

    model: Model
    config: ModelConfig | None
    source: Path
    id_maps: IdMaps | None = None
    training_path: Path | None = None
    test_path: Path | None = None
    checkpoints: list[Checkpoint] = field(default_factory=list)
    training_ids: torch.LongTensor | None = None

    def read_training(self, given: str | Path | None = None, id_maps: IdMaps | None = None) -> TrainingTriples:
        """The training triples numbered by ``id_maps`` (default: the directory's): the file given (labels, or
        PyKEEN's numeric triples), else the directory's own."""
        id_maps = self.resolve_id_maps() if id_maps is None else id_maps
        if given is None and self.training_ids is not None:
            if self.id_maps is not None and id_maps != self.id_maps:
                raise InputError(f"{self.training_path}: its ids are numbered by the maps beside it, not by the "
                                 "--entity-to-id/--relation-to-id given; pass --train with the triples as labels")  # fmt: skip
            return TrainingTriples(self.training_path, self.training_ids)
        path = given or self.training_path
        if path is None:
            raise InputError(f"no training triples: pass --train ({self.source} has none)")
        ids, line_numbers = id_maps.read_ids_and_lines(path)
        return TrainingTriples(Path(path), ids, line_numbers)

    def resolve_id_maps(self, entity_to_id: str | Path | None = None, relation_to_id: str | Path | None = None) -> IdMaps:
        """The id maps given on the command line, else the run directory's; they must fit the model."""
        if entity_to_id or relation_to_id:
            if not (entity_to_id and relation_to_id):
                raise InputError("give both --entity-to-id and --relation-to-id, or neither to use the run directory's")
            maps = IdMaps.from_files(entity_to_id, relation_to_id)
        elif self.id_maps is not None:
            maps = self.id_maps
        else:
            raise InputError(
                f"{self.source}: no id maps found; pass --entity-to-id and --relation-to-id (PyKEEN's "
                "entity_to_id.tsv.gz and relation_to_id.tsv.gz)"
            )
        if maps.num_entities != self.model.num_entities:
            raise InputError(
                f"id maps have {maps.num_entities} entities but the model has {self.model.num_entities}: "
                "pass the maps the model was trained with"
            )
        return maps


def load_model(path: str | Path, *, allow_pickle: bool = False) -> LoadedRun:
    """Load a run directory (``config.json`` + ``model.pt``), or a pickled PyKEEN model if allowed.

    Pickled models (``torch.save(model)``, or a ``save_to_directory`` folder with
    ``trained_model.pkl``) are recognised without unpickling them: a weights-only load refuses them.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    if path.is_file() and path.name == CONFIG_FILE:
        path = path.parent
    if path.is_dir():
        if (path / CONFIG_FILE).is_file():
            return _load_run_directory(path)
        if (path / PYKEEN_PICKLE_FILE).is_file():
            return _load_pickled(path / PYKEEN_PICKLE_FILE, allow_pickle=allow_pickle, maps_dir=path / PYKEEN_TRAINING_DIR)
        raise ModelLoadError(
            f"{path}: neither a run directory (no {CONFIG_FILE}) nor a PyKEEN results directory "
            f"(no {PYKEEN_PICKLE_FILE}); train one with `tracin-index train`"
        )
    # trained_model.pkl given itself: its save_to_directory folder keeps the id maps beside it
    beside = path.parent / PYKEEN_TRAINING_DIR
    return _load_pickled(path, allow_pickle=allow_pickle, maps_dir=beside if beside.is_dir() else None)


def _load_run_directory(directory: Path) -> LoadedRun:
    config_path = directory / CONFIG_FILE
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{config_path}: not readable JSON ({error})") from error
    config = ModelConfig.from_json(data, source=str(config_path))
    model = build_model(config)

    checkpoint_dir = directory / CHECKPOINT_DIR
    has_checkpoints = checkpoint_dir.is_dir() and any(
        p.suffix in CHECKPOINT_SUFFIXES and not p.name.startswith(".") for p in checkpoint_dir.iterdir()
    )
    checkpoints = find_checkpoints([checkpoint_dir]) if has_checkpoints else []

    model_path = directory / MODEL_FILE
    if model_path.is_file():
        load_state_dict_into(model, read_state_dict(model_path), str(model_path))
    elif checkpoints:
        # an interrupted training leaves checkpoints but no final model
        last = checkpoints[-1]
        warnings.warn(f"{model_path}: missing (training interrupted?); using the weights of {last.path}", TracInWarning, stacklevel=3)
        load_state_dict_into(model, last.load_state_dict(), str(last.path))
    else:
        raise ModelLoadError(f"{model_path}: missing, and no checkpoints in {checkpoint_dir}; the training did not finish")
    model.eval()

    id_maps = None
    entity_path, relation_path = directory / ENTITY_MAP_FILE, directory / RELATION_MAP_FILE
    if entity_path.is_file() and relation_path.is_file():
        id_maps = IdMaps.from_files(entity_path, relation_path)
        _check_map_sizes(id_maps, config.num_entities, config.num_relations, str(directory))

    def present(name: str) -> Path | None:
        return directory / name if (directory / name).is_file() else None

    return LoadedRun(
        model=model,
        config=config,
        source=directory,
        id_maps=id_maps,
        training_path=present(TRAIN_FILE),
        test_path=present(TEST_FILE),
        checkpoints=checkpoints,
    )


def _check_map_sizes(id_maps: IdMaps, num_entities: int, num_relations: int, source: str) -> None:
    if len(id_maps.entity_to_id) != num_entities or len(id_maps.relation_to_id) != num_relations:
        raise ModelLoadError(
            f"{source}: the id maps hold {len(id_maps.entity_to_id)} entities and {len(id_maps.relation_to_id)} "
            f"relations but the model has {num_entities} and {num_relations}; the maps belong to another dataset"
        )


def _load_pickled(path: Path, *, allow_pickle: bool, maps_dir: Path | None) -> LoadedRun:
    try:
        obj = load_weights_only(path)
    except NeedsPickle:
        obj = None
    else:
        what = "a state dict" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise ModelLoadError(
            f"{path}: holds {what}, not a model; to rebuild the model tracin-index needs its configuration: "
            f"give the run directory written by `tracin-index train` (config.json + model.pt)"
        )
    if not allow_pickle:
        raise PickleRefusedError(_PICKLE_REFUSED.format(path=path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ModelLoadError(f"{path}: unpickling failed ({type(error).__name__}: {error})") from error
    if not isinstance(obj, Model):
        raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, not a PyKEEN model")
    check_supported(obj)
    model = obj.cpu().eval()

    id_maps = training_path = training_ids = None
    if maps_dir is not None and (maps_dir / TriplesFactory.base_file_name).is_file():
        factory = _read_training_factory(maps_dir, model)  # unpickles base.pth: allowed with the model
        id_maps, training_ids = IdMaps.from_triples_factory(factory), factory.mapped_triples
        training_path = maps_dir / TriplesFactory.triples_file_name
    elif maps_dir is not None:
        entity_path = maps_dir / f"{TriplesFactory.file_name_entity_to_id}.tsv.gz"
        relation_path = maps_dir / f"{TriplesFactory.file_name_relation_to_id}.tsv.gz"
        if entity_path.is_file() and relation_path.is_file():
            id_maps = IdMaps.from_files(entity_path, relation_path)
            _check_map_sizes(id_maps, model.num_entities, model.num_real_relations, str(maps_dir))
    return LoadedRun(model=model, config=None, source=path, id_maps=id_maps, training_path=training_path,
                     training_ids=training_ids)  # fmt: skip


def _read_training_factory(folder: Path, model: Model) -> TriplesFactory:
    """The training factory ``save_to_directory`` wrote to ``folder``, read by PyKEEN; it must be the model's."""
    try:
        factory = TriplesFactory.from_path_binary(folder)
    except Exception as error:  # PyKEEN raises whatever pandas or torch.load raise
        raise ModelLoadError(f"{folder}: PyKEEN cannot read its training triples ({type(error).__name__}: {error})") from error
    _check_map_sizes(IdMaps.from_triples_factory(factory), model.num_entities, model.num_real_relations, str(folder))
    if factory.create_inverse_triples != model.use_inverse_triples:
        trained = "with" if model.use_inverse_triples else "without"
        raise ModelLoadError(f"{folder}: its training triples say create_inverse_triples={factory.create_inverse_triples}, "
                             f"but the model was trained {trained} inverse triples; the folder mixes two runs")  # fmt: skip
    return factory


# --------------------------------------------------------------------------------------------------
# Writing run directories


def write_torch(obj: Any, path: Path) -> None:
    write_atomic(path, lambda p: torch.save(obj, p))


def cpu_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().cpu().clone() for name, value in model.state_dict().items()}


def _label_rows(triples: LabeledTriples | np.ndarray | torch.Tensor, id_maps: IdMaps | None, name: str):
    """Labels to write: LabeledTriples, an (n, 3) array of labels, or ids mapped back through ``id_maps``."""
    if isinstance(triples, LabeledTriples):
        return triples
    array = triples.cpu().numpy() if isinstance(triples, torch.Tensor) else np.asarray(triples)
    if array.ndim != 2 or array.shape[1] != 3:
        raise InputError(f"{name}: expected an (n, 3) array of triples, found shape {array.shape}")
    if np.issubdtype(array.dtype, np.integer):
        if id_maps is None:
            raise InputError(f"{name}: id triples need id maps to be written as labels")
        return id_maps.to_labels(array)
    return array


def save_run_directory(
    directory: str | Path,
    *,
    model: Model,
    config: ModelConfig,
    id_maps: IdMaps | None,
    training: LabeledTriples | np.ndarray | None,
    validation: LabeledTriples | np.ndarray | None = None,
    testing: LabeledTriples | np.ndarray | None = None,
) -> None:
    """Write (or complete) a run directory; every file is written atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / CONFIG_FILE, config.to_json())
    write_torch({"model_state_dict": cpu_state_dict(model)}, directory / MODEL_FILE)
    if id_maps is not None:
        write_atomic(directory / ENTITY_MAP_FILE, lambda p: write_id_map(id_maps.entity_to_id, p))
        write_atomic(directory / RELATION_MAP_FILE, lambda p: write_id_map(id_maps.relation_to_id, p))
    for triples, name in ((training, TRAIN_FILE), (validation, VALID_FILE), (testing, TEST_FILE)):
        if triples is not None:
            rows = _label_rows(triples, id_maps, name)
            write_atomic(directory / name, lambda p, t=rows: write_labeled_triples(t, p))


def pykeen_version() -> str:
    from pykeen.version import get_version

    return get_version()








#: The public name of :func:`load_model`: a run directory (or, with ``allow_pickle``, a pickled model) loaded.
load_run = load_model
