r"""Per-example loss gradients for a whole batch in one forward and one backward pass.

The model is in eval mode, so examples do not interact (dropout off, batch norm on running
statistics) and the gradient of the summed loss with respect to a layer's output, row by row, is
each example's own output gradient. From (layer input, output gradient) per example:

- ``nn.Linear`` :math:`y = W a + b`: :math:`\nabla_W = \delta a^\top`, :math:`\nabla_b = \delta`. Kept as
  factors ``a`` (with a 1 appended for the bias) and ``delta``; then
  :math:`\langle g_1, g_2\rangle = \langle a_1, a_2\rangle \langle \delta_1, \delta_2\rangle`.
- other small modules (batch norm affine parameters, convolutions): dense per-example gradients by
  ``torch.func`` (vmap of a vjp through that module alone).
- embedding tables: the rows an example looked up and their gradients; under the 1-N ``ce`` loss
  the tail table also gets the rank-one term :math:`(p - y)\, q^\top` where
  :math:`q = \partial s / \partial e_t` (scores linear in the tail embedding only).

Only the selected parameters require grad, and the backward pass asks for gradients with respect
to the selected modules' outputs, so it never enters the layers below them.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Literal, Union

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from .directions import TRAIN, example_batches, uses_inverse_triples
from .errors import LossError, TracInWarning, VanishingGradientError
from .layers import ParameterSelection, SelectedModule, evaluating
from .replicas import closed_form_applies

LossName = Literal["bce", "ce"]
LOSSES = ("bce", "ce")

#: Interactions whose score is linear in the tail representation(s): s(h, r, t) = <q(h, r), t> (+ tail bias).
_TAIL_LINEAR_INTERACTIONS = (
    "ConvEInteraction",
    "DistMultInteraction",
    "ComplExInteraction",
    "RESCALInteraction",
    "TuckERInteraction",
)


# ---------------------------------------------------------------------------------------------
# Gradient blocks: one per selected module, each with its own exact inner product.
# ---------------------------------------------------------------------------------------------


@dataclass
class FactoredBlock:
    """Per-example gradient of a Linear layer as factors: sum over l of outer(delta[b, l], a[b, l]).

    ``a``: (B, L, in [+1]); ``delta``: (B, L, out). L > 1 when the layer is applied to several
    positions of one example (or called several times); L = 1 for ConvE.
    """

    a: torch.Tensor
    delta: torch.Tensor
    has_weight: bool
    has_bias: bool

    def dot(self, other: "FactoredBlock") -> torch.Tensor:
        if self.a.shape[1] == 1 and other.a.shape[1] == 1:
            return (self.a[:, 0] @ other.a[:, 0].T) * (self.delta[:, 0] @ other.delta[:, 0].T)
        aa = torch.einsum("blm,cqm->bclq", self.a, other.a)
        dd = torch.einsum("bln,cqn->bclq", self.delta, other.delta)
        return (aa * dd).sum(dim=(2, 3))

    def squared_norms(self) -> torch.Tensor:
        if self.a.shape[1] == 1:  # vector_norm: one pass, no temporary (3x faster than pow().sum() on 10,369 columns)
            return torch.linalg.vector_norm(self.a[:, 0], dim=-1).pow(2) * torch.linalg.vector_norm(self.delta[:, 0], dim=-1).pow(2)
        aa = torch.einsum("blm,bqm->blq", self.a, self.a)
        dd = torch.einsum("bln,bqn->blq", self.delta, self.delta)
        return (aa * dd).sum(dim=(1, 2))

    def to_dense(self) -> list[torch.Tensor]:
        """Per-example [weight, bias] gradients (those selected), shapes (B, out, in) and (B, out)."""
        out = []
        a = self.a[..., :-1] if self.has_bias else self.a
        if self.has_weight:
            out.append(torch.einsum("bln,blm->bnm", self.delta, a))
        if self.has_bias:
            out.append(self.delta.sum(1))
        return out

    def index(self, rows: torch.Tensor | slice) -> "FactoredBlock":
        return FactoredBlock(self.a[rows], self.delta[rows], self.has_weight, self.has_bias)

    def summed(self) -> list[torch.Tensor]:
        """[weight, bias] gradients (those selected) summed over the examples."""
        out = []
        if self.has_weight:
            a = self.a[..., :-1] if self.has_bias else self.a
            out.append(torch.einsum("bln,blm->nm", self.delta, a))
        if self.has_bias:
            out.append(self.delta.sum((0, 1)))
        return out


@dataclass
class DenseBlock:
    """Per-example gradients flattened to (B, P), parameters concatenated in ``shapes`` order."""

    values: torch.Tensor
    shapes: tuple[torch.Size, ...]

    def dot(self, other: "DenseBlock") -> torch.Tensor:
        return self.values @ other.values.T

    def squared_norms(self) -> torch.Tensor:
        return self.values.pow(2).sum(-1)

    def to_dense(self) -> list[torch.Tensor]:
        out, start = [], 0
        for shape in self.shapes:
            n = shape.numel()
            out.append(self.values[:, start : start + n].reshape(-1, *shape))
            start += n
        return out

    def index(self, rows: torch.Tensor | slice) -> "DenseBlock":
        return DenseBlock(self.values[rows], self.shapes)

    def summed(self) -> list[torch.Tensor]:
        total, out, start = self.values.sum(0), [], 0
        for shape in self.shapes:
            out.append(total[start : start + shape.numel()].reshape(shape))
            start += shape.numel()
        return out


@dataclass
class RowsBlock:
    r"""Per-example gradient of an embedding table (num_rows x dim) without materialising the table.

    Gradient of example b = sum_k onehot(ids[b, k]) rows[b, k]^T  (+ coef[b] vec[b]^T when rank-one).
    Ids may repeat (head == tail); the sum handles that.
    """

    num_rows: int
    ids: torch.Tensor  # (B, K) long
    rows: torch.Tensor  # (B, K, D)
    coef: torch.Tensor | None = None  # (B, num_rows)
    vec: torch.Tensor | None = None  # (B, D)

    def dot(self, other: "RowsBlock") -> torch.Tensor:
        total = self._rows_dot(self.ids, self.rows, other.ids, other.rows)
        if other.coef is not None:
            total = total + self._rows_low_rank(self.ids, self.rows, other.coef, other.vec)
        if self.coef is not None:
            total = total + self._rows_low_rank(other.ids, other.rows, self.coef, self.vec).T
            if other.coef is not None:
                total = total + (self.coef @ other.coef.T) * (self.vec @ other.vec.T)
        return total

    @staticmethod
    def _rows_dot(ids1, rows1, ids2, rows2) -> torch.Tensor:
        if ids1.shape[1] == 0 or ids2.shape[1] == 0:
            return rows1.new_zeros(ids1.shape[0], ids2.shape[0])
        dots = torch.einsum("bkd,cqd->bckq", rows1, rows2)
        same = ids1[:, None, :, None] == ids2[None, :, None, :]
        return (dots * same).sum(dim=(2, 3))

    @staticmethod
    def _rows_low_rank(ids1, rows1, coef2, vec2) -> torch.Tensor:
        """<sum_k onehot(ids1[b,k]) rows1[b,k]^T, coef2[c] vec2[c]^T> for all b, c."""
        if ids1.shape[1] == 0:
            return rows1.new_zeros(ids1.shape[0], coef2.shape[0])
        row_vec = torch.einsum("bkd,cd->bck", rows1, vec2)
        coef_at_rows = coef2[:, ids1].permute(1, 0, 2)  # (B1, B2, K)
        return (row_vec * coef_at_rows).sum(-1)

    def squared_norms(self) -> torch.Tensor:
        gram = torch.einsum("bkd,bqd->bkq", self.rows, self.rows)
        same = self.ids[:, :, None] == self.ids[:, None, :]
        total = (gram * same).sum(dim=(1, 2))
        if self.coef is not None:
            cross = torch.einsum("bkd,bd->bk", self.rows, self.vec) * torch.gather(self.coef, 1, self.ids)
            total = total + 2 * cross.sum(-1) + self.coef.pow(2).sum(-1) * self.vec.pow(2).sum(-1)
        return total

    def to_dense(self) -> list[torch.Tensor]:
        B, K, D = self.rows.shape
        dense = self.rows.new_zeros(B, self.num_rows, D)
        dense.scatter_add_(1, self.ids[:, :, None].expand(B, K, D), self.rows)
        if self.coef is not None:
            dense = dense + self.coef[:, :, None] * self.vec[:, None, :]
        return [dense]

    def summed(self) -> list[torch.Tensor]:
        D = self.rows.shape[-1]
        table = self.rows.new_zeros(self.num_rows, D).index_add_(0, self.ids.reshape(-1), self.rows.reshape(-1, D))
        if self.coef is not None:
            table = table + self.coef.T @ self.vec
        return [table]

    def index(self, rows: torch.Tensor | slice) -> "RowsBlock":
        return RowsBlock(
            self.num_rows,
            self.ids[rows],
            self.rows[rows],
            None if self.coef is None else self.coef[rows],
            None if self.vec is None else self.vec[rows],
        )


Block = Union[FactoredBlock, DenseBlock, RowsBlock]


@dataclass
class PerExampleGradients:
    """Per-example gradients of a batch, one structured block per selected module."""

    blocks: dict[str, Block]
    parameter_names: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __len__(self) -> int:
        block = next(iter(self.blocks.values()))
        return (block.a if isinstance(block, FactoredBlock) else block.values if isinstance(block, DenseBlock) else block.ids).shape[0]

    def dot(self, other: "PerExampleGradients") -> torch.Tensor:
        """Inner products <g_self[b], g_other[c]> of all pairs, shape (len(self), len(other))."""
        return sum(block.dot(other.blocks[name]) for name, block in self.blocks.items())

    def squared_norms(self) -> torch.Tensor:
        return sum(block.squared_norms() for block in self.blocks.values())

    def to_dense(self) -> dict[str, torch.Tensor]:
        """Full per-example gradients by parameter name, shape (B, *parameter.shape). For small models and tests."""
        return {
            name: tensor
            for module_name, block in self.blocks.items()
            for name, tensor in zip(self.parameter_names[module_name], block.to_dense())
        }

    def index(self, rows: torch.Tensor | slice) -> "PerExampleGradients":
        return PerExampleGradients({n: b.index(rows) for n, b in self.blocks.items()}, self.parameter_names)

    def summed(self) -> dict[str, torch.Tensor]:
        """Gradients summed over the examples, by parameter name (what one backward of the summed loss gives)."""
        return {name: tensor for module_name, block in self.blocks.items()
                for name, tensor in zip(self.parameter_names[module_name], block.summed())}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Computing them.
# ---------------------------------------------------------------------------------------------


def per_example_losses(model: nn.Module, hrt: torch.Tensor, loss: LossName) -> torch.Tensor:
    """Per-triple loss, shape (B,).

    ``bce``: softplus(-s(h, r, t)) = BCE with logits against label 1.
    ``ce``: -log softmax_t'(s(h, r, t'))[t] over all entities t'.
    """
    if loss == "bce":
        return nn.functional.softplus(-model.score_hrt(hrt).view(-1))
    if loss == "ce":
        scores = model.score_t(hrt[:, :2])
        return torch.logsumexp(scores, dim=-1) - scores.gather(1, hrt[:, 2:3]).view(-1)
    raise LossError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")


#: A gradient whose squared norm is below this is taken to have vanished: its entries are zero or so
#: small that their products underflow float32 (an influence computed from it would be 0).
VANISHED_SQUARED_NORM = torch.finfo(torch.float32).tiny


def vanished(squared_norms: torch.Tensor) -> torch.Tensor:
    """Which examples' gradients vanished, from their squared norms summed over checkpoints (unweighted)."""
    return squared_norms.double() < VANISHED_SQUARED_NORM


