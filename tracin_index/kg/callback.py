"""The training callback: a run directory written while PyKEEN trains (see :mod:`tracin_index.kg.runs`)."""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path
from typing import Any

from pykeen.datasets import Dataset
from pykeen.models import Model
from pykeen.training.callbacks import TrainingCallback
from pykeen.triples import CoreTriplesFactory, TriplesFactory

from ..errors import InputError, ModelLoadError, TracInWarning
from ..files import write_atomic, write_json_atomic
from .checkpoints import load_state_dict_into, optimizer_record
from .runs import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    ENTITY_MAP_FILE,
    MODEL_FILE,
    RELATION_MAP_FILE,
    TEST_FILE,
    TRAIN_FILE,
    VALID_FILE,
    ModelConfig,
    build_model,
    cpu_state_dict,
    pykeen_version,
    write_torch,
)
from .triples import IdMaps, write_id_map, write_labeled_triples


class TracInCheckpointCallback(TrainingCallback):
    """Write a run directory while PyKEEN trains: config and maps first, a checkpoint every few epochs.

    Usage::

        dataset = Nations()
        pipeline(dataset=dataset, ..., training_kwargs=dict(callbacks=TracInCheckpointCallback(
            "run/", frequency=5, dataset=dataset)))

    Every ``frequency`` epochs (1-based) it writes ``checkpoints/epoch-0005.pt`` with the learning
    rate the optimizer used during that epoch (read before each optimizer step, so a scheduler
    stepping after the epoch does not shift it), and the final epoch always gets one. Each checkpoint
    also records the optimizer's second moments (Adam's ``exp_avg_sq``, for ``--optimizer adam``;
    about the size of the weights again). Pass the ``model_kwargs`` the model was built with so that
    ``config.json`` rebuilds it (it is checked). Pass the ``dataset`` too (a PyKEEN ``Dataset``, or a name
    ``pykeen.datasets.get_dataset`` resolves) and its validation and test splits are written as ``valid.tsv``
    and ``test.tsv``, as ``tracin-index train`` writes them; the training triples (``train.tsv``) come from
    the training loop either way.
    """

    def __init__(
        self,
        directory: str | Path,
        frequency: int = 1,
        model_kwargs: dict | None = None,
        random_seed: int | None = None,
        *,
        triples_factory: CoreTriplesFactory | None = None,
        dataset: Dataset | str | None = None,
        final_checkpoint: bool = True,
    ):
        super().__init__()
        if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1:
            raise InputError(f"checkpoint frequency must be a positive number of epochs, got {frequency!r}")
        self.model_kwargs = dict(model_kwargs or {})
        try:
            json.dumps(self.model_kwargs)
        except (TypeError, ValueError) as error:
            raise InputError(
                f"model_kwargs must be plain JSON values (numbers, strings, lists, dicts) so that config.json "
                f"can rebuild the model: {error}"
            ) from error
        self.directory = Path(directory)
        if (self.directory / CONFIG_FILE).exists():
            raise InputError(
                f"{self.directory}: already holds a run ({CONFIG_FILE}); choose another directory so that the "
                f"checkpoints of two trainings do not mix"
            )
        self.frequency = frequency
        self.random_seed = random_seed
        self.final_checkpoint = final_checkpoint
        self.triples_factory = triples_factory
        self.dataset = None if dataset is None else _dataset(dataset)
        self._epoch_learning_rate: float | None = None  # of the last optimizer step in this epoch
        self._last_learning_rate = 1.0
        self._config_written = False
        self._last_epoch: int | None = None
        self._last_checkpoint_epoch: int | None = None

    def register_training_loop(self, training_loop) -> None:  # noqa: D102
        super().register_training_loop(training_loop)
        if self.triples_factory is None:
            self.triples_factory = _training_factory_of(training_loop)
        if self.triples_factory is None and self.dataset is not None:
            self.triples_factory = self.dataset.training

    def pre_step(self, **kwargs: Any) -> None:  # noqa: D102
        self._epoch_learning_rate = float(self.optimizer.param_groups[0]["lr"])

    def post_epoch(self, epoch: int, epoch_loss: float, **kwargs: Any) -> None:  # noqa: D102
        if not self._config_written:
            self._write_config()
        learning_rate = self._epoch_learning_rate
        if learning_rate is None:  # no optimizer step this epoch
            learning_rate = float(self.optimizer.param_groups[0]["lr"])
        self._epoch_learning_rate = None
        self._last_epoch = epoch
        self._last_learning_rate = learning_rate
        if epoch % self.frequency == 0:
            self._write_checkpoint(epoch, learning_rate)

    def post_train(self, losses: list[float], **kwargs: Any) -> None:  # noqa: D102
        if not self._config_written:
            self._write_config()
        if self.final_checkpoint and self._last_epoch is not None and self._last_checkpoint_epoch != self._last_epoch:
            self._write_checkpoint(self._last_epoch, self._last_learning_rate)
        write_torch({"model_state_dict": cpu_state_dict(self.model)}, self.directory / MODEL_FILE)

    def _write_checkpoint(self, epoch: int, learning_rate: float) -> None:
        state = {"model_state_dict": cpu_state_dict(self.model), "learning_rate": learning_rate, "epoch": int(epoch),
                 "optimizer": optimizer_record(self.optimizer, self.model)}  # Adam's second moments: --optimizer adam
        write_torch(state, self.directory / CHECKPOINT_DIR / f"epoch-{epoch:04d}.pt")
        self._last_checkpoint_epoch = epoch

    def _config(self) -> ModelConfig:
        model = self.model
        factory = self.triples_factory
        if factory is not None:
            sizes = dict(
                num_entities=factory.num_entities,
                num_relations=factory.real_num_relations,
                create_inverse_triples=factory.create_inverse_triples,
            )
        else:
            sizes = dict(
                num_entities=model.num_entities,
                num_relations=model.num_real_relations,
                create_inverse_triples=model.use_inverse_triples,
            )
        optimizer = self.optimizer
        scheduler = getattr(self.training_loop, "lr_scheduler", None)
        training = {
            "loop": type(self.training_loop).__name__,
            "optimizer": type(optimizer).__name__,
            "learning_rate": float(optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])),
            "lr_scheduler": type(scheduler).__name__ if scheduler is not None else None,
            "loss": type(model.loss).__name__,
            "checkpoint_every": self.frequency,
        }
        seed = self.random_seed if self.random_seed is not None else getattr(model, "_random_seed", None)
        return ModelConfig(
            model=type(model).__name__,
            model_kwargs=self.model_kwargs,
            random_seed=seed if isinstance(seed, int) else None,
            extra={"pykeen_version": pykeen_version(), "training": training,
                   "dataset": None if self.dataset is None else self.dataset.get_normalized_name()},
            **sizes,
        )

    def _write_config(self) -> None:
        config = self._config()
        _check_rebuilds(config, self.model)
        self.directory.mkdir(parents=True, exist_ok=True)
        factory = self.triples_factory
        if isinstance(factory, TriplesFactory):
            id_maps = IdMaps.from_triples_factory(factory)
            labels = factory.label_triples(factory.mapped_triples)
            write_atomic(self.directory / ENTITY_MAP_FILE, lambda p: write_id_map(id_maps.entity_to_id, p))
            write_atomic(self.directory / RELATION_MAP_FILE, lambda p: write_id_map(id_maps.relation_to_id, p))
            write_atomic(self.directory / TRAIN_FILE, lambda p: write_labeled_triples(labels, p))
            self._write_splits(factory)
        else:
            warnings.warn(
                f"{self.directory}: the training triples have no labels (or PyKEEN did not pass them); no id maps "
                f"or {TRAIN_FILE} written. Pass triples_factory= to the callback to record them",
                TracInWarning,
                stacklevel=3,
            )
        # config.json last: its presence marks a directory that load_model can read
        write_json_atomic(self.directory / CONFIG_FILE, config.to_json())
        self._config_written = True

    def _write_splits(self, training: TriplesFactory) -> None:
        """valid.tsv and test.tsv from the dataset, if given, as labels (its splits share the training's maps)."""
        if self.dataset is None:
            return
        given = self.dataset.training
        if not isinstance(given, TriplesFactory) or (given.entity_to_id, given.relation_to_id) != (
            training.entity_to_id, training.relation_to_id
        ):
            warnings.warn(f"{self.directory}: the dataset given is not the one trained on (other id maps); no {VALID_FILE} "
                          f"or {TEST_FILE} written", TracInWarning, stacklevel=4)  # fmt: skip
            return
        for split, name in ((self.dataset.validation, VALID_FILE), (self.dataset.testing, TEST_FILE)):
            if isinstance(split, TriplesFactory):
                labels = split.label_triples(split.mapped_triples)
                write_atomic(self.directory / name, lambda p, rows=labels: write_labeled_triples(rows, p))


