"""A Linear layer's inputs for given triples, from a forward pass that stops before the layer's product.

Refining a candidate's bounds (:mod:`tracin_index.search.refine`) and fitting a sketch's principal
directions (:mod:`tracin_index.build.bases`) need only these inputs, not whole gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..kg.replicas import Shortcuts
from .selection import evaluating


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


def linear_inputs(model: nn.Module, modules: dict[str, tuple[nn.Linear, bool]], hrt: torch.Tensor,
                  shortcuts: Shortcuts | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """The inputs (with bias column where asked) of the named Linear layers for the triples ``hrt``, by a
    forward pass that stops before the first of them runs its product: no gradients, no later layers.

    ``modules``: name -> (module, with bias column). ``shortcuts``: the model twin's, where it has some
    (:func:`~tracin_index.kg.replicas.shortcuts_for`).
    """
    found = linear_input_values(model, {name: module for name, (module, _) in modules.items()}, hrt, shortcuts=shortcuts)
    return {name: with_bias_column(found[name].values, bias, found[name].rows) for name, (_, bias) in modules.items()}


def linear_input_values(model: nn.Module, modules: dict[str, nn.Linear], hrt: torch.Tensor,
                        walked: list[nn.Module] | None = None, shortcuts: Shortcuts | None = None) -> dict[str, LinearInputs]:  # fmt: skip
    """:func:`linear_inputs` as the layers saw them (:class:`LinearInputs`: no bias column, no copy per
    example). ``walked``: the model's modules, where the caller holds them
    (:class:`~tracin_index.gradients.computer.ModelParts`)."""
    found: dict[str, LinearInputs] = {}
    if shortcuts is not None:
        with evaluating(model, walked), torch.no_grad():
            direct = shortcuts.linear_inputs(modules, hrt)  # a twin's inputs, without hooks or the rest of the pass
        if direct is not None:
            return {name: LinearInputs(*direct) for name in modules}

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
            (model.score_hrt if shortcuts is None else shortcuts.score_hrt)(hrt)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return found