def vanishing_message(what: str, loss: str) -> str:
    advice = "try --loss ce" if loss == "bce" else "check the model's scores, or select other layers"
    return (f"the loss gradients of {what} vanish (zero or subnormal at every checkpoint): the {loss} loss is "
            f"saturated, so every influence on them is 0; {advice}")  # fmt: skip


def check_gradients(train_squared_norms: torch.Tensor, test_squared_norms: torch.Tensor | None, loss: str,
                    test_names: list[str] | None = None) -> None:  # fmt: skip
    """Refuse (:class:`VanishingGradientError`) when every training or every test gradient vanished; warn
    (:class:`TracInWarning`) when most training gradients, or some test triples', did."""
    train = vanished(train_squared_norms)
    if len(train) and bool(train.all()):
        raise VanishingGradientError(vanishing_message(f"all {len(train):,} training triples", loss))
    if test_squared_norms is not None:
        test = vanished(test_squared_norms)
        if len(test) and bool(test.all()):
            what = "the test triple" if len(test) == 1 else f"all {len(test)} test triples"
            raise VanishingGradientError(vanishing_message(what, loss))
        for i in torch.nonzero(test).view(-1).tolist():
            name = test_names[i] if test_names else f"test triple {i}"
            warnings.warn(vanishing_message(name, loss) + "; it has no proponents or opponents", TracInWarning, stacklevel=3)
    if len(train) and float(train.double().mean()) > 0.5:
        warnings.warn(vanishing_message(f"{int(train.sum()):,} of {len(train):,} training triples", loss),
                      TracInWarning, stacklevel=3)  # fmt: skip


