r"""What the index stores of each per-example gradient: one plan per selected block.

For one checkpoint, the gradient of a training triple z is a set of blocks (one per selected
module, see :mod:`tracin_index.gradients.blocks`) and :math:`\langle g(z), g(q)\rangle` is the sum of
the blocks' inner products. Each block is stored so that a query can compute, for every stored row,
an *estimate* of its inner product and an *error bound* that holds for certain
(:mod:`tracin_index.search.scan`):

- **dense** (batch norm, small convolutions): the values, in float16 with a per-row scale (exact up
  to rounding); wider than :data:`MAX_EXACT_DENSE`: a principal sketch (:mod:`tracin_index.storage.sketch`).
- **factored** (a Linear layer, gradient :math:`\delta a^\top`): the two sides separately,
  :math:`\langle g_z, g_q\rangle = \langle\delta_z,\delta_q\rangle\langle a_z, a_q\rangle`. A side of
  at most :data:`MAX_EXACT_SIDE` numbers is kept whole (ConvE's 200 outputs: they carry the sign of
  the influence); a wider one (ConvE's 10,369 inputs) is sketched. Where the input side depends on
  (head, relation) only (ConvE), it is stored once per distinct pair (*grouped*). Where the Linear
  feeds a batch norm directly, its output gradient is the batch norm's bias gradient times
  :math:`\gamma / \sqrt{\sigma^2 + \epsilon}` (eval mode), so it is not stored twice (*derived*).
- **rows** (embedding tables): the looked-up ids and their gradient rows; under ``bce`` two triples'
  gradients meet only in rows they share, so every other pair contributes exactly 0.

What cannot be factored this way (the 1-N rank-one term of ``ce`` on embedding tables) is kept as
its norm only (*opaque*): estimate 0, bound :math:`\lVert g_z\rVert\lVert g_q\rVert`. Exactness never
depends on the estimates: a query rescores its candidates exactly (:mod:`tracin_index.search.settle`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..gradients.blocks import DenseBlock, FactoredBlock, RowsBlock
from ..gradients.computer import GradientComputer
from ..gradients.selection import ParameterSelection

#: A Linear layer's output side up to this size is kept whole (its input side: up to twice the sketch dim).
MAX_EXACT_SIDE = 512


#: A dense block up to this many parameters is kept whole.
MAX_EXACT_DENSE = 1024


#: Default number of principal directions of a sketched side (the build widens it where the sampled
#: inputs are far from low-rank: :mod:`tracin_index.build.plan`).
DEFAULT_SKETCH_DIM = 128


BlockKind = Literal["factored", "dense", "rows", "opaque"]


@dataclass(frozen=True)
class BlockPlan:
    """How one selected module's per-example gradient is stored (see the module docstring).

    ``sizes``: dense: the parameters' sizes; factored: (out, in [+1 for the bias]); rows: (table
    rows, row dim). ``sketch``: per side (dense: one side) 0 = kept whole, else principal directions.
    ``grouped``: the factored input side is stored once per (head, relation) pair. ``derived``:
    (dense block, part) whose values times the batch norm's scale are this block's output side.
    ``examples``: (delta, a) pairs per row of a factored block.
    """

    name: str
    kind: BlockKind
    sizes: tuple[int, ...]
    sketch: tuple[int, ...] = ()
    grouped: bool = False
    derived: tuple[str, int] | None = None
    examples: int = 1

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "sizes": list(self.sizes), "sketch": list(self.sketch),
                "grouped": self.grouped, "derived": list(self.derived) if self.derived else None,
                "examples": self.examples}  # fmt: skip

    @classmethod
    def from_json(cls, d: dict) -> "BlockPlan":
        return cls(d["name"], d["kind"], tuple(d["sizes"]), tuple(d["sketch"]), d["grouped"],
                   tuple(d["derived"]) if d["derived"] else None, d["examples"])  # fmt: skip

    def sides(self) -> list[tuple[str, int, int]]:
        """(side, full size, sketch dim) of each stored side that may need a basis."""
        if self.kind == "dense":
            return [("values", sum(self.sizes), self.sketch[0])]
        if self.kind == "factored":
            sides = [("in", self.sizes[1], self.sketch[1])]
            if self.derived is None:
                sides.insert(0, ("out", self.sizes[0], self.sketch[0]))
            return sides
        return []

    def row_bytes(self, rows_per_group: float = 1.0) -> float:
        """Bytes stored per training row at one checkpoint (``rows_per_group`` for grouped sides)."""
        def side(size: int, sketch: int, extra: int) -> int:
            return 2 * (sketch or size) + 4 * extra

        if self.kind == "dense":
            return side(sum(self.sizes), self.sketch[0], 3 if self.sketch[0] else 2)
        if self.kind == "factored":
            total = 0.0 if self.derived else self.examples * side(self.sizes[0], self.sketch[0], 3)
            per = self.examples * side(self.sizes[1], self.sketch[1], 3)
            return total + (per / rows_per_group if self.grouped else per)
        if self.kind == "rows":
            return 2 * self.sizes[2] * self.sizes[1] + 4 * self.sizes[2] + 8 if len(self.sizes) > 2 else 0
        return 4  # opaque: the norm


def sketched_sides(plans: list[BlockPlan]) -> dict[tuple[str, str], int]:
    """(block, side) -> sketch dim of every side the plans sketch (each has a basis per checkpoint)."""
    return {(p.name, side): dim for p in plans for side, _, dim in p.sides() if dim}


def plan_blocks(model: nn.Module, selection: ParameterSelection, computer: GradientComputer, sample: torch.Tensor,
                num_entities: int, sketch_dim: int = DEFAULT_SKETCH_DIM, seed: int = 0, *,
                share_pairs: bool = True) -> list[BlockPlan]:  # fmt: skip
    """The storage plan of each selected block, from its type and from checks on ``sample`` triples:
    whether a Linear's input depends on (head, relation) only (the same for other tails), and whether
    its output gradient is a batch norm's bias gradient times the norm's scale."""
    grads = computer.compute_examples(sample)
    generator = torch.Generator().manual_seed(seed)
    other_tails = sample.clone()
    other_tails[:, 2] = torch.randint(0, num_entities, (len(sample),), generator=generator).to(sample.device)
    swapped = computer.compute_examples(other_tails)
    plans: list[BlockPlan] = []
    for m in selection.modules:
        block = grads.blocks[m.name]
        if isinstance(block, FactoredBlock):
            out, inp = block.delta.shape[-1], block.a.shape[-1]
            examples = block.a.shape[1]
            grouped = share_pairs and examples == 1 and torch.equal(block.a, swapped.blocks[m.name].a)
            # the output side carries the sign of an influence: whole unless very wide; the input side is
            # sketched when its sketch (and residual) is clearly smaller than the side itself
            sketch = (0 if out <= MAX_EXACT_SIDE else sketch_dim, 0 if inp <= 2 * sketch_dim else sketch_dim)
            plans.append(BlockPlan(m.name, "factored", (out, inp), sketch, grouped, None, examples))
        elif isinstance(block, DenseBlock):
            sizes = tuple(int(s.numel()) for s in block.shapes)
            plans.append(BlockPlan(m.name, "dense", sizes, (0 if sum(sizes) <= MAX_EXACT_DENSE else sketch_dim,)))
        elif isinstance(block, RowsBlock) and block.coef is None:
            plans.append(BlockPlan(m.name, "rows", (block.num_rows, block.rows.shape[-1], block.ids.shape[1])))
        else:
            plans.append(BlockPlan(m.name, "opaque", ()))
    return _derive_batch_norm_sides(model, selection, plans, grads)


def batch_norm_scale(module: nn.Module) -> torch.Tensor | None:
    """gamma / sqrt(running_var + eps) of an affine batch norm with running statistics (eval mode), else None."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm) or not module.affine or module.running_var is None:
        return None
    return (module.weight / torch.sqrt(module.running_var + module.eps)).detach()


