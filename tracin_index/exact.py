r"""Exact TracIn (ground truth): every training triple scored against the test triples.

.. math::

    \mathrm{influence}(z, z') = \sum_c \eta_c \, \langle g_S(z; \theta_c), g_S(z'; \theta_c) \rangle

over checkpoints :math:`c` with learning rates :math:`\eta_c`, for the gradient :math:`g_S` of
the per-triple loss restricted to the selected parameters :math:`S`. Each checkpoint is loaded
once per call and each test gradient computed once per checkpoint; training gradients come a
batch at a time from :class:`~tracin_index.gradients.computer.GradientComputer` and are never stored.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
from torch import nn

from .errors import InputError
from .gradients.adam import Preconditioner, check_optimizer
from .gradients.blocks import PerExampleGradients, cosine
from .gradients.computer import GradientComputer, LossName, check_gradients
from .gradients.selection import ParameterSelection, select_parameters
from .kg.directions import DEFAULT_DIRECTION, TRAIN, check_direction, training_examples
from .results import InfluenceResult, Triple, sign_counts, top_influences

if TYPE_CHECKING:
    from .kg.checkpoints import Checkpoint
    from .kg.triples import IdMaps


def _as_id_triples(triples, name: str) -> torch.Tensor:
    if isinstance(triples, (list, tuple)) and triples and torch.is_tensor(triples[0]):
        triples = torch.stack([torch.as_tensor(t) for t in triples])
    t = torch.as_tensor(triples, dtype=torch.long)
    if t.ndim == 1:
        t = t.view(1, -1)
    if t.ndim != 2 or t.shape[1] != 3:
        raise InputError(f"{name}: expected (head, relation, tail) id triples of shape (n, 3), got {tuple(t.shape)}")
    return t


class TracInAnalyzer:
    """Exact TracIn scores of PyKEEN models.

    :param model: a PyKEEN model (its current weights are the checkpoint when none are given).
    :param use_last_layers_only: differentiate the last ``num_last_layers`` layers (the original
        paper's practice); otherwise all parameters.
    :param last_layer_names: explicit module or parameter names (overrides the two above).
    :param checkpoints: :class:`~tracin_index.kg.checkpoints.Checkpoint` objects, each with its learning rate.
    :param loss: ``bce`` (default) or ``ce`` (1-N softmax), see DESIGN.md.
    :param direction: the test predictions explained, for a model trained with inverse triples:
        ``tail`` (default, f(h, r, t)), ``head`` (f(t, r_inv, h)) or ``both``. A training triple's
        gradient is always that of every example it was trained as (see :mod:`tracin_index.kg.directions`).
    :param normalize: the cosine form: each checkpoint's inner product divided by both gradients'
        norms at that checkpoint (a gradient of norm 0 contributes 0), so that influence ranks by
        the direction of the gradients, not their size.
    :param optimizer: ``sgd`` (default, plain TracIn) or ``adam``: the training gradient divided by the
        root of Adam's second moment recorded with each checkpoint (:mod:`tracin_index.gradients.adam`).
    """

    def __init__(
        self,
        model: nn.Module,
        use_last_layers_only: bool = True,
        num_last_layers: int = 2,
        last_layer_names: Sequence[str] | None = None,
        device: str | torch.device | None = None,
        *,
        checkpoints: Sequence["Checkpoint"] | None = None,
        loss: LossName = "bce",
        batch_size: int = 256,
        id_maps: "IdMaps | None" = None,
        progress: bool = False,
        direction: str = DEFAULT_DIRECTION,
        normalize: bool = False,
        optimizer: str = "sgd",
    ):
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        if last_layer_names:
            self.selection: ParameterSelection = select_parameters(model, mode="names", names=list(last_layer_names))
        elif use_last_layers_only:
            self.selection = select_parameters(model, mode="last", num_last_layers=num_last_layers)
        else:
            self.selection = select_parameters(model, mode="all")
        self.loss = loss
        self.gradients = GradientComputer(self.model, self.selection, loss)
        check_direction(direction, self.gradients.inverse)
        self.direction = direction
        self.normalize = bool(normalize)
        self.optimizer = check_optimizer(optimizer)
        if self.optimizer != "sgd" and self.normalize:
            raise InputError("--normalize with --optimizer adam is not supported; choose one")
        self.checkpoints = list(checkpoints or [])
        if self.optimizer != "sgd":
            if not self.checkpoints:
                raise InputError("--optimizer adam needs checkpoint files that record the optimizer's state; the model "
                                 "alone has none")  # fmt: skip
            names = self.selection.parameter_names
            # read (and refuse) before any work: one preconditioner per checkpoint
            parameters = dict(self.model.named_parameters())
            shapes = {n: tuple(parameters[n].shape) for n in names}
            self._preconditioners = [Preconditioner.at(c, names, shapes) for c in self.checkpoints]
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.id_maps = id_maps
        self.progress = progress

    # -- gradients at the model's current weights ---------------------------------------------

    def compute_gradient(self, triple, direction: str = TRAIN) -> dict[str, torch.Tensor]:
        """The loss gradient of one (head, relation, tail) id triple, by parameter name (dense): as a
        training triple (every example it was trained as), or of one test ``direction``."""
        grads = self.gradients.compute(_as_id_triples(triple, "triple"), direction).to_dense()
        return {name: g[0] for name, g in grads.items()}

    def compute_batch_individual_gradients(self, triples) -> PerExampleGradients:
        """Per-example gradients of a batch, structured (factored Linear layers, embedding rows)."""
        return self.gradients.compute(_as_id_triples(triples, "triples"))

    # -- scores over checkpoints --------------------------------------------------------------

    @contextlib.contextmanager
    def _at_checkpoints(self) -> Iterator[Iterator[float]]:
        """Yields an iterator that loads each checkpoint in turn (once) and yields its learning rate."""
        original = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

        def walk() -> Iterator[float]:
            if not self.checkpoints:
                yield 1.0
                return
            for checkpoint in self.checkpoints:
                checkpoint.load_into(self.model)
                yield checkpoint.learning_rate

        try:
            yield walk()
        finally:
            self.model.load_state_dict(original)
            self.model.eval()

    def _batches(self, training: torch.Tensor, description: str):
        starts = range(0, training.shape[0], self.batch_size)
        if not self.progress:
            yield from starts
            return
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task(description, total=len(starts))
            for start in starts:
                yield start
                bar.advance(task)

    def influence_scores(self, test_triples, training_triples) -> torch.Tensor:
        """Exact TracIn of every training triple on every test triple, shape (num_test, num_train)."""
        return self._scores_and_norms(test_triples, training_triples)[0]

    def _scores_and_norms(self, test_triples, training_triples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The scores, and the squared gradient norms of the test and training triples summed over
        checkpoints (unweighted: they tell whether the gradients vanished)."""
        test = _as_id_triples(test_triples, "test triples").to(self.device)
        training = _as_id_triples(training_triples, "training triples").to(self.device)
        scores = torch.zeros(test.shape[0], training.shape[0], dtype=torch.float64, device=self.device)
        test_norms = torch.zeros(test.shape[0], dtype=torch.float64, device=self.device)
        train_norms = torch.zeros(training.shape[0], dtype=torch.float64, device=self.device)
        with self._at_checkpoints() as learning_rates:
            for c, lr in enumerate(learning_rates):
                if c == 0:
                    self.gradients.check(training_examples(training[:8], self.gradients.inverse))
                g_test = self.gradients.compute(test, self.direction)
                test_squared = g_test.squared_norms().double()
                test_norms += test_squared
                if self.optimizer != "sgd":  # <P g_train, g_test> = <g_train, P g_test>: P on the few test gradients
                    g_test = self._preconditioners[c].to(self.device).apply(g_test)
                for start in self._batches(training, f"checkpoint {c + 1}: scoring training triples"):
                    g_train = self.gradients.compute(training[start : start + self.batch_size])
                    train_squared = g_train.squared_norms().double()
                    dots = g_test.dot(g_train).double()
                    if self.normalize:
                        dots = cosine(dots, test_squared, train_squared)
                    scores[:, start : start + self.batch_size] += lr * dots
                    train_norms[start : start + self.batch_size] += train_squared
        return scores, test_norms, train_norms

    def self_influence(self, training_triples) -> torch.Tensor:
        """sum_c lr_c * ||g(z; theta_c)||^2 for every training triple, shape (num_train,)."""
        training = _as_id_triples(training_triples, "training triples").to(self.device)
        scores = torch.zeros(training.shape[0], dtype=torch.float64, device=self.device)
        with self._at_checkpoints() as learning_rates:
            for c, lr in enumerate(learning_rates):
                for start in self._batches(training, f"checkpoint {c + 1}: self-influence"):
                    g = self.gradients.compute(training[start : start + self.batch_size])
                    scores[start : start + self.batch_size] += lr * g.squared_norms().double()
        return scores

    def _labels(self, triples: torch.Tensor) -> list[tuple[str, str, str]]:
        if self.id_maps is None:
            return [tuple(str(x) for x in row) for row in triples.tolist()]
        return [tuple(row) for row in self.id_maps.to_labels(triples).tolist()]

    def compute_influences(
        self, test_triples, training_triples, top_k: int = 10, test_indices: Sequence[int | None] | None = None
    ) -> list[InfluenceResult]:
        """Top-k proponents and opponents of each test triple; one pass over the training set for all."""
        test = _as_id_triples(test_triples, "test triples")
        training = _as_id_triples(training_triples, "training triples")
        if top_k < 1:
            raise InputError(f"top-k must be at least 1, got {top_k}")
        scores, test_norms, train_norms = self._scores_and_norms(test, training)
        scores = scores.cpu()
        train_labels = self._labels(training)
        test_labels = self._labels(test)
        check_gradients(train_norms.cpu(), test_norms.cpu(), self.loss, [f"({', '.join(t)})" for t in test_labels])
        indices = list(test_indices) if test_indices is not None else [None] * test.shape[0]
        results = []
        for row, (index, labels) in enumerate(zip(indices, test_labels)):
            proponents, opponents = top_influences(scores[row], top_k, train_labels)
            results.append(InfluenceResult(index, Triple(*labels), proponents, opponents, *sign_counts(scores[row])))
        return results

    def compute_influences_for_test_triple(self, test_triple, training_triples, top_k: int = 10) -> InfluenceResult:
        """Top-k proponents and opponents of one (head, relation, tail) id triple."""
        return self.compute_influences([test_triple], training_triples, top_k)[0]