@contextlib.contextmanager
def only_selected_require_grad(model: nn.Module, selection: ParameterSelection, parts: "ModelParts | None" = None) -> Iterator[None]:
    """Turn requires_grad off everywhere but the selection, so backward stops at the selected layers.
    ``parts``: the model's parameters and representations, where the caller holds them."""
    parts = parts or ModelParts.of(model)
    selected = {id(getattr(m.module, p)) for m in selection.modules for p in m.parameter_names}
    saved = [(p, p.requires_grad) for p in parts.parameters]
    reps = parts.unique_representations
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in selected)
        for rep in reps:
            rep.unique = False  # unique() would share looked-up rows between examples
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        for rep in reps:
            rep.unique = True


@dataclass
class ModelParts:
    """What a forward and backward pass walks the model for, walked once: its modules, its parameters and
    the representations that would share looked-up rows (``unique``). A query makes many small passes."""

    modules: list[nn.Module]
    parameters: list[nn.Parameter]
    unique_representations: list[nn.Module]

    @classmethod
    def of(cls, model: nn.Module) -> "ModelParts":
        modules = list(model.modules())
        reps = [m for m in modules if getattr(m, "unique", False) is True and hasattr(m, "max_id")]
        return cls(modules, list(model.parameters()), reps)


@dataclass
class _Call:
    inputs: tuple
    output: torch.Tensor
    row_map: torch.Tensor | None = None  # the input holds one row per group: input row of output row i


