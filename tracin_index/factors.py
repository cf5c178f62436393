r"""What the index stores of each per-example gradient, and how a query scores every row from it.

For one checkpoint, the gradient of a training triple z is a set of blocks (one per selected
module, see :mod:`tracin_index.gradients`) and :math:`\langle g(z), g(q)\rangle` is the sum of the
blocks' inner products. Each block is stored so that a query can compute, for every row, an
*estimate* of its inner product and an *error bound* that holds for certain:

- **dense** (batch norm, small convolutions): the values, in float16 with a per-row scale (exact up
  to rounding); wider than :data:`MAX_EXACT_DENSE`: a principal sketch (:mod:`tracin_index.sketch`).
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
its norm only: estimate 0, bound :math:`\lVert g_z\rVert\lVert g_q\rVert`. Exactness never depends
on the estimates: the index rescores its candidates exactly (:mod:`tracin_index.index`).

float16 storage with a per-row scale (the largest magnitude maps to 1, so nothing overflows)
changes an inner product by at most :data:`EPS` :math:`\lVert x\rVert\lVert y\rVert` (2^-11 for the
rounding of x, the same for the float16 result of the product, and subnormals of a row whose
entries span many orders of magnitude), which the bounds include.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import nn

from .errors import TracInWarning
from .files import available_memory
from .gradients import DenseBlock, FactoredBlock, GradientComputer, LinearInputs, PerExampleGradients, RowsBlock
from .layers import ParameterSelection
from .sketch import Basis

#: Relative error of an inner product of a float16-stored row (scaled to at most 1) with a query.
EPS = 2.0**-9
#: A Linear layer's output side up to this size is kept whole (its input side: up to twice the sketch dim).
MAX_EXACT_SIDE = 512
#: A dense block up to this many parameters is kept whole.
MAX_EXACT_DENSE = 1024
#: Default number of principal directions of a sketched side (UMLS ConvE: 0.977 of the inputs' energy).
DEFAULT_SKETCH_DIM = 128
#: Relative error allowed for an inner product of two float32 vectors recomputed at query time (a
#: refined row's input side): far above float32's accumulated rounding over 10^4 terms, far below EPS.
EPS_RECOMPUTED = 2.0**-16

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


# ------------------------------------------------------------------------------------------------
# Choosing the plan


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


# ------------------------------------------------------------------------------------------------
# Encoding rows for storage


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


# ------------------------------------------------------------------------------------------------
# Scanning: a query's estimate and bound for every stored row


#: A stored array of at least PACK_MIN_ROWS rows and PACK_MIN_WIDTH numbers per row is scanned by fbgemm's
#: float16 GEMM (float16 rows, float32 query and sums: 1.5 ms per 100k x 200 against 2.0 for torch's
#: float16 mat-vec, two queries at once in 1.75) once its checkpoint has been scanned ``pack_after``
#: times: packing costs about 12 ns per stored number (3-5 s for a 100k-triple ConvE index), which a
#: one-off query would not earn back. The packed copy is held besides the stored arrays (candidates'
#: rows are gathered from those), its rows padded to a multiple of PACK_PAD numbers (measured: 200-wide
#: rows take 2.6x their float16 bytes packed, 400-wide 1.28x, 512-wide 1x): narrow arrays stay unpacked.
PACK_MIN_ROWS = 4096
PACK_MIN_WIDTH = 128
PACK_PAD = 512
#: ... packed in blocks of this many rows (packing goes through a float32 copy of each block).
PACK_ROWS = 32768
#: An array is packed only while its packed copy leaves this share of the memory available.
PACK_SPARE = 0.25


def _fbgemm_available() -> bool:
    """Whether this torch has fbgemm's float16 GEMM (x86 builds; deprecated but present in torch 2.x)."""
    global _FBGEMM
    if _FBGEMM is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                packed = torch.fbgemm_pack_gemm_matrix_fp16(torch.ones(8, 8))
                _FBGEMM = bool(torch.fbgemm_linear_fp16_weight(torch.ones(1, 8), packed, torch.zeros(8))[0, 0] == 8)
        except (AttributeError, RuntimeError):
            _FBGEMM = False
    return _FBGEMM


