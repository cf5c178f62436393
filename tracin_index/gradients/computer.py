r"""Per-example loss gradients for a whole batch in one forward and one backward pass.

The model is in eval mode, so examples do not interact (dropout off, batch norm on running
statistics) and the gradient of the summed loss with respect to a layer's output, row by row, is
each example's own output gradient. From (layer input, output gradient) per example:

- ``nn.Linear`` :math:`y = W a + b`: the factors ``a`` (with a 1 appended for the bias) and ``delta``
  (:class:`~tracin_index.gradients.blocks.FactoredBlock`).
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
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Sequence

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from ..errors import LossError, TracInWarning, VanishingGradientError
from ..kg.checkpoints import Checkpoint, CheckpointModels
from ..kg.directions import TRAIN, example_batches, uses_inverse_triples
from ..kg.replicas import Shortcuts, shortcuts_for
from .blocks import Block, DenseBlock, FactoredBlock, PerExampleGradients, RowsBlock, merge_examples
from .inputs import LinearInputs, linear_input_values, with_bias_column
from .selection import ParameterSelection, SelectedModule, evaluating

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


def per_example_losses(model: nn.Module, hrt: torch.Tensor, loss: LossName,
                       score_hrt: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """Per-triple loss, shape (B,).

    ``bce``: softplus(-s(h, r, t)) = BCE with logits against label 1 (``score_hrt``: how to compute s, where
    not ``model.score_hrt``: a twin's shortcut).
    ``ce``: -log softmax_t'(s(h, r, t'))[t] over all entities t'.
    """
    if loss == "bce":
        return nn.functional.softplus(-(score_hrt or model.score_hrt)(hrt).view(-1))
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


def not_finite_message(c: int, rows: str) -> str:
    """Checkpoint c's gradients of ``rows`` are inf or NaN: what to tell the user."""
    return (f"checkpoint {c + 1}: the gradients of {rows} are not finite (inf or NaN: the model's scores or "
            "weights overflow float32); check that checkpoint, or select other layers")  # fmt: skip


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
    """Computes :class:`PerExampleGradients` of batches of (head, relation, tail) id triples.

    ``per_pair``: let a model twin compute the layers before ConvE's final Linear once per (head,
    relation) pair where that applies (:func:`~tracin_index.kg.replicas.shortcuts_for`): the same
    gradients, fewer products."""

    def __init__(self, model: nn.Module, selection: ParameterSelection, loss: LossName = "bce", *, per_pair: bool = False):
        if loss not in LOSSES:
            raise LossError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
        self.model = model
        self.selection = selection
        self.loss = loss
        self.inverse = uses_inverse_triples(model)
        self._model_parts: tuple[nn.Module, ModelParts] | None = None  # (the model walked, its parts)
        self.shortcuts: Shortcuts | None = shortcuts_for(
            model, [(m.name, m.parameter_names) for m in selection.modules], loss, per_pair=per_pair
        )
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

    @property
    def per_pair(self) -> bool:
        """Whether the layers before the final Linear run once per (head, relation) pair of a batch."""
        return self.shortcuts is not None and self.shortcuts.per_pair

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
        "both"); see :mod:`tracin_index.kg.directions`."""
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
        if self.shortcuts is not None and self.shortcuts.closed_form:  # the same gradients, no hooks or backward pass
            with evaluating(model, parts.modules), torch.no_grad():
                a, delta, values = self.shortcuts.bce_gradients(hrt)
            linear, norm = self.selection.modules
            shapes = tuple(getattr(norm.module, p).shape for p in norm.parameter_names)
            blocks = {linear.name: FactoredBlock(a[:, None], delta[:, None], True, True),
                      norm.name: DenseBlock(values, shapes)}  # fmt: skip
            return PerExampleGradients(blocks, names)
        with evaluating(model, parts.modules), only_selected_require_grad(model, self.selection, parts), self._recording() as calls:
            score = self.shortcuts.score_hrt if self.per_pair else None
            losses = per_example_losses(model, hrt, self.loss, score)
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

    def linear_inputs(self, modules: dict[str, nn.Linear], hrt: torch.Tensor) -> dict[str, LinearInputs]:
        """The named Linear layers' inputs for the examples ``hrt`` (:func:`~tracin_index.gradients.inputs.linear_input_values`),
        per pair where this computer computes per pair."""
        return linear_input_values(self.model, modules, hrt, self.model_parts().modules, self.shortcuts)

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


class CheckpointGradients:
    """The model at every checkpoint, loaded once (:class:`~tracin_index.kg.checkpoints.CheckpointModels`),
    each with its :class:`GradientComputer` and its modules by name: what queries and the build compute
    gradients with. ``select``: the parameter selection of a model (each model copy needs its own: the
    selection holds the modules to hook). ``max_bytes``: the copies kept at once (0: one model, reloaded
    at each checkpoint, as the build goes checkpoint by checkpoint)."""

    def __init__(self, model: nn.Module, checkpoints: Sequence[Checkpoint], select: Callable[[nn.Module], ParameterSelection],
                 loss: LossName, *, per_pair: bool = False, max_bytes: int = 2 * 2**30):  # fmt: skip
        self.models = CheckpointModels(model, checkpoints, max_bytes=max_bytes)
        self.select, self.loss, self.per_pair = select, loss, per_pair
        self._computers: dict[int, GradientComputer] = {}
        self._selections: dict[int, ParameterSelection] = {}  # by id() of the model
        self._modules: dict[int, dict[str, nn.Module]] = {}

    def __len__(self) -> int:
        return len(self.models)

    @property
    def checkpoints(self) -> list[Checkpoint]:
        return self.models.checkpoints

    def learning_rate(self, c: int) -> float:
        return self.models.learning_rate(c)

    def computer(self, c: int) -> GradientComputer:
        """The gradient computer of the model with checkpoint c's weights."""
        model = self.models.model(c)
        if c not in self._computers or self._computers[c].model is not model:
            if id(model) not in self._selections:
                self._selections[id(model)] = self.select(model)
            self._computers[c] = GradientComputer(model, self._selections[id(model)], self.loss, per_pair=self.per_pair)
        return self._computers[c]

    def modules(self, c: int) -> dict[str, nn.Module]:
        """The modules of the model at checkpoint c by name (batch norm scales for derived sides)."""
        model = self.computer(c).model
        if self._modules.get(c, {}).get("") is not model:
            self._modules[c] = dict(model.named_modules())
        return self._modules[c]
