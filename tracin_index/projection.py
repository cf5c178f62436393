r"""Seeded random projections of per-example gradients into flat vectors (or exact flat vectors).

Johnson-Lindenstrauss: for P with i.i.d. entries of mean 0 and variance 1/k,
:math:`E\langle P x, P y\rangle = \langle x, y\rangle`. Per block:

- Linear layer (gradient :math:`\delta a^\top`): two-sided (Kronecker) projection
  :math:`(P_{out}\delta) \otimes (P_{in} a)`, k_out * k_in numbers, never the out x in matrix;
  :math:`E\langle\cdot,\cdot\rangle = \langle\delta_1,\delta_2\rangle\langle a_1,a_2\rangle` as the sides are independent.
- dense block: one matrix P (k x p).
- embedding table (rows and the rank-one tail term): a random vector R[j] per row j (k_rows) times
  a projection of the row gradient, :math:`\sum_k R[id_k] \otimes (P_D\, row_k) + (R^\top c) \otimes (P_D\, q)`.

A side whose dimension is at most its target is kept exact (identity). Every matrix is a function
of (seed, checkpoint, layer, side) only, see :func:`random_matrix`, so a query regenerates exactly
the matrices of the build.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import InputError
from .gradients import DenseBlock, FactoredBlock, PerExampleGradients, RowsBlock
from .layers import ParameterSelection, SelectedModule

ProjectionKind = Literal["gaussian", "rademacher"]
PROJECTION_KINDS = ("gaussian", "rademacher")


@dataclass(frozen=True)
class ProjectionSpec:
    """``dim``: target numbers per block and checkpoint (0 = exact vectors); ``kind``; ``seed``."""

    dim: int = 0
    kind: ProjectionKind = "gaussian"
    seed: int = 0

    def __post_init__(self):
        if self.dim < 0:
            raise InputError(f"projection dim must be 0 (exact) or positive, got {self.dim}")
        if self.kind not in PROJECTION_KINDS:
            raise InputError(f"unknown projection kind {self.kind!r}; valid: {', '.join(PROJECTION_KINDS)}")

    def to_json(self) -> dict:
        return {"dim": self.dim, "kind": self.kind, "seed": self.seed}


def _stable_seed(*parts) -> int:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_matrix(
    seed: int, checkpoint: int, layer: str, side: str, rows: int, cols: int, kind: ProjectionKind
) -> torch.Tensor:
    """The (rows x cols) projection matrix for one (seed, checkpoint, layer, side), entries of variance 1/rows.

    Generated on the CPU in float32 from a generator seeded by a hash of exactly these arguments,
    so the same call always returns the same matrix, on any machine and device.
    """
    generator = torch.Generator().manual_seed(_stable_seed(seed, checkpoint, layer, side, rows, cols, kind))
    if kind == "gaussian":
        return torch.randn(rows, cols, generator=generator) / math.sqrt(rows)
    signs = torch.randint(0, 2, (rows, cols), generator=generator, dtype=torch.int8)
    return (signs.float() * 2 - 1) / math.sqrt(rows)


@dataclass(frozen=True)
class BlockLayout:
    """How one selected module's gradient becomes part of the flat vector."""

    name: str
    kind: str  # linear | dense | embedding
    shape: tuple[int, int]  # linear: (out, in [+1]); dense: (1, p); embedding: (num_rows, dim)
    projected: tuple[int, int]  # the same sides after projection (equal to shape where kept exact)

    @property
    def size(self) -> int:
        return self.projected[0] * self.projected[1]

    @property
    def exact(self) -> bool:
        return self.projected == self.shape

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape), "projected": list(self.projected)}