class GradientComputer:
    """Computes :class:`PerExampleGradients` of batches of (head, relation, tail) id triples."""

    def __init__(self, model: nn.Module, selection: ParameterSelection, loss: LossName = "bce"):
        if loss not in LOSSES:
            raise LossError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
        self.model = model
        self.selection = selection
        self.loss = loss
        self.inverse = uses_inverse_triples(model)
        self._model_parts: tuple[nn.Module, ModelParts] | None = None  # (the model walked, its parts)
        self._closed_form = closed_form_applies(model, selection, loss)
        self._tail_tables = self._tail_tables_for_ce() if loss == "ce" else {}
        if self._tail_tables and self.inverse:
            raise LossError(
                "--loss ce with entity embeddings selected is not supported for a model trained with inverse "
                "triples (a fact's two 1-N terms would make its gradient rank two); use --loss bce, or select "
                "layers without the entity embeddings"
            )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def model_parts(self) -> "ModelParts":
        """The model's modules and parameters, walked once (the model's structure does not change)."""
        if self._model_parts is None or self._model_parts[0] is not self.model:
            self._model_parts = (self.model, ModelParts.of(self.model))
        return self._model_parts[1]

    def _tail_tables_for_ce(self) -> dict[str, int]:
        """Selected embedding tables that 1-N scoring reads whole (tails): module name -> num rows."""
        embedded = [m for m in self.selection.modules if m.kind == "embedding"]
        if not embedded:
            return {}
        model = self.model
        interaction = getattr(model, "interaction", None)
        tail_indices = getattr(interaction, "tail_indices", None)
        if interaction is None or tail_indices is None:
            raise LossError(
                f"--loss ce with embedding parameters needs a PyKEEN ERModel; {type(model).__name__} is not one: "
                "use --loss bce"
            )
        tail_modules = {
            id(sub) for i in tail_indices for sub in model.entity_representations[i].modules()
        }
        tables = {m.name: m.module.num_embeddings for m in embedded if id(m.module) in tail_modules}
        if tables and type(interaction).__name__ not in _TAIL_LINEAR_INTERACTIONS:
            raise LossError(
                f"--loss ce with entity embeddings needs a score linear in the tail embedding "
                f"({', '.join(n.removesuffix('Interaction') for n in _TAIL_LINEAR_INTERACTIONS)}); "
                f"{type(model).__name__} is not: use --loss bce"
            )
        return tables

    @contextlib.contextmanager
    def _recording(self) -> Iterator[dict[str, list[_Call]]]:
        calls: dict[str, list[_Call]] = {m.name: [] for m in self.selection.modules}

        def hook(name):
            def record(module, args, output):
                inputs = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
                calls[name].append(_Call(inputs, output, getattr(module, "row_map", None)))

            return record

        handles = [m.module.register_forward_hook(hook(m.name)) for m in self.selection.modules]
        try:
            yield calls
        finally:
            for h in handles:
                h.remove()

    def compute(self, hrt: torch.Tensor, direction: str = TRAIN) -> PerExampleGradients:
        """Per-fact gradients of the facts ``hrt`` ((B, 3), the label maps' ids), as trained (``direction``
        "train": the sum over the fact's training examples) or one test direction ("tail", "head",
        "both"); see :mod:`tracin_index.directions`."""
        parts = example_batches(hrt, self.inverse, direction)
        if len(parts) == 1:
            return self.compute_examples(parts[0])
        return merge_examples(self.compute_examples(torch.cat(parts)), len(parts))

    def compute_examples(self, hrt: torch.Tensor) -> PerExampleGradients:
        """Per-example gradients of the loss of each example in ``hrt`` (shape (B, 3), the model's ids)."""
        model = self.model
        hrt = hrt.to(self.device)
        batch_size = hrt.shape[0]
        parts = self.model_parts()
        names = {m.name: m.full_parameter_names for m in self.selection.modules}
        if self._closed_form:  # the same gradients without hooks or a backward pass (replicas.closed_form_applies)
            with evaluating(model, parts.modules), torch.no_grad():
                a, delta, values = model.bce_gradients(hrt)
            linear, norm = self.selection.modules
            shapes = tuple(getattr(norm.module, p).shape for p in norm.parameter_names)
            blocks = {linear.name: FactoredBlock(a[:, None], delta[:, None], True, True),
                      norm.name: DenseBlock(values, shapes)}  # fmt: skip
            return PerExampleGradients(blocks, names)
        with evaluating(model, parts.modules), only_selected_require_grad(model, self.selection, parts), self._recording() as calls:
            losses = per_example_losses(model, hrt, self.loss)
            outputs = [c.output for m in self.selection.modules for c in calls[m.name]]
            grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True) if outputs else ()
            deltas = iter(grads)
            blocks = {}
            for m in self.selection.modules:
                module_calls = [(c, next(deltas)) for c in calls[m.name]]
                blocks[m.name] = self._block(m, module_calls, batch_size)
            if self._tail_tables:
                self._add_tail_rank_one(blocks, hrt)
        return PerExampleGradients(blocks, names)

    def check(self, hrt: torch.Tensor) -> None:
        """Refuse (:class:`LossError`) a model and selection whose per-example gradients, as this class
        takes them from the selected modules' inputs and outputs, do not add up to the gradient of the
        summed loss: a parameter used outside its module's forward (ERMLP's hidden layer under 1-N
        scoring, for one) would otherwise give silently wrong influences."""
        hrt = hrt.to(self.device)
        summed = self.compute_examples(hrt).summed()
        parameters = dict(self.model.named_parameters())
        names = [n for n in summed if n in parameters]
        with evaluating(self.model), only_selected_require_grad(self.model, self.selection):
            total = per_example_losses(self.model, hrt, self.loss).sum()
            reference = torch.autograd.grad(total, [parameters[n] for n in names], allow_unused=True)
        for name, expected in zip(names, reference):
            expected = torch.zeros_like(summed[name]) if expected is None else expected
            scale = float(expected.abs().max())
            if float((summed[name] - expected).abs().max()) > 1e-3 * scale + 1e-30:
                raise LossError(
                    f"parameter {name!r} is used outside its module's forward pass for --loss {self.loss} (its per-example "
                    f"gradients cannot be read off the module's inputs and outputs); "
                    + ("use --loss bce or select other layers" if self.loss == "ce" else "select other layers")
                )

    # -- blocks -------------------------------------------------------------------------------

    def _block(self, selected: SelectedModule, calls: list, batch_size: int) -> Block:
        if selected.kind == "embedding":
            return self._rows_block(selected, calls, batch_size)
        if selected.kind == "linear" and "weight" in selected.parameter_names:
            return self._factored_block(selected, calls, batch_size)
        return self._dense_block(selected, calls, batch_size)

    @staticmethod
    def _per_example(t: torch.Tensor, batch_size: int, name: str) -> torch.Tensor:
        """(B * L, ...) -> (B, L, ...): a layer may see several rows per example, never rows shared by examples."""
        if t.shape[0] % batch_size:
            raise LossError(
                f"layer {name!r} saw {t.shape[0]} rows for a batch of {batch_size}; its activations cannot be "
                "attributed to single examples: choose other layers"
            )
        return t.reshape(batch_size, t.shape[0] // batch_size, *t.shape[1:])

    def _factored_block(self, selected: SelectedModule, calls: list, batch_size: int) -> FactoredBlock:
        module: nn.Linear = selected.module
        has_bias = "bias" in selected.parameter_names
        if not calls:
            dtype = module.weight.dtype
            a = torch.zeros(batch_size, 1, module.in_features + has_bias, dtype=dtype, device=self.device)
            return FactoredBlock(a, a.new_zeros(batch_size, 1, module.out_features), True, has_bias)
        a_parts, d_parts = [], []
        for call, delta in calls:
            d = (torch.zeros_like(call.output) if delta is None else delta).reshape(-1, module.out_features)
            a = with_bias_column(call.inputs[0], has_bias, call.row_map)
            a_parts.append(self._per_example(a, batch_size, selected.name))
            d_parts.append(self._per_example(d, batch_size, selected.name))
        # one call (ConvE): no copy of the (batch x 10,369) inputs beyond the one that appends the bias column
        a = a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts, 1)
        return FactoredBlock(a, d_parts[0] if len(d_parts) == 1 else torch.cat(d_parts, 1), True, has_bias)

    def _dense_block(self, selected: SelectedModule, calls: list, batch_size: int) -> DenseBlock:
        module = selected.module
        params = {p: getattr(module, p).detach() for p in selected.parameter_names}
        shapes = tuple(v.shape for v in params.values())
        total = sum(s.numel() for s in shapes)
        values = torch.zeros(batch_size, total, dtype=next(iter(params.values())).dtype, device=self.device)
        for call, delta in calls:
            if delta is None:
                continue
            (x,) = [a for a in call.inputs if torch.is_tensor(a)][:1] or [None]
            if x is None or len([a for a in call.inputs if torch.is_tensor(a)]) != 1:
                raise LossError(f"layer {selected.name!r} is fed several tensors (e.g. a core tensor applied to head and "
                                "relation): its per-example gradients are not supported; select other layers "
                                "(the default `last` passes over such layers)")
            xs = self._per_example(x, batch_size, selected.name)
            ds = self._per_example(delta, batch_size, selected.name)
            closed = _batch_norm_gradients(module, selected.parameter_names, xs, ds)
            if closed is not None:
                values = values + closed
                continue

            def grad_one(x_i, d_i):
                _, pullback = vjp(lambda p: functional_call(module, p, (x_i,)), params)
                (g,) = pullback(d_i)
                return torch.cat([g[p].reshape(-1) for p in params])

            values = values + vmap(grad_one)(xs, ds)
        return DenseBlock(values, shapes)

    def _rows_block(self, selected: SelectedModule, calls: list, batch_size: int) -> RowsBlock:
        module: nn.Embedding = selected.module
        ids_parts, row_parts = [], []
        for call, delta in calls:
            if delta is None:
                continue
            ids = call.inputs[0].reshape(-1)
            ids_parts.append(self._per_example(ids, batch_size, selected.name))
            row_parts.append(self._per_example(delta.reshape(ids.shape[0], -1), batch_size, selected.name))
        dim = module.embedding_dim
        if not ids_parts:
            ids = torch.zeros(batch_size, 0, dtype=torch.long, device=self.device)
            return RowsBlock(module.num_embeddings, ids, module.weight.new_zeros(batch_size, 0, dim))
        return RowsBlock(module.num_embeddings, torch.cat(ids_parts, 1), torch.cat(row_parts, 1))

    def _add_tail_rank_one(self, blocks: dict[str, Block], hrt: torch.Tensor) -> None:
        r"""Add the 1-N tail term (p - y) q^T to the tail tables' blocks.

        1-N scoring reads the tail table whole, so hooks cannot split its gradient by example. For a
        score linear in the tail, ds(h, r, e_j)/de_j = q(h, r) for every j, so the gradient is
        rank one; q is read off a second, per-triple pass as the gradient at the tail's own row
        (PyKEEN looks tails up last, so a table's last call in that pass is the tail lookup).
        """
        model = self.model
        with torch.no_grad():
            p = torch.softmax(model.score_t(hrt[:, :2]), dim=-1)
        coef = p - nn.functional.one_hot(hrt[:, 2], num_classes=p.shape[1]).to(p.dtype)
        with self._recording() as calls:
            scores = model.score_hrt(hrt).view(-1)
            tail_calls = [calls[name][-1] for name in self._tail_tables]
            q_rows = torch.autograd.grad(scores.sum(), [c.output for c in tail_calls])
        for name, q in zip(self._tail_tables, q_rows):
            block = blocks[name]
            q = q.reshape(hrt.shape[0], -1)
            assert isinstance(block, RowsBlock)
            blocks[name] = RowsBlock(block.num_rows, block.ids, block.rows, coef, q)


