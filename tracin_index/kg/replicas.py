"""Plain-torch twins of some PyKEEN models, so that a query need not import PyKEEN.

Importing PyKEEN takes seconds (it pulls in scikit-learn and SciPy), more than a whole query of a
small index. A replica has the PyKEEN model's module and parameter names (its state dicts and
checkpoints load as they are) and computes ``score_hrt`` and ``score_t`` the same way. It is used
only where the build checked it against the PyKEEN model itself: the same scores and the same
per-example gradients of the selected parameters on sample triples, at the first checkpoint.
Otherwise queries load the model through PyKEEN as usual.

Replicas: ConvE and DistMult (PyKEEN 1.11). Everything here needs torch only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: Largest relative difference of scores and gradient inner products a replica may show.
TOLERANCE = 1e-5


class _Regularizer(nn.Module):
    """The buffers of PyKEEN's ``LpRegularizer`` (they are in the state dict; training uses them, scoring does not)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("weight", torch.zeros(()))
        self.register_buffer("regularization_term", torch.zeros(1))


class _Table(nn.Module):
    """PyKEEN's ``Embedding`` representation: an ``nn.Embedding`` named ``_embeddings``."""

    def __init__(self, rows: int, dim: int, regularized: bool = False):
        super().__init__()
        if regularized:
            self.regularizer = _Regularizer()
        self._embeddings = nn.Embedding(rows, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._embeddings(ids)


class PairLinear(nn.Linear):
    """A Linear layer that may be computed once per distinct (head, relation) pair: when ``row_map`` is
    set, its input holds one row per pair and its output one row per triple (``output[i] = y[row_map[i]]``).
    Per-example gradients then still come per triple (:mod:`tracin_index.gradients.computer` expands the input
    by ``row_map``), while the product, the expensive part of ConvE, is done once per pair."""

    row_map: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y if self.row_map is None else y.index_select(0, self.row_map)


class ConvEInteraction(nn.Module):
    """PyKEEN's ConvE interaction (same name: the 1-N ``ce`` gradients know it is linear in the tail)."""

    tail_indices = range(0, 2)  # the tail's embedding and bias

    def __init__(self, shape: dict[str, int], batch_norm: bool):
        super().__init__()
        self.shape = shape
        channels, out = shape["input_channels"], shape["output_channels"]
        layers_2d = [nn.BatchNorm2d(channels) if batch_norm else None, nn.Dropout(),
                     nn.Conv2d(channels, out, (shape["kernel_height"], shape["kernel_width"])),
                     nn.BatchNorm2d(out) if batch_norm else None, nn.ReLU(), nn.Dropout2d()]  # fmt: skip
        self.hr2d = nn.Sequential(*(layer for layer in layers_2d if layer is not None))
        features = out * (2 * shape["image_height"] - shape["kernel_height"] + 1) * (shape["image_width"] - shape["kernel_width"] + 1)
        layers_1d = [PairLinear(features, shape["embedding_dim"]), nn.Dropout(),
                     nn.BatchNorm1d(shape["embedding_dim"]) if batch_norm else None, nn.ReLU()]  # fmt: skip
        self.hr1d = nn.Sequential(*(layer for layer in layers_1d if layer is not None))

    def features(self, h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The final Linear's inputs: the convolved [h; r] image, flattened (B, in)."""
        s = self.shape
        image = (-1, s["input_channels"], s["image_height"], s["image_width"])
        x = self.hr2d(torch.cat([h.view(image), r.view(image)], dim=-2))
        return x.view(x.shape[0], -1)

    def encode(self, h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The (head, relation) vector that is dotted with the tail: (B, d)."""
        return self.hr1d(self.features(h, r))


class ConvEReplica(nn.Module):
    """PyKEEN 1.11's ConvE: ``score(h, r, t) = <hr1d(hr2d([h; r])), t> + b_t``."""

    def __init__(self, num_entities: int, num_relations: int, shape: dict[str, int], batch_norm: bool):
        super().__init__()
        dim = shape["embedding_dim"]
        self.num_entities, self.num_relations = num_entities, num_relations
        self.interaction = ConvEInteraction(shape, batch_norm)
        self.entity_representations = nn.ModuleList([_Table(num_entities, dim), _Table(num_entities, 1)])
        self.relation_representations = nn.ModuleList([_Table(num_relations, dim)])

    def score_hrt(self, hrt: torch.Tensor, per_pair: bool = False) -> torch.Tensor:
        """``per_pair``: compute the layers up to the final Linear once per distinct (head, relation) pair
        of the batch (they depend on nothing else), the rest per triple (the same scores)."""
        if per_pair:
            linear = self.interaction.hr1d[0]
            features, linear.row_map = self.pair_features(hrt)
            try:
                x = self.interaction.hr1d(features)
            finally:
                linear.row_map = None
        else:
            x = self.interaction.encode(self.entity_representations[0](hrt[:, 0]), self.relation_representations[0](hrt[:, 1]))
        t = self.entity_representations[0](hrt[:, 2])
        bias = self.entity_representations[1](hrt[:, 2]).view(-1)
        return ((x * t).sum(-1) + bias).view(-1, 1)

    def score_t(self, hr: torch.Tensor) -> torch.Tensor:
        x = self.interaction.encode(self.entity_representations[0](hr[:, 0]), self.relation_representations[0](hr[:, 1]))
        return x @ self.entity_representations[0]._embeddings.weight.T + self.entity_representations[1]._embeddings.weight.view(1, -1)

    def pair_features(self, hrt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The final Linear's inputs once per distinct (head, relation) pair of ``hrt`` (m, in), sorted as the
        pairs, and the pair of each row (n,): what ``score_hrt`` feeds that layer ``per_pair``."""
        # one key per pair (sorted as the pairs themselves): torch.unique(dim=0) is ~50x slower
        keys, row_map = torch.unique(hrt[:, 0] * self.num_relations + hrt[:, 1], return_inverse=True)
        features = self.interaction.features(self.entity_representations[0](keys // self.num_relations),
                                             self.relation_representations[0](keys % self.num_relations))  # fmt: skip
        return features, row_map

    def bce_gradients(self, hrt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r"""Per-example gradients of the ``bce`` loss :math:`\mathrm{softplus}(-s)` with respect to the final
        Linear and the batch norm after it, in closed form (eval mode: running statistics, no dropout),
        computed once per (head, relation) pair up to the Linear's product:

        with :math:`y = W a + b`, :math:`\hat y = (y - \mu) / \sqrt{\sigma^2 + \epsilon}`, :math:`z = \gamma \hat y + \beta`,
        :math:`s = \langle \mathrm{relu}(z), e_t\rangle + b_t`: :math:`g = \partial L / \partial z = -\sigma(-s)\, e_t\, [z > 0]`,
        the batch norm's gradients :math:`(g \hat y, g)`, the Linear's output gradient
        :math:`\delta = g \gamma / \sqrt{\sigma^2 + \epsilon}`, its weight's :math:`\delta a^\top`.

        What autograd gives through the module hooks (:mod:`tracin_index.gradients.computer`), without the hooks and
        the backward pass (a query computes a few gradients at a time: those fixed costs were half of it).
        Returns the Linear's inputs with a column of ones (B, in + 1), its output gradients (B, out) and
        the batch norm's weight and bias gradients side by side (B, 2 out)."""
        linear, norm = self.interaction.hr1d[0], self.interaction.hr1d[2]
        x, row_map = self.pair_features(hrt)
        y = nn.functional.linear(x, linear.weight, linear.bias).index_select(0, row_map)
        inv_std = torch.rsqrt(norm.running_var + norm.eps)
        y_hat = (y - norm.running_mean) * inv_std
        z = y_hat * norm.weight + norm.bias
        tails = self.entity_representations[0](hrt[:, 2])
        score = (torch.relu(z) * tails).sum(-1) + self.entity_representations[1](hrt[:, 2]).view(-1)
        g = (-torch.sigmoid(-score))[:, None] * tails * (z > 0)
        a = x.new_empty(len(hrt), x.shape[1] + 1)
        a[:, :-1] = x.index_select(0, row_map)
        a[:, -1] = 1
        return a, g * (inv_std * norm.weight), torch.cat([g * y_hat, g], 1)


class DistMultInteraction(nn.Module):
    """PyKEEN's DistMult interaction (parameter-free)."""

    tail_indices = range(0, 1)


class DistMultReplica(nn.Module):
    """PyKEEN 1.11's DistMult: ``score(h, r, t) = sum(h * r * t)``."""

    def __init__(self, num_entities: int, num_relations: int, dim: int):
        super().__init__()
        self.num_entities, self.num_relations = num_entities, num_relations
        self.interaction = DistMultInteraction()
        self.entity_representations = nn.ModuleList([_Table(num_entities, dim)])
        self.relation_representations = nn.ModuleList([_Table(num_relations, dim, regularized=True)])

    def score_hrt(self, hrt: torch.Tensor) -> torch.Tensor:
        e, r = self.entity_representations[0], self.relation_representations[0]
        return (e(hrt[:, 0]) * r(hrt[:, 1]) * e(hrt[:, 2])).sum(-1).view(-1, 1)

    def score_t(self, hr: torch.Tensor) -> torch.Tensor:
        e, r = self.entity_representations[0], self.relation_representations[0]
        return (e(hr[:, 0]) * r(hr[:, 1])) @ e._embeddings.weight.T


def replica_spec(model: nn.Module) -> dict[str, Any] | None:
    """What it takes to rebuild ``model`` (a PyKEEN model) as a replica, or None if there is no replica of it."""
    name = type(model).__name__
    state = model.state_dict()
    expected_keys = None
    if name == "ConvE":
        info = model.interaction.shape_info
        shape = {k: int(getattr(info, k)) for k in ("embedding_dim", "input_channels", "image_height", "image_width",
                                                     "output_channels", "kernel_height", "kernel_width")}  # fmt: skip
        batch_norm = any(isinstance(m, nn.BatchNorm1d) for m in model.interaction.hr1d)
        spec = {"model": name, "num_entities": model.num_entities, "num_relations": model.num_relations,
                "shape": shape, "batch_norm": batch_norm}  # fmt: skip
    elif name == "DistMult":
        spec = {"model": name, "num_entities": model.num_entities, "num_relations": model.num_relations,
                "dim": int(state["entity_representations.0._embeddings.weight"].shape[1])}  # fmt: skip
    else:
        return None
    # relations in the model's ids: with inverse triples, 2r forward and 2r + 1 inverse (num_relations counts both)
    spec["inverse_triples"] = bool(getattr(model, "use_inverse_triples", False))
    expected_keys = set(build_replica(spec).state_dict())
    return spec if expected_keys == set(state) else None


def build_replica(spec: dict[str, Any]) -> nn.Module:
    """An untrained replica of the recorded shape (load a state dict into it), in eval mode."""
    if spec["model"] == "ConvE":
        model = ConvEReplica(spec["num_entities"], spec["num_relations"], spec["shape"], spec["batch_norm"])
    elif spec["model"] == "DistMult":
        model = DistMultReplica(spec["num_entities"], spec["num_relations"], spec["dim"])
    else:
        raise ValueError(f"no replica of {spec['model']}")
    model.use_inverse_triples = bool(spec.get("inverse_triples", False))
    return model.eval()


@dataclass(frozen=True)
class Shortcuts:
    """What a model twin computes faster than module hooks and autograd, for one parameter selection and
    loss; :func:`shortcuts_for` is the one place that knows which twin offers what.

    ``per_pair``: the layers before ConvE's final Linear run once per distinct (head, relation) pair of a
    batch (every selected module comes at or after that Linear, so no gradient is needed per pair).
    ``closed_form``: the ``bce`` gradients of the default selection (the final Linear and the batch norm
    after it) in closed form (:meth:`ConvEReplica.bce_gradients`).
    """

    model: ConvEReplica
    per_pair: bool
    closed_form: bool

    def score_hrt(self, hrt: torch.Tensor) -> torch.Tensor:
        return self.model.score_hrt(hrt, per_pair=self.per_pair)

    def bce_gradients(self, hrt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.bce_gradients(hrt)

    def linear_inputs(self, modules: dict[str, nn.Module], hrt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The final Linear's inputs once per pair and each row's pair (:meth:`ConvEReplica.pair_features`)
        where ``modules`` is that Linear alone and the twin computes per pair; None otherwise."""
        if not self.per_pair or list(modules.values()) != [self.model.interaction.hr1d[0]]:
            return None
        return self.model.pair_features(hrt)


def shortcuts_for(model: nn.Module, selected: Sequence[tuple[str, Sequence[str]]], loss: str, *,
                  per_pair: bool = True) -> Shortcuts | None:  # fmt: skip
    """The shortcuts ``model`` offers for the selected modules ((name, parameter names) in execution order)
    and ``loss``, or None (a PyKEEN model, or a twin with nothing faster to offer). ``per_pair``: whether
    the caller wants the per-pair forward pass where it applies."""
    if not isinstance(model, ConvEReplica):
        return None
    pair = per_pair and all(name.startswith("interaction.hr1d.") for name, _ in selected)
    closed = loss == "bce" and _closed_form_fits(model, selected)
    return Shortcuts(model, pair, closed) if pair or closed else None


def _closed_form_fits(model: ConvEReplica, selected: Sequence[tuple[str, Sequence[str]]]) -> bool:
    """A ConvE twin with its batch norm, the default selection of its last two layers (the final Linear's
    and the batch norm's weights and biases)."""
    layers = list(model.interaction.hr1d)
    if [type(m) for m in layers] != [PairLinear, nn.Dropout, nn.BatchNorm1d, nn.ReLU]:
        return False
    if not layers[2].affine or layers[2].running_var is None:  # the closed form needs gamma, beta and running statistics
        return False
    wanted = [("interaction.hr1d.0", ("weight", "bias")), ("interaction.hr1d.2", ("weight", "bias"))]
    return [(name, tuple(parameters)) for name, parameters in selected] == wanted


def replica_agrees(replica: nn.Module, model: nn.Module, hrt: torch.Tensor, gradients_of) -> bool:
    """The replica (with ``model``'s weights) gives ``model``'s scores and per-example gradients on ``hrt``.

    ``gradients_of(m)``: the per-example gradients of the selected parameters of model ``m`` on ``hrt``.
    """
    replica.load_state_dict(model.state_dict())
    with torch.no_grad():
        ours, theirs = replica.score_hrt(hrt).view(-1), model.score_hrt(hrt).view(-1)
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=TOLERANCE, atol=TOLERANCE * float(theirs.abs().max())):
        return False
    g_ours, g_theirs = gradients_of(replica), gradients_of(model)
    gram_ours, gram_theirs = g_ours.dot(g_ours), g_theirs.dot(g_theirs)
    scale = float(gram_theirs.abs().max())
    return bool(torch.allclose(gram_ours, gram_theirs, rtol=TOLERANCE, atol=TOLERANCE * scale)) and bool(
        torch.allclose(g_ours.dot(g_theirs), gram_theirs, rtol=TOLERANCE, atol=TOLERANCE * scale)
    )