def _derive_batch_norm_sides(model, selection, plans, grads) -> list[BlockPlan]:
    """Mark a Linear whose output gradient equals a following batch norm's bias gradient times its scale."""
    modules = {m.name: m for m in selection.modules}
    result = []
    for i, plan in enumerate(plans):
        if plan.kind == "factored" and plan.examples == 1 and plan.sketch[0] == 0 and i + 1 < len(plans):
            nxt = plans[i + 1]
            bn = modules[nxt.name]
            scale = batch_norm_scale(bn.module)
            if nxt.kind == "dense" and nxt.sketch[0] == 0 and scale is not None and "bias" in bn.parameter_names:
                part = bn.parameter_names.index("bias")
                start = sum(nxt.sizes[:part])
                bias_grad = grads.blocks[nxt.name].values[:, start : start + nxt.sizes[part]]
                delta = grads.blocks[plan.name].delta[:, 0]
                if bias_grad.shape == delta.shape:
                    derived = bias_grad * scale.to(bias_grad)
                    tolerance = 1e-5 * float(delta.abs().max().clamp_min(1e-30))
                    if float((derived - delta).abs().max()) <= tolerance:
                        plan = BlockPlan(plan.name, plan.kind, plan.sizes, plan.sketch, plan.grouped,
                                         (nxt.name, part), plan.examples)  # fmt: skip
        result.append(plan)
    return result


def is_input_side(key: str, plans: list[BlockPlan]) -> bool:
    """Whether ``key`` names an array of a Linear's stored input side (per row or per group; refining
    recomputes it, so a candidate's refinement needs every array but these)."""
    return any(p.kind == "factored" and key.startswith(f"{p.name}/in/") for p in plans)