def inverse_norms(squared_norms: torch.Tensor) -> torch.Tensor:
    """1 / ||g|| from squared norms, float64; 0 where the gradient is 0 (it then contributes nothing)."""
    norms = squared_norms.double().clamp_min(0).sqrt()
    return torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(norms))


def cosine(dots: torch.Tensor, test_squared: torch.Tensor, train_squared: torch.Tensor) -> torch.Tensor:
    """Inner products (T, N) divided by the norms of both sides (``--normalize``); 0 where either norm is 0."""
    return dots * inverse_norms(test_squared)[:, None] * inverse_norms(train_squared)[None, :]


def merge_examples(grads: PerExampleGradients, parts: int) -> PerExampleGradients:
    """Gradients of B facts from those of their examples, computed as ``parts`` consecutive batches of
    B (example j of fact i at row j * B + i): summed, kept factored (a Linear's factors side by side)."""
    size = len(grads) // parts
    pieces = [slice(j * size, (j + 1) * size) for j in range(parts)]
    blocks: dict[str, Block] = {}
    for name, block in grads.blocks.items():
        if isinstance(block, FactoredBlock):
            blocks[name] = FactoredBlock(torch.cat([block.a[p] for p in pieces], 1),
                                         torch.cat([block.delta[p] for p in pieces], 1), block.has_weight, block.has_bias)  # fmt: skip
        elif isinstance(block, DenseBlock):
            blocks[name] = DenseBlock(sum(block.values[p] for p in pieces), block.shapes)
        else:
            if block.coef is not None:  # refused by GradientComputer
                raise LossError("the 1-N tail term of several examples cannot be merged")
            blocks[name] = RowsBlock(block.num_rows, torch.cat([block.ids[p] for p in pieces], 1),
                                     torch.cat([block.rows[p] for p in pieces], 1))  # fmt: skip
    return PerExampleGradients(blocks, grads.parameter_names)


