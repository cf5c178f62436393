r"""Seeded random projections of per-example gradients into flat vectors (or exact flat vectors).

Johnson-Lindenstrauss: for P with i.i.d. entries of mean 0 and variance 1/k,
:math:`E\langle P x, P y\rangle = \langle x, y\rangle`. Per block:

- Linear layer (gradient :math:`\delta a^\top`): two-sided (Kronecker) projection
  :math:`(P_{out}\delta) \otimes (P_{in} a)`, k_out * k_in numbers, never the out x in matrix;
  :math:`E\langle\cdot,\cdot\rangle = \langle\delta_1,\delta_2\rangle\langle a_1,a_2\rangle` as the sides are independent.
  A small output side (at most 256, ConvE's 200) is kept exact. The input side spends most of its
  k_in on an exact *principal subspace* V (r orthonormal directions fitted on a sample of the
  training activations at that checkpoint) and the rest on a JL projection of the residual:
  :math:`P_{in} a = [V a;\ M (a - V^\top V a)]`, still unbiased, and far more accurate because
  layer inputs (ReLU features of a few (head, relation) pairs) are close to low-rank.
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
from typing import Any, Literal, Mapping

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
    #: share of a Linear layer's projected input side spent on its exact principal subspace
    principal_fraction: float = 0.75

    def __post_init__(self):
        if not 0.0 <= self.principal_fraction < 1.0:
            raise InputError(f"principal fraction must be in [0, 1), got {self.principal_fraction}")
        if self.dim < 0:
            raise InputError(f"projection dim must be 0 (exact) or positive, got {self.dim}")
        if self.kind not in PROJECTION_KINDS:
            raise InputError(f"unknown projection kind {self.kind!r}; valid: {', '.join(PROJECTION_KINDS)}")

    def to_json(self) -> dict:
        return {"dim": self.dim, "kind": self.kind, "seed": self.seed, "principal_fraction": self.principal_fraction}


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
    principal: int = 0  # linear: exact principal directions within projected[1]

    @property
    def size(self) -> int:
        return self.projected[0] * self.projected[1]

    @property
    def exact(self) -> bool:
        return self.projected == self.shape

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape), "projected": list(self.projected),
                "principal": self.principal}  # fmt: skip


def _split_sides(first: int, second: int, dim: int) -> tuple[int, int]:
    """Targets (k1, k2) with k1 * k2 <= dim, k1 near sqrt(dim) (a power of two), each side at most its size."""
    if first * second <= dim:
        return first, second
    k1 = min(first, 2 ** max(0, round(math.log2(math.sqrt(dim)))))
    k2 = min(second, max(1, dim // k1))
    if k2 == second:  # the second side fits whole: give the first side the rest
        k1 = min(first, max(1, dim // k2))
    return k1, k2


#: An output side up to this size is kept exact (its inner products decide the sign of the score).
MAX_EXACT_OUT = 256


def _linear_sides(out: int, m: int, dim: int) -> tuple[int, int]:
    if out * m <= dim:
        return out, m
    if out <= MAX_EXACT_OUT and dim // out >= 16:
        return out, min(m, dim // out)
    return _split_sides(out, m, dim)


def block_layout(selected: SelectedModule, spec: ProjectionSpec) -> BlockLayout:
    module, dim = selected.module, spec.dim
    if selected.kind == "embedding":
        shape = (module.num_embeddings, module.embedding_dim)
        return BlockLayout(selected.name, "embedding", shape, shape if dim == 0 else _split_sides(*shape, dim))
    if selected.kind == "linear" and "weight" in selected.parameter_names:
        shape = (module.out_features, module.in_features + ("bias" in selected.parameter_names))
        projected = shape if dim == 0 else _linear_sides(*shape, dim)
        principal = int(spec.principal_fraction * projected[1]) if projected[1] < shape[1] else 0
        return BlockLayout(selected.name, "linear", shape, projected, principal)
    p = selected.num_parameters
    return BlockLayout(selected.name, "dense", (1, p), (1, p if dim == 0 else min(p, dim)))


class GradientProjector:
    """Flattens (and projects) :class:`PerExampleGradients` for one checkpoint into (B, size) vectors.

    ``bases``: the principal directions (r x in) of each Linear layer whose layout has
    ``principal > 0``, see :func:`fit_principal_bases`.
    """

    def __init__(self, selection: ParameterSelection, spec: ProjectionSpec, checkpoint: int, device=None,
                 bases: Mapping[str, torch.Tensor] | None = None):  # fmt: skip
        self.spec = spec
        self.checkpoint = checkpoint
        self.layouts = [block_layout(m, spec) for m in selection.modules]
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._matrices: dict[tuple[str, str], Any] = {}
        self.bases = {name: b.to(self.device) for name, b in (bases or {}).items()}
        missing = [n for n in self.needs_bases if n not in self.bases]
        if bases is not None and missing:
            raise InputError(f"principal directions missing for layer(s) {', '.join(missing)}; rebuild the index")

    @property
    def needs_bases(self) -> list[str]:
        return [layout.name for layout in self.layouts if layout.principal]

    @property
    def size(self) -> int:
        return sum(layout.size for layout in self.layouts)

    def _matrix(self, layout: BlockLayout, side: str, rows: int, cols: int) -> torch.Tensor:
        key = (layout.name, side)
        if key not in self._matrices:
            m = random_matrix(self.spec.seed, self.checkpoint, layout.name, side, rows, cols, self.spec.kind)
            self._matrices[key] = m.to(self.device)
        return self._matrices[key]

    def _principal_matrices(self, layout: BlockLayout, basis: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[B; M] (principal directions over the JL rows of the input side) and B M^T, in ``dtype``."""
        key = (layout.name, f"principal-{dtype}")
        if key not in self._matrices:
            rest = layout.projected[1] - layout.principal
            m = self._matrix(layout, "in", rest, layout.shape[1])
            basis = basis.to(device=m.device, dtype=torch.float64)
            m64 = m.to(torch.float64)
            stacked = torch.cat([basis, m64]).to(dtype)
            self._matrices[key] = (stacked, (basis @ m64.T).to(dtype))
        return self._matrices[key]

    def _side(self, layout: BlockLayout, side: int, x: torch.Tensor) -> torch.Tensor:
        """Project the last dimension of x for one side (0 = out/rows, 1 = in/dim); identity when kept exact."""
        if layout.projected[side] == layout.shape[side]:
            return x
        if side == 1 and layout.principal:
            basis = self.bases.get(layout.name)
            if basis is None:
                raise InputError(f"layer {layout.name!r} needs its principal directions (fit_principal_bases) first")
            stacked, correction = self._principal_matrices(layout, basis, x.dtype)
            # [x B^T, (x - x B^T B) M^T] in one product: x [B; M]^T, then subtract (x B^T)(B M^T)
            y = x @ stacked.T
            principal = layout.principal
            y[..., principal:] -= y[..., :principal] @ correction
            return y
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
        rows = self._side(layout, 1, block.rows)  # (B, K, kD)
        vec = None if block.vec is None else self._side(layout, 1, block.vec)  # (B, kD)
        B, K, kD = rows.shape
        if layout.projected[0] == layout.shape[0]:  # every table row kept: scatter, no row projection
            out = rows.new_zeros(B, layout.shape[0], kD)
            out.scatter_add_(1, block.ids[:, :, None].expand(B, K, kD), rows)
            if block.coef is not None:
                out = out + block.coef[:, :, None] * vec[:, None, :]
            return out
        # one random vector R[j] per table row j: the "out" side matrix's columns
        table = self._matrix(layout, "out", layout.projected[0], layout.shape[0]).to(rows.dtype)
        out = torch.einsum("rbk,bkd->brd", table[:, block.ids], rows)
        if block.coef is not None:
            out = out + torch.einsum("bn,rn->br", block.coef, table)[:, :, None] * vec[:, None, :]
        return out


