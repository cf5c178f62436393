r"""Encoding a batch of per-example gradients into the arrays a shard file stores.

float16 storage with a per-row scale (the largest magnitude maps to 1, so nothing overflows)
changes an inner product by at most :data:`EPS` :math:`\lVert x\rVert\lVert y\rVert` (2^-11 for the
rounding of x, the same for the float16 result of the product, and subnormals of a row whose
entries span many orders of magnitude), which the scan's bounds include
(:mod:`tracin_index.search.scan`).
"""

from __future__ import annotations

import math

import torch

from ..gradients.blocks import PerExampleGradients
from .plans import BlockPlan
from .sketch import Basis

#: Relative error of an inner product of a float16-stored row (scaled to at most 1) with a query.
EPS = 2.0**-9


def to_half(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 values scaled so that each row's largest magnitude is 1, and the float32 scales."""
    flat = x.reshape(x.shape[0], math.prod(x.shape[1:]))
    if flat.shape[0] == 0:
        return x.half(), torch.zeros(0, dtype=torch.float32, device=x.device)
    scale = flat.abs().amax(1).float().clamp_min(torch.finfo(torch.float32).tiny)
    values = (x / scale.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)).half()
    return values, scale


def _side_arrays(x: torch.Tensor, basis: Basis | None) -> dict[str, torch.Tensor]:
    """Storage of one side, x of shape (rows, [examples,] size): whole, or sketched (coordinates and
    residual norms). ``norm``: of what is stored (the side, or its coordinates), per row [and example]."""
    if basis is not None:
        s, rho = basis.sketch(x.reshape(-1, x.shape[-1]))
        x = s.view(*x.shape[:-1], s.shape[-1])  # (no -1: a batch may hold no new group at all)
    values, scale = to_half(x)
    arrays = {"values": values.cpu(), "scale": scale.cpu(), "norm": x.double().norm(dim=-1).float().cpu()}
    if basis is not None:
        arrays["rho"] = rho.view(x.shape[:-1]).float().cpu()
    return arrays


def encode(plans: list[BlockPlan], grads: PerExampleGradients, bases: dict[tuple[str, str], Basis],
           group_rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Arrays to store for a batch of rows, keyed ``block/side/array``. Grouped input sides are
    encoded only for the batch positions ``group_rows`` (the rows where a group first appears)."""
    out: dict[str, torch.Tensor] = {}
    for plan in plans:
        block = grads.blocks[plan.name]
        if plan.kind == "dense":
            arrays = _side_arrays(block.values, bases.get((plan.name, "values")))
            if not plan.sketch[0] and len(plan.sizes) > 1:
                # one array per parameter (same row scale): a derived side reads its part alone
                whole, start = arrays.pop("values"), 0
                for i, size in enumerate(plan.sizes):
                    arrays[f"values{i}"] = whole[:, start : start + size].contiguous()
                    start += size
            out.update({f"{plan.name}/values/{k}": v for k, v in arrays.items()})
        elif plan.kind == "factored":
            if plan.derived is None:
                arrays = _side_arrays(block.delta, bases.get((plan.name, "out")))
                out.update({f"{plan.name}/out/{k}": v for k, v in arrays.items()})
            a = block.a
            if plan.grouped:
                a = a[group_rows] if group_rows is not None else a[:0]
            arrays = _side_arrays(a, bases.get((plan.name, "in")))
            out.update({f"{plan.name}/in/{k}": v for k, v in arrays.items()})
        elif plan.kind == "rows":
            values, scale = to_half(block.rows)
            out[f"{plan.name}/rows/ids"] = block.ids.to(torch.int32).cpu()
            out[f"{plan.name}/rows/values"] = values.cpu()
            out[f"{plan.name}/rows/scale"] = scale.cpu()
            out[f"{plan.name}/rows/norm"] = block.squared_norms().double().clamp_min(0).sqrt().float().cpu()
        else:
            out[f"{plan.name}/opaque/norm"] = block.squared_norms().double().clamp_min(0).sqrt().float().cpu()
    return out


def sketch_sample(plans: list[BlockPlan], grads: PerExampleGradients) -> dict[tuple[str, str], torch.Tensor]:
    """The factors whose principal directions the sketched sides need, from a sample's gradients."""
    wanted: dict[tuple[str, str], torch.Tensor] = {}
    for plan in plans:
        block = grads.blocks[plan.name]
        for side, _, dim in plan.sides():
            if not dim:
                continue
            x = block.values if side == "values" else block.delta if side == "out" else block.a
            wanted[(plan.name, side)] = x.reshape(-1, x.shape[-1]).detach()
    return wanted