def with_bias_column(x: torch.Tensor, bias: bool, rows: torch.Tensor | None = None) -> torch.Tensor:
    """A Linear layer's inputs as rows (n, in), with a column of ones appended when its bias is selected;
    ``rows``: the input held one row per group, ``rows[i]`` being the group of row i."""
    x = x.reshape(-1, x.shape[-1])
    if rows is not None:
        x = x.index_select(0, rows)
    if not bias:
        return x
    out = x.new_empty(x.shape[0], x.shape[1] + 1)
    out[:, :-1] = x
    out[:, -1] = 1
    return out


class _StopForward(Exception):
    """Raised by a hook once the inputs it waits for are recorded: the rest of the forward pass is not needed."""


@dataclass
class LinearInputs:
    """A Linear layer's inputs for n examples as computed: ``values`` (m, in) float32 without a bias
    column, and ``rows`` (n,), the row of ``values`` of each example (None: one row each, m = n). A
    layer computed once per (head, relation) pair holds one row per pair: nothing is expanded."""

    values: torch.Tensor
    rows: torch.Tensor | None

    def rowwise(self, per_value: torch.Tensor) -> torch.Tensor:
        """A per-row quantity of ``values`` for each example."""
        return per_value if self.rows is None else per_value.index_select(0, self.rows)


