r"""Per-example gradients as structured blocks, one per selected module, each with its own exact inner product.

- ``nn.Linear`` :math:`y = W a + b`: :math:`\nabla_W = \delta a^\top`, :math:`\nabla_b = \delta`. Kept as
  factors ``a`` (with a 1 appended for the bias) and ``delta`` (:class:`FactoredBlock`); then
  :math:`\langle g_1, g_2\rangle = \langle a_1, a_2\rangle \langle \delta_1, \delta_2\rangle`.
- other small modules (batch norm affine parameters, convolutions): dense per-example gradients
  (:class:`DenseBlock`).
- embedding tables: the rows an example looked up and their gradients (:class:`RowsBlock`); under the
  1-N ``ce`` loss the tail table also gets the rank-one term :math:`(p - y)\, q^\top`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import torch

from ..errors import LossError


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
        if self.a.shape[1] == 1:  # vector_norm: one pass, no temporary (pow().sum() makes one)
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


def inverse_norms(squared_norms: torch.Tensor) -> torch.Tensor:
    """1 / ||g|| from squared norms, float64; 0 where the gradient is 0 (it then contributes nothing)."""
    norms = squared_norms.double().clamp_min(0).sqrt()
    return torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(norms))


def cosine(dots: torch.Tensor, test_squared: torch.Tensor, train_squared: torch.Tensor) -> torch.Tensor:
    """Inner products (T, N) divided by the norms of both sides (``--normalize``); 0 where either norm is 0."""
    return dots * inverse_norms(test_squared)[:, None] * inverse_norms(train_squared)[None, :]