def _dataset(dataset: Dataset | str) -> Dataset:
    """The dataset whose splits the run directory records: a PyKEEN ``Dataset`` as it is, or one by name."""
    from pykeen.datasets import get_dataset

    try:
        return get_dataset(dataset=dataset)
    except (KeyError, ValueError, TypeError) as error:
        raise InputError(f"dataset {dataset!r}: not a PyKEEN dataset ({error})") from error


def _training_factory_of(training_loop) -> CoreTriplesFactory | None:
    """The factory ``training_loop`` is training on, read from the ``_train`` call on the stack.

    PyKEEN 1.11 hands callbacks the training loop but not the triples it trains on (the loop does not
    keep them); ``register_training_loop`` is called from inside ``TrainingLoop._train``, whose
    ``triples_factory`` argument is the one.
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code.co_name == "_train" and frame.f_locals.get("self") is training_loop:
                factory = frame.f_locals.get("triples_factory")
                return factory if isinstance(factory, CoreTriplesFactory) else None
            frame = frame.f_back
        return None
    finally:
        del frame


def _check_rebuilds(config: ModelConfig, model: Model) -> None:
    """Warn now, not when loading, if config.json would build a model of other shapes."""
    try:
        rebuilt = build_model(config)
        load_state_dict_into(rebuilt, cpu_state_dict(model), "the trained model")
    except ModelLoadError as error:
        warnings.warn(
            f"config.json will not rebuild this model ({error}); pass the model_kwargs the model was built "
            f"with to TracInCheckpointCallback",
            TracInWarning,
            stacklevel=4,
        )