def linear_inputs(model: nn.Module, modules: dict[str, tuple[nn.Linear, bool]], hrt: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inputs (with bias column where asked) of the named Linear layers for the triples ``hrt``, by a
    forward pass that stops before the first of them runs its product: no gradients, no later layers.

    ``modules``: name -> (module, with bias column).
    """
    found = linear_input_values(model, {name: module for name, (module, _) in modules.items()}, hrt)
    return {name: with_bias_column(found[name].values, bias, found[name].rows) for name, (_, bias) in modules.items()}


def linear_input_values(model: nn.Module, modules: dict[str, nn.Linear], hrt: torch.Tensor,
                        walked: list[nn.Module] | None = None) -> dict[str, LinearInputs]:  # fmt: skip
    """:func:`linear_inputs` as the layers saw them (:class:`LinearInputs`: no bias column, no copy per
    example). ``walked``: the model's modules, where the caller holds them (:class:`ModelParts`)."""
    found: dict[str, LinearInputs] = {}
    if getattr(model, "pair_forward", False) and list(modules.values()) == [model.interaction.hr1d[0]]:
        # a ConvE replica computing per pair: its inputs directly, without hooks or the rest of the forward pass
        with evaluating(model, walked), torch.no_grad():
            features, rows = model.pair_features(hrt)
        return {name: LinearInputs(features, rows) for name in modules}

    def hook(name: str):
        def record(module, args):
            # a layer computed once per group (a replica's PairLinear) holds its rows in the group order
            x = args[0].detach()
            found[name] = LinearInputs(x.reshape(-1, x.shape[-1]), getattr(module, "row_map", None))
            if len(found) == len(modules):
                raise _StopForward

        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    try:
        with evaluating(model, walked), torch.no_grad():
            model.score_hrt(hrt)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return found


def _batch_norm_gradients(module: nn.Module, names: tuple[str, ...], xs: torch.Tensor, ds: torch.Tensor) -> torch.Tensor | None:
    r"""Per-example gradients of an eval-mode batch norm's affine parameters in closed form, or None for
    other modules. With :math:`\hat x = (x - \mu) / \sqrt{\sigma^2 + \epsilon}` (running statistics):
    :math:`\partial L / \partial\gamma_c = \sum \delta_c \hat x_c`, :math:`\partial L / \partial\beta_c = \sum \delta_c`,
    summed over the positions of one example. ``xs``, ``ds``: (B, L, C, ...)."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm) or module.training or module.running_var is None:
        return None
    shape = (1, 1, -1) + (1,) * (xs.dim() - 3)
    dims = [1] + list(range(3, xs.dim()))
    parts = []
    for name in names:
        if name == "weight":
            x_hat = (xs - module.running_mean.view(shape)) / torch.sqrt(module.running_var.view(shape) + module.eps)
            parts.append((ds * x_hat).sum(dim=dims))
        elif name == "bias":
            parts.append(ds.sum(dim=dims))
        else:
            return None
    return torch.cat(parts, dim=1)
