"""``tracin-index train``: train a PyKEEN model and write a run directory with checkpoints.

The run directory (see :mod:`tracin_index.kg.runs`) is what ``build`` and ``exact`` read: the model
rebuilt from ``config.json`` without unpickling, the label maps, the training triples in training
order, and a checkpoint every few epochs with the learning rate used during that epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from pykeen.training import TrainingCallback

from ..errors import InputError, ModelLoadError
from .callback import TracInCheckpointCallback
from .runs import ModelConfig, model_class, pykeen_version, save_run_directory
from .support import check_supported
from .triples import REPEATS_IN_TRAINING, IdMaps, make_id_maps, read_labeled_triples, warn_duplicates

__all__ = ["BUNDLED_DATASETS", "train_run"]

#: Datasets shipped inside PyKEEN (no download); others need the network.
BUNDLED_DATASETS = ("nations", "umls", "kinships")

#: Models PyKEEN recommends training with inverse triples.
_INVERSE_TRIPLE_MODELS = {"ConvE"}


def train_run(
    out: str | Path,
    *,
    dataset: str | None = "nations",
    train_path: str | Path | None = None,
    valid_path: str | Path | None = None,
    test_path: str | Path | None = None,
    model: str = "ConvE",
    model_kwargs: dict | None = None,
    epochs: int = 20,
    checkpoint_every: int = 5,
    learning_rate: float = 0.001,
    batch_size: int = 256,
    optimizer: str = "adam",
    training_loop: str = "slcwa",
    num_negs_per_pos: int = 1,
    loss: str | None = None,
    random_seed: int = 42,
    device: str = "cpu",
    progress: bool = True,
    inverse_triples: bool | None = None,
) -> Path:
    """Train ``model`` on a bundled dataset or on TSV files and write a run directory to ``out``.

    A checkpoint is written every ``checkpoint_every`` epochs and after the final epoch. ``loss``
    None keeps the model's PyKEEN default (e.g. BCEAfterSigmoidLoss for ConvE). ``inverse_triples``
    None: as PyKEEN advises (ConvE trains with inverse triples, the others without). Every file in
    ``out`` is written atomically; ``model.pt`` appears only when training has finished.
    Returns ``out``.
    """
    from pykeen.models import model_resolver
    from pykeen.training import training_loop_resolver
    from pykeen.utils import set_random_seed

    out = Path(out)
    _check_settings(epochs=epochs, checkpoint_every=checkpoint_every, learning_rate=learning_rate,
                    batch_size=batch_size, num_negs_per_pos=num_negs_per_pos)  # fmt: skip
    _check_out_directory(out)
    try:
        model_cls = model_class(model)
    except ModelLoadError as error:
        raise InputError(str(error)) from error
    check_supported(model_cls.__name__)  # before any training: its gradients could not be explained
    loop_cls = _lookup(training_loop_resolver, training_loop, "training loop")
    optimizer_cls = _optimizer_class(optimizer)
    if loss is not None:
        _loss_class(loss)  # fail before training, not inside PyKEEN
    torch_device = _device(device)

    create_inverse_triples = model_cls.__name__ in _INVERSE_TRIPLE_MODELS if inverse_triples is None else inverse_triples
    splits = _load_splits(dataset, train_path, valid_path, test_path, create_inverse_triples)
    training = splits.training

    model_kwargs = dict(model_kwargs or {})
    if loss is not None:
        model_kwargs["loss"] = loss  # a model kwarg in PyKEEN, so config.json rebuilds the same model
    set_random_seed(random_seed)  # also fixes the shuffling of the training batches
    try:
        kge_model = model_resolver.make(model_cls, model_kwargs, triples_factory=training, random_seed=random_seed)
    except Exception as error:  # PyKEEN raises whatever the constructor raises
        raise InputError(f"cannot build {model_cls.__name__} with {model_kwargs}: {type(error).__name__}: {error}") from error
    kge_model = kge_model.to(torch_device)

    loop_kwargs: dict[str, Any] = dict(
        model=kge_model,
        triples_factory=training,
        optimizer=optimizer_cls,
        optimizer_kwargs=dict(lr=learning_rate),
        automatic_memory_optimization=False,  # keep the batches the user asked for
    )
    if loop_cls.__name__ == "SLCWATrainingLoop":
        loop_kwargs["negative_sampler_kwargs"] = dict(num_negs_per_pos=num_negs_per_pos)
    loop = loop_cls(**loop_kwargs)

    checkpoints = TracInCheckpointCallback(
        out, frequency=checkpoint_every, model_kwargs=model_kwargs, random_seed=random_seed, triples_factory=training
    )
    with _EpochProgress(epochs, enabled=progress) as progress_callback:
        losses = loop.train(
            triples_factory=training,
            num_epochs=epochs,
            batch_size=batch_size,
            use_tqdm=False,
            callbacks=[checkpoints, progress_callback],
            pin_memory=torch_device.type == "cuda",
        )

    training_record = {
        "loop": training_loop.lower(),
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "optimizer": optimizer.lower(),
        "loss": loss if loss is not None else type(kge_model.loss).__name__,
        "num_negs_per_pos": num_negs_per_pos if loop_cls.__name__ == "SLCWATrainingLoop" else None,
        "checkpoint_every": checkpoint_every,
        "device": str(torch_device),
        "losses": [float(x) for x in (losses or [])],
    }
    config = ModelConfig(
        model=model_cls.__name__,
        model_kwargs=model_kwargs,
        num_entities=training.num_entities,
        num_relations=training.real_num_relations,
        create_inverse_triples=create_inverse_triples,
        random_seed=random_seed,
        extra={
            "pykeen_version": pykeen_version(),
            "dataset": splits.name,
            "training": training_record,
        },
    )
    save_run_directory(
        out,
        model=kge_model,
        config=config,
        id_maps=splits.id_maps,
        training=splits.training_labels,
        validation=splits.validation_labels,
        testing=splits.testing_labels,
    )
    return out


# --------------------------------------------------------------------------------------------------
# Inputs


class _Splits:
    """The training factory (what PyKEEN trains on) and the labelled splits written to the run."""

    def __init__(self, name, training, id_maps, training_labels, validation_labels, testing_labels):
        self.name: str | None = name
        self.training = training
        self.id_maps: IdMaps = id_maps
        self.training_labels: np.ndarray = training_labels
        self.validation_labels: np.ndarray | None = validation_labels
        self.testing_labels: np.ndarray | None = testing_labels


def _load_splits(dataset, train_path, valid_path, test_path, create_inverse_triples: bool) -> _Splits:
    from pykeen.triples import TriplesFactory

    if train_path is None:
        if valid_path is not None or test_path is not None:
            raise InputError("--valid/--test were given without --train; give the training triples too")
        if dataset is None:
            raise InputError(f"give a dataset ({', '.join(BUNDLED_DATASETS)}) or a training TSV file")
        return _bundled_splits(dataset, create_inverse_triples)

    given = [read_labeled_triples(p) if p is not None else None for p in (train_path, valid_path, test_path)]
    present = [t for t in given if t is not None]
    # number labels over all splits, as PyKEEN does for its datasets, so valid/test labels are known
    id_maps = make_id_maps(np.concatenate([t.labels for t in present]))
    training_labels = given[0]
    warn_duplicates(id_maps.to_ids(training_labels), str(train_path), training_labels.line_numbers, REPEATS_IN_TRAINING)
    training = TriplesFactory(
        # to_ids keeps row order (row i = training index i); from_labeled_triples may drop rows
        mapped_triples=id_maps.to_ids(training_labels),
        entity_to_id=dict(id_maps.entity_to_id),
        relation_to_id=dict(id_maps.relation_to_id),
        create_inverse_triples=create_inverse_triples,
    )
    return _Splits(
        None, training, id_maps, training_labels.labels,
        given[1].labels if given[1] is not None else None,
        given[2].labels if given[2] is not None else None,
    )  # fmt: skip


def _bundled_splits(dataset: str, create_inverse_triples: bool) -> _Splits:
    from pykeen.datasets import UMLS, Kinships, Nations

    classes = {"nations": Nations, "umls": UMLS, "kinships": Kinships}
    key = dataset.strip().lower()
    if key not in classes:
        raise InputError(
            f"unknown dataset {dataset!r}; bundled datasets: {', '.join(BUNDLED_DATASETS)}. Other datasets need a "
            f"download; give them as TSV files (--train, --valid, --test)"
        )
    data = classes[key](create_inverse_triples=create_inverse_triples)
    training = data.training
    id_maps = IdMaps.from_triples_factory(training)

    def labels(factory):
        return factory.label_triples(factory.mapped_triples) if factory is not None else None

    return _Splits(key, training, id_maps, labels(training), labels(data.validation), labels(data.testing))


def _check_out_directory(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory; choose another output path")
    if out.is_dir() and any(out.iterdir()):
        raise InputError(f"{out}: is not empty; choose another output path (e.g. {out.name}-2) or empty it first")


def _check_settings(**settings: float) -> None:
    for name, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise InputError(f"{name.replace('_', '-')} must be a positive number, got {value!r}")
        if name != "learning_rate" and not isinstance(value, int):
            raise InputError(f"{name.replace('_', '-')} must be a whole number, got {value!r}")


def _lookup(resolver, name: str, what: str):
    try:
        return resolver.lookup(name)
    except (KeyError, ValueError, TypeError) as error:
        raise InputError(f"unknown {what} {name!r}; choose one of {', '.join(sorted(resolver.options))}") from error


def _optimizer_class(name: str):
    from class_resolver.contrib.torch import optimizer_resolver

    return _lookup(optimizer_resolver, name, "optimizer")


def _loss_class(name: str):
    from pykeen.losses import loss_resolver

    return _lookup(loss_resolver, name, "loss")


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise InputError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} asked for, but torch sees no CUDA GPU; use --device cpu")
    return device


# --------------------------------------------------------------------------------------------------
# Progress


class _EpochProgress(TrainingCallback):
    """A rich progress bar over epochs, with the last epoch's loss (PyKEEN's tqdm is switched off)."""

    def __init__(self, epochs: int, enabled: bool = True):
        super().__init__()
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("epochs  loss {task.fields[loss]}"),
            TimeRemainingColumn(),
            disable=not enabled,
            transient=False,
        )
        self._task = self._progress.add_task("training", total=epochs, loss="-")

    def __enter__(self) -> _EpochProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._progress.stop()

    def post_epoch(self, epoch: int, epoch_loss: float, **kwargs: Any) -> None:  # noqa: D102
        self._progress.update(self._task, completed=epoch, loss=f"{epoch_loss:.4f}")