def _split_sides(first: int, second: int, dim: int) -> tuple[int, int]:
    """Targets (k1, k2) with k1 * k2 <= dim, k1 near sqrt(dim) (a power of two), each side at most its size."""
    if first * second <= dim:
        return first, second
    k1 = min(first, 2 ** max(0, round(math.log2(math.sqrt(dim)))))
    k2 = min(second, max(1, dim // k1))
    if k2 == second:  # the second side fits whole: give the first side the rest
        k1 = min(first, max(1, dim // k2))
    return k1, k2


def block_layout(selected: SelectedModule, dim: int) -> BlockLayout:
    module = selected.module
    if selected.kind == "embedding":
        shape = (module.num_embeddings, module.embedding_dim)
        projected = shape if dim == 0 else _split_sides(shape[0], shape[1], dim)
        if dim and projected[0] == shape[0] and projected != shape:
            projected = shape
        return BlockLayout(selected.name, "embedding", shape, projected)
    if selected.kind == "linear" and "weight" in selected.parameter_names:
        shape = (module.out_features, module.in_features + ("bias" in selected.parameter_names))
        projected = shape if dim == 0 else _split_sides(shape[0], shape[1], dim)
        return BlockLayout(selected.name, "linear", shape, projected)
    p = selected.num_parameters
    return BlockLayout(selected.name, "dense", (1, p), (1, p if dim == 0 else min(p, dim)))


class GradientProjector:
    """Flattens (and projects) :class:`PerExampleGradients` for one checkpoint into (B, size) vectors."""

    def __init__(self, selection: ParameterSelection, spec: ProjectionSpec, checkpoint: int, device=None):
        self.spec = spec
        self.checkpoint = checkpoint
        self.layouts = [block_layout(m, spec.dim) for m in selection.modules]
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._matrices: dict[tuple[str, str], torch.Tensor] = {}

    @property
    def size(self) -> int:
        return sum(layout.size for layout in self.layouts)

    def _matrix(self, layout: BlockLayout, side: str, rows: int, cols: int) -> torch.Tensor:
        key = (layout.name, side)
        if key not in self._matrices:
            m = random_matrix(self.spec.seed, self.checkpoint, layout.name, side, rows, cols, self.spec.kind)
            self._matrices[key] = m.to(self.device)
        return self._matrices[key]

    def _side(self, layout: BlockLayout, side: int, x: torch.Tensor) -> torch.Tensor:
        """Project the last dimension of x for one side (0 = out/rows, 1 = in/dim); identity when kept exact."""
        if layout.projected[side] == layout.shape[side]:
            return x
        m = self._matrix(layout, "out" if side == 0 else "in", layout.projected[side], layout.shape[side])
        return x @ m.to(x.dtype).T

    def project(self, grads: PerExampleGradients) -> torch.Tensor:
        parts = []
        for layout in self.layouts:
            block = grads.blocks[layout.name]
            parts.append(self._project_block(layout, block).reshape(len(grads), -1))
        return torch.cat(parts, dim=1)

    def _project_block(self, layout: BlockLayout, block) -> torch.Tensor:
        if isinstance(block, FactoredBlock):
            delta = self._side(layout, 0, block.delta)
            a = self._side(layout, 1, block.a)
            return torch.einsum("bln,blm->bnm", delta, a)
        if isinstance(block, DenseBlock):
            return self._side(layout, 1, block.values)
        if isinstance(block, RowsBlock):
            return self._project_rows(layout, block)
        raise TypeError(f"unknown gradient block {type(block).__name__}")

    def _project_rows(self, layout: BlockLayout, block: RowsBlock) -> torch.Tensor:
        if layout.exact:
            return block.to_dense()[0]
        rows = self._side(layout, 1, block.rows)  # (B, K, kD)
        # R: one random vector per table row, i.e. the "out" side matrix transposed (num_rows x k_rows)
        table = self._matrix(layout, "out", layout.projected[0], layout.shape[0]).to(rows.dtype)
        out = torch.einsum("rbk,bkd->brd", table[:, block.ids], rows)
        if block.coef is not None:
            out = out + torch.einsum("bn,rn->br", block.coef, table)[:, :, None] * self._side(layout, 1, block.vec)[:, None, :]
        return out
