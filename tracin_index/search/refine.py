r"""Refining: tighter bounds for some rows, from their Linear input sides recomputed exactly.

A candidate's sketched input side is the loose part of its bound. Recomputing it (a forward pass that
stops at the Linear, a fraction of a gradient's cost) leaves only the output side's float16 rounding,
so most candidates drop out before any exact rescoring (:mod:`tracin_index.search.settle`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..gradients.blocks import PerExampleGradients
from ..gradients.inputs import LinearInputs
from ..storage.arrays import FactorArrays
from ..storage.plans import BlockPlan, is_input_side
from .scan import Estimate, combine, out_side, side_estimate

#: Relative error allowed for an inner product of two float32 vectors recomputed at query time (a
#: refined row's input side): far above float32's accumulated rounding over 10^4 terms, far below EPS.
EPS_RECOMPUTED = 2.0**-16


def refinable(plans: list[BlockPlan]) -> bool:
    """Whether :func:`refined_estimate` applies: a Linear's input side is sketched (recomputing it, a
    forward pass that stops at the Linear, is then much cheaper than the whole gradient and leaves only
    float16 rounding in the bound), and every other stored side is whole (dense or factored)."""
    sketched = False
    for plan in plans:
        if plan.kind == "factored" and plan.sketch[0] == 0:
            sketched = sketched or plan.sketch[1] > 0
        elif not (plan.kind == "dense" and plan.sketch[0] == 0):
            return False
    return sketched


def refined_estimate(plans: list[BlockPlan], stored: FactorArrays, query: PerExampleGradients, modules: dict[str, nn.Module],
                     rows: torch.Tensor, inputs: dict[str, LinearInputs]) -> Estimate:  # fmt: skip
    r"""Like :func:`checkpoint_estimate` for the stored ``rows`` only, with the Linear layers' input sides
    given exactly (``inputs``: block name -> the inputs of the rows' examples, float32, without the bias
    column, which a block's plan adds where its size says so): their products then carry only the output
    side's float16 error, :math:`|X_2|\,e_1`, instead of the sketch's residual bound. Needs
    :func:`refinable` plans."""
    rows = rows.to(stored.device)
    sub = FactorArrays({k: v.index_select(0, rows) for k, v in stored.arrays.items() if not is_input_side(k, plans)},
                 {}, {}, len(rows))  # fmt: skip
    by_name = {p.name: p for p in plans}
    total = torch.zeros(len(rows), dtype=torch.float64, device=stored.device)
    error = torch.zeros(len(rows), dtype=torch.float64, device=stored.device)
    for plan in plans:
        block = query.blocks[plan.name]
        if plan.kind == "dense":
            part = side_estimate(sub, f"{plan.name}/values", block.values[0], None)
        else:
            # in float32, as the exact rescoring computes it (its rounding is within EPS_RECOMPUTED); per
            # row of the inputs as computed (once per (head, relation) pair), then for each example
            given = inputs[plan.name]
            a = given.values.to(stored.device)
            bias = plan.sizes[1] == a.shape[1] + 1  # a bias column of ones: +1 to each norm^2, +a_q[-1] to each product
            a_norm = given.rowwise(torch.linalg.vector_norm(a, dim=-1).double().pow(2).add_(float(bias)).sqrt_())
            part = Estimate(torch.zeros_like(total), torch.zeros_like(total))
            for j in range(block.a.shape[1]):  # the query's examples (positions)
                out = out_side(plan, by_name, sub, block.delta[0, j], modules)
                a_q = block.a[0, j].to(a)
                product = (a @ a_q[: a.shape[1]]).double()
                if bias:
                    product += float(a_q[-1])
                inp = Estimate(given.rowwise(product), a_norm * (EPS_RECOMPUTED * float(a_q.double().norm())))
                both = combine(out, inp)
                part.value.add_(both.value)
                part.error.add_(both.error)
        total += part.value
        error += part.error
    return Estimate(total, error)