def fit_principal_bases(
    selection: ParameterSelection,
    spec: ProjectionSpec,
    computer,
    sample: torch.Tensor,
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Top principal directions (uncentred) of each projected Linear layer's inputs on ``sample`` triples.

    Randomised SVD on the CPU under a fixed seed, so the same model and sample give the same
    directions on any device (a CUDA generator would draw other numbers).
    """
    layouts = [block_layout(m, spec) for m in selection.modules]
    wanted = {layout.name: layout for layout in layouts if layout.principal}
    if not wanted:
        return {}
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in wanted}
    for start in range(0, sample.shape[0], batch_size):
        grads = computer.compute(sample[start : start + batch_size])
        for name in wanted:
            a = grads.blocks[name].a
            inputs[name].append(a.reshape(-1, a.shape[-1]).float().cpu())
    bases = {}
    for name, layout in wanted.items():
        a = torch.cat(inputs[name])
        r = min(layout.principal, a.shape[0], a.shape[1])
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(_stable_seed(spec.seed, "principal", name) % (2**31))
            _, _, v = torch.svd_lowrank(a, q=min(r + 10, min(a.shape)), niter=4)
        directions = v[:, :r].T
        # a singular vector's sign is arbitrary and flips with tiny changes of the inputs (another
        # device's rounding): make each one's largest entry positive, so builds agree
        largest = directions.gather(1, directions.abs().argmax(dim=1, keepdim=True))
        directions = directions * torch.where(largest < 0, -1.0, 1.0)
        basis = torch.zeros(layout.principal, a.shape[1], dtype=torch.float32, device=a.device)
        basis[:r] = directions  # fewer sample rows than directions: the rest stay zero (no exact part)
        bases[name] = basis.cpu()
    return bases