_FBGEMM: bool | None = None


class _Packed:
    """A float16 array (rows, d) packed for fbgemm, in blocks of PACK_ROWS rows."""

    def __init__(self, values: torch.Tensor):
        self.blocks = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "deprecated": there is no successor on the CPU yet
            for start in range(0, len(values), PACK_ROWS):
                part = values[start : start + PACK_ROWS]
                self.blocks.append((torch.fbgemm_pack_gemm_matrix_fp16(part.float()), torch.zeros(len(part))))

    def products(self, queries: torch.Tensor) -> torch.Tensor:
        """(M, rows) float32: each row's inner product with each query (M, d) float32."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parts = [torch.fbgemm_linear_fp16_weight(queries, packed, bias) for packed, bias in self.blocks]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


@dataclass
class Stored:
    """One checkpoint's stored arrays for all rows (shards concatenated), plus the bases and the
    rows' group ids of grouped blocks. ``pack_after``: scans after which large arrays are packed for
    fbgemm (:data:`PACK_MIN_ROWS`; None: never)."""

    arrays: dict[str, torch.Tensor]
    bases: dict[tuple[str, str], Basis]
    groups: dict[str, torch.Tensor]  # block name -> (rows,) group id
    num_rows: int
    postings: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    pack_after: int | None = None
    scans: int = 0
    packed: dict[str, _Packed] = field(default_factory=dict)
    pack_refused: bool = False

    def products(self, keys: str | tuple[str, ...], queries: torch.Tensor) -> torch.Tensor:
        """Products of the float16 rows (rows, [examples,] d) of array ``keys`` (several: side by side, the
        same rows) with each query (M, sum of d), the queries scaled to at most 1 in magnitude:
        (M, rows[, examples]), float16 from torch's mat-vec products (a query's all-zero parts skipped),
        float32 where the arrays are packed for fbgemm (side by side: fbgemm pads each row to a multiple
        of 512 numbers, so a batch norm's two 200-wide parts take half the memory packed together)."""
        keys = (keys,) if isinstance(keys, str) else keys
        parts = [self.arrays[key] for key in keys]
        flats = [v.reshape(-1, v.shape[-1]) for v in parts]
        packed = self.packed.get("+".join(keys))
        width = sum(f.shape[1] for f in flats)
        if (packed is None and len(flats[0]) >= PACK_MIN_ROWS and width >= PACK_MIN_WIDTH and flats[0].dtype == torch.float16
                and self._packing(flats[0], len(flats[0]), width)):  # fmt: skip
            packed = self.packed["+".join(keys)] = _Packed(flats[0] if len(flats) == 1 else torch.cat(flats, 1))
        if packed is not None:
            out = packed.products(queries.float().cpu())
        elif len(flats) == 1:
            q = queries.to(device=flats[0].device, dtype=flats[0].dtype)
            out = torch.stack([torch.mv(flats[0], q[i]) for i in range(len(q))])
        else:  # the parts' float16 products summed in float32 (exactly: a sum in float16 would round)
            q = queries.to(device=flats[0].device, dtype=flats[0].dtype)
            out = torch.zeros(len(q), len(flats[0]), dtype=torch.float32, device=flats[0].device)
            for i in range(len(q)):
                start = 0
                for flat in flats:
                    piece = q[i, start : start + flat.shape[1]]
                    start += flat.shape[1]
                    if bool(piece.any()):
                        out[i].add_(torch.mv(flat, piece))
        return out.view(len(queries), *parts[0].shape[:-1])

    @property
    def device(self) -> torch.device:
        return next(iter(self.arrays.values())).device if self.arrays else torch.device("cpu")

    def _packing(self, values: torch.Tensor, rows: int, width: int) -> bool:
        """Whether to pack ``values`` (``rows`` x ``width`` float16 numbers) now: asked for, on the CPU, with
        fbgemm, and with the memory for it (else it is scanned unpacked, as before, and the index says so once)."""
        if (self.pack_after is None or self.scans < self.pack_after or self.pack_refused or values.device.type != "cpu"
                or not _fbgemm_available()):  # fmt: skip
            return False
        available = available_memory()
        need = 2 * rows * -(-width // PACK_PAD) * PACK_PAD
        if available is not None and need > (1 - PACK_SPARE) * available:
            warnings.warn(f"not packing the index's stored arrays for faster scans: {need / 2**20:,.0f} MiB more "
                          f"would leave less than {PACK_SPARE:.0%} of the {available / 2**20:,.0f} MiB available",
                          TracInWarning, stacklevel=4)  # fmt: skip
            self.pack_refused = True
            return False
        return True

    def sketch_query(self, side: tuple[str, str], query: torch.Tensor) -> tuple[torch.Tensor, float]:
        """:meth:`Basis.sketch_query` of ``side``'s basis; with packing on, B x by fbgemm from the basis's
        8-bit entries (exact in float16) times its row scales (1,024 x 10,369 float32 numbers read per
        checkpoint and query otherwise, at 512 directions)."""
        basis = self.bases[side]
        key = f"{side[0]}/{side[1]}/basis"
        if key not in self.packed:
            q = basis.quantized
            if q is None or basis.matrix.device.type != "cpu" or not self._packing(q[0], q[0].shape[0], q[0].shape[1]):
                return basis.sketch_query(query)
            self.packed[key] = _Packed(q[0].to(torch.float16))
        q_scale = float(query.abs().max())
        if q_scale == 0.0:
            return basis.sketch_query(query)
        s = self.packed[key].products((query.reshape(1, -1).float() / q_scale).cpu())[0].double()
        return basis.sketch_query(query, (s * basis.quantized[1].double() * q_scale).float())

    def to(self, device: torch.device | str) -> "Stored":
        """The same arrays on ``device`` (a GPU scans them much faster)."""
        return Stored({k: v.to(device) for k, v in self.arrays.items()},
                      {k: replace(b, matrix=b.matrix.to(device), gram_inverse=b.gram_inverse.to(device))
                       for k, b in self.bases.items()},
                      {k: v.to(device) for k, v in self.groups.items()}, self.num_rows, pack_after=self.pack_after)  # fmt: skip

    def rows_postings(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(starts, rows, slots): the (row, slot) pairs that look up each table row, as CSR."""
        if name not in self.postings:
            ids = self.arrays[f"{name}/rows/ids"].long()
            flat = ids.reshape(-1)
            order = torch.argsort(flat, stable=True)
            counts = torch.bincount(flat, minlength=int(flat.max()) + 1 if len(flat) else 1)
            starts = torch.zeros(len(counts) + 1, dtype=torch.long, device=ids.device)
            starts[1:] = torch.cumsum(counts, 0)
            self.postings[name] = (starts, order // ids.shape[1], order % ids.shape[1])
        return self.postings[name]


@dataclass
class _Estimate:
    value: torch.Tensor  # float64 (n,) or (n, examples)
    error: torch.Tensor  # float64, the same shape


def _mv(stored: Stored, key: str, scale: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """scale * (values @ query) in float64 for the float16 rows (rows, [examples,] d) of array ``key``."""
    values = stored.arrays[key]
    product, q_scale = _product(stored, key, query)
    if product is None:
        return torch.zeros(values.shape[:-1], dtype=torch.float64, device=values.device)
    # in place: at 1M rows each float64 temporary costs milliseconds (the scan is memory bound)
    return product.double().mul_(scale.double().view(-1, *([1] * (product.dim() - 1)))).mul_(q_scale)


def _side_key(prefix: str) -> tuple[str, str]:
    """(block, side) of an array prefix ``block/side`` (a basis's key)."""
    block, side = prefix.rsplit("/", 1)
    return block, side


def _side_estimate(stored: Stored, prefix: str, query: torch.Tensor, basis: Basis | None) -> _Estimate:
    """<x_row, query> for every stored row [and example] of one side (query: a vector of the side's full
    size): :func:`_add_side` into zeros."""
    shape = stored.arrays[f"{prefix}/norm"].shape  # the rows [and examples]
    out = _Estimate(torch.zeros(shape, dtype=torch.float64, device=stored.device),
                    torch.zeros(shape, dtype=torch.float64, device=stored.device))  # fmt: skip
    _add_side(out, stored, prefix, query, basis, 1.0, {})
    return out


def _combine(out: _Estimate, inp: _Estimate) -> _Estimate:
    """Estimate and bound of sum over examples of X1 * X2 from those of X1 (out side) and X2 (in side):
    |X1 X2 - E1 E2| <= |E1| e2 + |E2| e1 + e1 e2."""
    v1, e1, v2, e2 = out.value, out.error, inp.value, inp.error
    if v1.shape == v2.shape and v1.dim() == 1:  # one example per row: in place, fewer temporaries
        return _Estimate(v1 * v2, v1.abs().mul_(e2).addcmul_(v2.abs(), e1).addcmul_(e1, e2))
    if v1.dim() < v2.dim():
        v1, e1 = v1[:, None], e1[:, None]
    elif v2.dim() < v1.dim():
        v2, e2 = v2[:, None], e2[:, None]
    value, error = v1 * v2, v1.abs() * e2 + v2.abs() * e1 + e1 * e2
    if value.dim() == 2:
        value, error = value.sum(-1), error.sum(-1)
    return _Estimate(value, error)


def _product(stored: Stored, key: str, query: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """The rows of array ``key`` times ``query / q`` (:meth:`Stored.products`), and q = max |query| (None and
    0.0 for a zero query)."""
    return _products(stored, key, [query])[0]


def _products(stored: Stored, key: str | tuple[str, ...], queries: list[torch.Tensor]) -> list[tuple[torch.Tensor | None, float]]:
    """:func:`_product` for several queries over the same rows, in one pass where the array is packed."""
    scales = [float(q.abs().max()) if q.numel() else 0.0 for q in queries]
    live = [i for i, q_scale in enumerate(scales) if q_scale != 0.0]
    found: dict[int, torch.Tensor] = {}
    if live:
        products = stored.products(key, torch.stack([queries[i].reshape(-1) / scales[i] for i in live]))
        found = {i: products[j] for j, i in enumerate(live)}
    return [(found.get(i), scales[i]) for i in range(len(queries))]


def scan_block(plan: BlockPlan, plans: dict[str, BlockPlan], stored: Stored, query: PerExampleGradients,
               modules: dict[str, nn.Module], query_norm: float, out: _Estimate, weight: float = 1.0,
               memo: dict | None = None) -> None:  # fmt: skip
    """``out`` += ``weight`` times the estimate and bound of <g_row, g_query> for this block, every row
    (``query``: one test triple; ``modules``: the model's modules at this checkpoint, for batch norm
    scales, or those scales themselves).

    The scan is memory bound: float16 products are added into the float64 sums as they come (one pass
    each over the rows after the product), where a block's estimate as such would cost a float64
    temporary per step (milliseconds each at 1M rows). ``memo``: products one block computed for another
    (a derived output side and its batch norm read the same rows), by array key, with their query."""
    block = query.blocks[plan.name]
    arrays = stored.arrays
    memo = {} if memo is None else memo
    if plan.kind == "dense":
        _add_side(out, stored, f"{plan.name}/values", block.values[0], stored.bases.get((plan.name, "values")), weight, memo)
    elif plan.kind == "factored":
        if not _add_factored(plan, plans, stored, query, modules, out, weight, memo):
            part = _factored_estimate(plan, plans, stored, block, modules)
            out.value.add_(part.value, alpha=weight)
            out.error.add_(part.error, alpha=weight)
    elif plan.kind == "rows":
        part = _rows_estimate(plan, stored, block)
        out.value.add_(part.value, alpha=weight)
        out.error.add_(part.error, alpha=weight)
    else:
        out.error.add_(arrays[f"{plan.name}/opaque/norm"], alpha=weight * query_norm)


def _add_side(out: _Estimate, stored: Stored, prefix: str, query: torch.Tensor, basis: Basis | None, weight: float,
              memo: dict) -> None:  # fmt: skip
    """``out`` (shaped as the side's rows [and examples]) += ``weight`` times <x_row, query> and its bound
    for one side, stored whole (as one array, or parameter by parameter sharing the row scale) or
    sketched (products already in ``memo`` for the same query are not computed again)."""
    arrays = stored.arrays
    rho_q = 0.0
    if basis is not None:
        query, rho_q = stored.sketch_query(_side_key(prefix), query)
    scale = arrays[f"{prefix}/scale"]
    parts, start, i = [], 0, 0
    if f"{prefix}/values" in arrays:
        parts.append((f"{prefix}/values", query))
    while f"{prefix}/values{i}" in arrays:  # parameter by parameter (a whole dense block): the parts share the row scale
        size = arrays[f"{prefix}/values{i}"].shape[-1]
        parts.append((f"{prefix}/values{i}", query[start : start + size]))
        start, i = start + size, i + 1
    done = memo.pop(prefix, None)
    if done is not None and torch.equal(done[0], query):  # the whole block's product, computed with a derived side's
        products = [done[1]]
    else:
        products = [_product(stored, key, q) for key, q in parts]
    for product, q_scale in products:
        if product is not None:
            out.value.addcmul_(product, scale.view(-1, *([1] * (product.dim() - 1))), value=weight * q_scale)
    out.error.add_(arrays[f"{prefix}/norm"], alpha=weight * EPS * float(query.double().norm()))
    if basis is not None:
        out.error.add_(arrays[f"{prefix}/rho"], alpha=weight * rho_q)


def _add_factored(plan: BlockPlan, plans: dict[str, BlockPlan], stored: Stored, query: PerExampleGradients,
                  modules: dict[str, nn.Module], out: _Estimate, weight: float, memo: dict) -> bool:  # fmt: skip
    """:func:`_factored_estimate` in a few passes over the rows for the common case (ConvE's Linear: one
    example on both sides, the output side whole), added into ``out``; False where it does not apply.

    With the input side's estimate A +- e_A and the output side's O = q * P (P: the row's float16 product
    with the query scaled by 1 / q, times the row's scale) +- c * norm (c = EPS |query|), as in :func:`_combine`:
    O A +- (|O| e_A + |A| c norm + c norm e_A) = q P A +- (q |P| e_A + c norm (|A| + e_A)).
    A derived output side's rows are the batch norm's bias part: its product with the batch norm's own
    query is computed in the same pass and left in ``memo`` for :func:`_add_side`."""
    block = query.blocks[plan.name]
    if block.a.shape[1] != 1 or plan.examples != 1 or plan.sketch[0]:
        return False
    inp = _input_side(plan, stored, block.a[0, 0])
    a, a_error = inp.value.reshape(-1), inp.error.reshape(-1)
    key, scale, norm, out_query = _out_side_arrays(plan, stored, block.delta[0, 0], modules)
    if plan.derived is not None:
        # the batch norm's parts side by side (stored apart, or whole where it has one parameter): its own
        # product and the derived side's (its bias part only) in one pass; its scan takes its own from ``memo``
        dense = plans[plan.derived[0]]
        prefix, sizes, part = f"{dense.name}/values", dense.sizes, plan.derived[1]
        split = f"{prefix}/values0" in stored.arrays
        keys = tuple(f"{prefix}/values{i}" for i in range(len(sizes))) if split else (f"{prefix}/values",)
        start = sum(sizes[:part])
        padded = out_query.new_zeros(sum(sizes))
        padded[start : start + sizes[part]] = out_query
        dense_query = query.blocks[dense.name].values[0]
        products = _products(stored, keys, [padded, dense_query])
        memo[prefix] = (dense_query, products[1])
    else:
        products = _products(stored, key, [out_query])
    product, q_scale = products[0]
    if product is not None:
        p = torch.mul(product.reshape(-1), scale)  # float64
        out.value.addcmul_(p, a, value=weight * q_scale)
        out.error.addcmul_(p.abs_(), a_error, value=weight * q_scale)
    out.error.addcmul_(a.abs_().add_(a_error), norm, value=weight * EPS * float(out_query.double().norm()))
    return True


def _out_side_arrays(plan: BlockPlan, stored: Stored, delta_q: torch.Tensor, modules: dict[str, nn.Module]):
    """A whole output side's stored values (the array's key), row scale and row norm (bounding the values'
    norm), and the query over them: the block's own, or (derived) the batch norm's bias part, queried by
    ``s * delta_q`` (<s * bias_grad_row, delta_q> = <bias_grad_row, s * delta_q>; the whole row's norm
    bounds the part's: a little looser, never wrong)."""
    if plan.derived is None:
        prefix = f"{plan.name}/out"
        return f"{prefix}/values", stored.arrays[f"{prefix}/scale"], stored.arrays[f"{prefix}/norm"].reshape(-1), delta_q
    dense_name, part = plan.derived
    module = modules[dense_name]  # the batch norm, or (a search shard's query) its scale
    query = (module if torch.is_tensor(module) else batch_norm_scale(module)).to(delta_q) * delta_q
    prefix = f"{dense_name}/values"
    key = f"{prefix}/values{part}" if f"{prefix}/values{part}" in stored.arrays else f"{prefix}/values"
    return key, stored.arrays[f"{prefix}/scale"], stored.arrays[f"{prefix}/norm"], query


def _factored_estimate(plan: BlockPlan, plans: dict[str, BlockPlan], stored: Stored, block: FactoredBlock,
                       modules: dict[str, nn.Module]) -> _Estimate:  # fmt: skip
    """Estimate and bound of a factored block's <g_row, g_query>, summed over the query's examples (positions)."""
    n = stored.num_rows
    total: _Estimate | None = None
    for j in range(block.a.shape[1]):
        part = _combine(_out_side(plan, plans, stored, block.delta[0, j], modules), _input_side(plan, stored, block.a[0, j]))
        if total is None:
            total = part
        else:
            total.value.add_(part.value)
            total.error.add_(part.error)
    if total is None:
        zeros = torch.zeros(n, dtype=torch.float64, device=stored.device)
        return _Estimate(zeros, zeros.clone())
    return total


def _input_side(plan: BlockPlan, stored: Stored, a_q: torch.Tensor) -> _Estimate:
    """A factored block's input side: <a_row, a_q> and its bound for every stored row [and example]; a
    grouped side's (stored once per (head, relation) pair) taken to each row."""
    inp = _side_estimate(stored, f"{plan.name}/in", a_q, stored.bases.get((plan.name, "in")))
    if plan.grouped:
        group = stored.groups[plan.name]
        inp = _Estimate(torch.take(inp.value, group), torch.take(inp.error, group))  # take: the fastest gather here
    return inp


def _out_side(plan: BlockPlan, plans: dict[str, BlockPlan], stored: Stored, delta_q: torch.Tensor,
              modules: dict[str, nn.Module]) -> _Estimate:  # fmt: skip
    if plan.derived is None:
        return _side_estimate(stored, f"{plan.name}/out", delta_q, stored.bases.get((plan.name, "out")))
    key, scale, norm, query = _out_side_arrays(plan, stored, delta_q, modules)
    return _Estimate(_mv(stored, key, scale, query), EPS * norm.double() * float(query.double().norm()))


def _rows_estimate(plan: BlockPlan, stored: Stored, block: RowsBlock) -> _Estimate:
    """Exact up to float16 rounding: only rows that looked up a table row the query looked up meet it."""
    n = stored.num_rows
    estimate = torch.zeros(n, dtype=torch.float64, device=stored.device)
    error = torch.zeros(n, dtype=torch.float64, device=stored.device)
    starts, rows, slots = stored.rows_postings(plan.name)
    values = stored.arrays[f"{plan.name}/rows/values"]
    scale = stored.arrays[f"{plan.name}/rows/scale"].double()
    norm = stored.arrays[f"{plan.name}/rows/norm"].double()
    query_norm = float(block.squared_norms()[0].double().clamp_min(0).sqrt())
    ids = block.ids[0].tolist()
    for table_row in sorted(set(ids)):
        if table_row >= len(starts) - 1 or starts[table_row + 1] == starts[table_row]:
            continue
        lo, hi = int(starts[table_row]), int(starts[table_row + 1])
        q = sum(block.rows[0, k] for k, i in enumerate(ids) if i == table_row).double().to(values.device)
        z, k = rows[lo:hi], slots[lo:hi]
        estimate.index_add_(0, z, (values[z, k].double() @ q) * scale[z])
        touched = torch.unique(z)
        error[touched] = EPS * norm[touched] * query_norm
    return _Estimate(estimate, error)


def checkpoint_estimate(plans: list[BlockPlan], stored: Stored, query: PerExampleGradients, modules: dict[str, nn.Module],
                        out: _Estimate | None = None, weight: float = 1.0) -> _Estimate:  # fmt: skip
    """Sum over blocks of :func:`scan_block`: one query, one checkpoint, every row; added, times ``weight``,
    into ``out`` (float64 (rows,) each) where given, else into zeros of its own; returns the sums."""
    query_norm = float(query.squared_norms()[0].double().clamp_min(0).sqrt())
    by_name = {p.name: p for p in plans}
    if out is None:
        out = _Estimate(torch.zeros(stored.num_rows, dtype=torch.float64, device=stored.device),
                        torch.zeros(stored.num_rows, dtype=torch.float64, device=stored.device))  # fmt: skip
    memo: dict = {}
    for plan in plans:
        scan_block(plan, by_name, stored, query, modules, query_norm, out, weight, memo)
    stored.scans += 1
    return out


# ------------------------------------------------------------------------------------------------
# Refining: tighter bounds for some rows, from their input sides recomputed exactly


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


def refined_estimate(plans: list[BlockPlan], stored: Stored, query: PerExampleGradients, modules: dict[str, nn.Module],
                     rows: torch.Tensor, inputs: dict[str, LinearInputs]) -> _Estimate:  # fmt: skip
    r"""Like :func:`checkpoint_estimate` for the stored ``rows`` only, with the Linear layers' input sides
    given exactly (``inputs``: block name -> the inputs of the rows' examples, float32, without the bias
    column, which a block's plan adds where its size says so): their products then carry only the output
    side's float16 error, :math:`|X_2|\,e_1`, instead of the sketch's residual bound. Needs
    :func:`refinable` plans."""
    rows = rows.to(stored.device)
    sub = Stored({k: v.index_select(0, rows) for k, v in stored.arrays.items() if not _input_key(k, plans)},
                 {}, {}, len(rows))  # fmt: skip
    by_name = {p.name: p for p in plans}
    total = torch.zeros(len(rows), dtype=torch.float64, device=stored.device)
    error = torch.zeros(len(rows), dtype=torch.float64, device=stored.device)
    for plan in plans:
        block = query.blocks[plan.name]
        if plan.kind == "dense":
            part = _side_estimate(sub, f"{plan.name}/values", block.values[0], None)
        else:
            # in float32, as the exact rescoring computes it (its rounding is within EPS_RECOMPUTED); per
            # row of the inputs as computed (once per (head, relation) pair), then for each example
            given = inputs[plan.name]
            a = given.values.to(stored.device)
            bias = plan.sizes[1] == a.shape[1] + 1  # a bias column of ones: +1 to each norm^2, +a_q[-1] to each product
            a_norm = given.rowwise(torch.linalg.vector_norm(a, dim=-1).double().pow(2).add_(float(bias)).sqrt_())
            part = _Estimate(torch.zeros_like(total), torch.zeros_like(total))
            for j in range(block.a.shape[1]):  # the query's examples (positions)
                out = _out_side(plan, by_name, sub, block.delta[0, j], modules)
                a_q = block.a[0, j].to(a)
                product = (a @ a_q[: a.shape[1]]).double()
                if bias:
                    product += float(a_q[-1])
                inp = _Estimate(given.rowwise(product), a_norm * (EPS_RECOMPUTED * float(a_q.double().norm())))
                both = _combine(out, inp)
                part.value.add_(both.value)
                part.error.add_(both.error)
        total += part.value
        error += part.error
    return _Estimate(total, error)


def _input_key(key: str, plans: list[BlockPlan]) -> bool:
    """An array of a Linear's stored input side (per row or per group; a refinement recomputes it)."""
    return any(p.kind == "factored" and key.startswith(f"{p.name}/in/") for p in plans)
