r"""Estimates and certain error bounds of every stored row's influence on a test triple, from one pass
over a checkpoint's stored arrays.

For a test triple q and every stored row z the scan yields an estimate E(z, q) and a bound B(z, q)
with :math:`|\langle g(z), g(q)\rangle - E(z, q)| \le B(z, q)`: float16 rounding (:data:`~tracin_index.storage.encoding.EPS`),
a sketch's residual (:mod:`tracin_index.storage.sketch`), and for a factored block the product of two
sides' estimates, :math:`|X_1 X_2 - E_1 E_2| \le |E_1| e_2 + |E_2| e_1 + e_1 e_2`. Summed over blocks,
weighted by each checkpoint's learning rate and folded from examples to training triples, they bound
the influence (:func:`checkpoint_estimates` for a batch of test triples, :func:`add_weighted`).
"""

from __future__ import annotations

import contextvars
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

from ..gradients.blocks import FactoredBlock, PerExampleGradients, RowsBlock, inverse_norms
from ..storage.arrays import FactorArrays
from ..storage.encoding import EPS
from ..storage.plans import BlockPlan, batch_norm_scale
from ..storage.sketch import Basis

#: Test triples scanned together at most (each checkpoint's stored arrays read once for them;
#: ``benchmarks/scan_kernels.py`` measures the products, ``benchmarks/batch_query.py`` the queries).
SCAN_BATCH = 32


@dataclass
class Estimate:
    value: torch.Tensor  # float64 (n,) or (n, examples)
    error: torch.Tensor  # float64, the same shape


def _mv(stored: FactorArrays, key: str, scale: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
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


def side_estimate(stored: FactorArrays, prefix: str, query: torch.Tensor, basis: Basis | None) -> Estimate:
    """<x_row, query> for every stored row [and example] of one side (query: a vector of the side's full
    size): :func:`_add_side` into zeros."""
    shape = stored.arrays[f"{prefix}/norm"].shape  # the rows [and examples]
    out = Estimate(torch.zeros(shape, dtype=torch.float64, device=stored.device),
                    torch.zeros(shape, dtype=torch.float64, device=stored.device))  # fmt: skip
    _add_side(out, stored, prefix, query, basis, 1.0, {})
    return out


def combine(out: Estimate, inp: Estimate) -> Estimate:
    """Estimate and bound of sum over examples of X1 * X2 from those of X1 (out side) and X2 (in side):
    |X1 X2 - E1 E2| <= |E1| e2 + |E2| e1 + e1 e2."""
    v1, e1, v2, e2 = out.value, out.error, inp.value, inp.error
    if v1.shape == v2.shape and v1.dim() == 1:  # one example per row: in place, fewer temporaries
        return Estimate(v1 * v2, v1.abs().mul_(e2).addcmul_(v2.abs(), e1).addcmul_(e1, e2))
    if v1.dim() < v2.dim():
        v1, e1 = v1[:, None], e1[:, None]
    elif v2.dim() < v1.dim():
        v2, e2 = v2[:, None], e2[:, None]
    value, error = v1 * v2, v1.abs() * e2 + v2.abs() * e1 + e1 * e2
    if value.dim() == 2:
        value, error = value.sum(-1), error.sum(-1)
    return Estimate(value, error)


class ProductBatch:
    """The products a batch of test triples' scans ask of one checkpoint's arrays, computed together.

    A scan's requests (which arrays, which query vectors) depend on the test triple and on the arrays'
    layout, never on the products' values: so the batch records them by scanning a one-row copy of the
    arrays (:meth:`FactorArrays.first_row`), computes each array's products for all of them in one matrix
    product (:meth:`compute`), and serves them, in the order asked, to the real scans that follow. The
    queries' sketches (:meth:`FactorArrays.sketch_query`), which the products' queries are made of, are
    recorded first in the same way (a recording with placeholder sketches, whose products are not kept) and
    computed together too (:meth:`compute_sketches`)."""

    def __init__(self, source: FactorArrays):
        self.source = source
        self.recording = True
        self.sketching = True  # recording the sketches asked for: placeholders given, products not kept
        self.asked: dict[str | tuple[str, ...], list[torch.Tensor]] = {}
        self.ready: dict[str | tuple[str, ...], deque] = {}
        self.sketches_asked: list[tuple[tuple[str, str], torch.Tensor]] = []
        self.sketches: deque = deque()
        self.served: deque = deque()

    def ask(self, key: str | tuple[str, ...], query: torch.Tensor) -> None:
        if not self.sketching:
            self.asked.setdefault(key, []).append(query)

    def compute_sketches(self) -> None:
        by_side: dict[tuple[str, str], list[int]] = {}
        for i, (side, _) in enumerate(self.sketches_asked):
            by_side.setdefault(side, []).append(i)
        found: dict[int, tuple[torch.Tensor, float]] = {}
        for side, positions in by_side.items():
            found.update(zip(positions, self.source.sketch_queries(side, [self.sketches_asked[i][1] for i in positions])))
        self.sketches = deque(found[i] for i in range(len(self.sketches_asked)))
        self.sketches_asked, self.sketching = [], False

    def compute(self) -> None:
        for key, queries in self.asked.items():
            products = self.source.products(key, torch.stack(queries))
            self.ready[key] = deque(zip(queries, products))
        self.asked, self.recording = {}, False

    def take(self, key: str | tuple[str, ...], query: torch.Tensor) -> torch.Tensor:
        asked, product = self.ready[key].popleft()
        if not torch.equal(asked, query):
            raise RuntimeError(f"a batched scan asked for other products of {key} than it recorded")
        return product

    def sketch(self, side: tuple[str, str], query: torch.Tensor) -> tuple[torch.Tensor, float]:
        if self.sketching:
            self.sketches_asked.append((side, query))
            return torch.zeros(self.source.bases[side].dim, device=query.device), 0.0
        if self.recording:
            self.served.append(self.sketches.popleft())
            return self.served[-1]
        return self.served.popleft()


#: The batch the scans of this thread take their products from (None: each computes its own).
_BATCH: contextvars.ContextVar[ProductBatch | None] = contextvars.ContextVar("product_batch", default=None)


def _sketch_query(stored: FactorArrays, side: tuple[str, str], query: torch.Tensor) -> tuple[torch.Tensor, float]:
    batch = _BATCH.get()
    return stored.sketch_query(side, query) if batch is None else batch.sketch(side, query)


def _product(stored: FactorArrays, key: str, query: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """The rows of array ``key`` times ``query / q`` (:meth:`FactorArrays.products`), and q = max |query| (None and
    0.0 for a zero query)."""
    return _products(stored, key, [query])[0]


def _products(stored: FactorArrays, key: str | tuple[str, ...], queries: list[torch.Tensor]) -> list[tuple[torch.Tensor | None, float]]:
    """:func:`_product` for several queries over the same rows, in one pass where the array is packed."""
    scales = [float(q.abs().max()) if q.numel() else 0.0 for q in queries]
    live = [i for i, q_scale in enumerate(scales) if q_scale != 0.0]
    found: dict[int, torch.Tensor] = {}
    batch = _BATCH.get()
    if live and batch is not None:  # a batched scan: recorded on the one-row copy, served to the real scan
        for i in live:
            query = queries[i].reshape(-1) / scales[i]
            if batch.recording:
                batch.ask(key, query)
            else:
                found[i] = batch.take(key, query)
    elif live:
        products = stored.products(key, torch.stack([queries[i].reshape(-1) / scales[i] for i in live]))
        found = {i: products[j] for j, i in enumerate(live)}
    return [(found.get(i), scales[i]) for i in range(len(queries))]


def scan_block(plan: BlockPlan, plans: dict[str, BlockPlan], stored: FactorArrays, query: PerExampleGradients,
               modules: dict[str, nn.Module], query_norm: float, out: Estimate, weight: float = 1.0,
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


def _add_side(out: Estimate, stored: FactorArrays, prefix: str, query: torch.Tensor, basis: Basis | None, weight: float,
              memo: dict) -> None:  # fmt: skip
    """``out`` (shaped as the side's rows [and examples]) += ``weight`` times <x_row, query> and its bound
    for one side, stored whole (as one array, or parameter by parameter sharing the row scale) or
    sketched (products already in ``memo`` for the same query are not computed again)."""
    arrays = stored.arrays
    rho_q = 0.0
    if basis is not None:
        query, rho_q = _sketch_query(stored, _side_key(prefix), query)
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
            out.value.addcmul_(product.double(), scale.view(-1, *([1] * (product.dim() - 1))), value=weight * q_scale)
    out.error.add_(arrays[f"{prefix}/norm"], alpha=weight * EPS * float(query.double().norm()))
    if basis is not None:
        out.error.add_(arrays[f"{prefix}/rho"], alpha=weight * rho_q)


def _add_factored(plan: BlockPlan, plans: dict[str, BlockPlan], stored: FactorArrays, query: PerExampleGradients,
                  modules: dict[str, nn.Module], out: Estimate, weight: float, memo: dict) -> bool:  # fmt: skip
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
        p = product.reshape(-1).double().mul_(scale)  # converted once: a mixed-precision product costs 3x a float64 one
        out.value.addcmul_(p, a, value=weight * q_scale)
        out.error.addcmul_(p.abs_(), a_error, value=weight * q_scale)
    out.error.addcmul_(a.abs_().add_(a_error), norm, value=weight * EPS * float(out_query.double().norm()))
    return True


def _out_side_arrays(plan: BlockPlan, stored: FactorArrays, delta_q: torch.Tensor, modules: dict[str, nn.Module]):
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


def _factored_estimate(plan: BlockPlan, plans: dict[str, BlockPlan], stored: FactorArrays, block: FactoredBlock,
                       modules: dict[str, nn.Module]) -> Estimate:  # fmt: skip
    """Estimate and bound of a factored block's <g_row, g_query>, summed over the query's examples (positions)."""
    n = stored.num_rows
    total: Estimate | None = None
    for j in range(block.a.shape[1]):
        part = combine(out_side(plan, plans, stored, block.delta[0, j], modules), _input_side(plan, stored, block.a[0, j]))
        if total is None:
            total = part
        else:
            total.value.add_(part.value)
            total.error.add_(part.error)
    if total is None:
        zeros = torch.zeros(n, dtype=torch.float64, device=stored.device)
        return Estimate(zeros, zeros.clone())
    return total


def _input_side(plan: BlockPlan, stored: FactorArrays, a_q: torch.Tensor) -> Estimate:
    """A factored block's input side: <a_row, a_q> and its bound for every stored row [and example]; a
    grouped side's (stored once per (head, relation) pair) taken to each row."""
    inp = side_estimate(stored, f"{plan.name}/in", a_q, stored.bases.get((plan.name, "in")))
    if plan.grouped:
        group = stored.groups[plan.name]
        # index_select of the flat estimates: 2.4x faster than torch.take here (1M rows from 355k groups)
        inp = Estimate(inp.value.reshape(-1).index_select(0, group), inp.error.reshape(-1).index_select(0, group))
    return inp


def out_side(plan: BlockPlan, plans: dict[str, BlockPlan], stored: FactorArrays, delta_q: torch.Tensor,
              modules: dict[str, nn.Module]) -> Estimate:  # fmt: skip
    if plan.derived is None:
        return side_estimate(stored, f"{plan.name}/out", delta_q, stored.bases.get((plan.name, "out")))
    key, scale, norm, query = _out_side_arrays(plan, stored, delta_q, modules)
    return Estimate(_mv(stored, key, scale, query), EPS * norm.double() * float(query.double().norm()))


def _rows_estimate(plan: BlockPlan, stored: FactorArrays, block: RowsBlock) -> Estimate:
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
    return Estimate(estimate, error)


def checkpoint_estimate(plans: list[BlockPlan], stored: FactorArrays, query: PerExampleGradients, modules: dict[str, nn.Module],
                        out: Estimate | None = None, weight: float = 1.0) -> Estimate:  # fmt: skip
    """Sum over blocks of :func:`scan_block`: one query, one checkpoint, every row; added, times ``weight``,
    into ``out`` (float64 (rows,) each) where given, else into zeros of its own; returns the sums."""
    query_norm = float(query.squared_norms()[0].double().clamp_min(0).sqrt())
    by_name = {p.name: p for p in plans}
    if out is None:
        out = Estimate(torch.zeros(stored.num_rows, dtype=torch.float64, device=stored.device),
                        torch.zeros(stored.num_rows, dtype=torch.float64, device=stored.device))  # fmt: skip
    memo: dict = {}
    for plan in plans:
        scan_block(plan, by_name, stored, query, modules, query_norm, out, weight, memo)
    stored.scans += 1
    return out


def checkpoint_estimates(plans: list[BlockPlan], stored: FactorArrays, queries: list[PerExampleGradients],
                         modules: dict[str, nn.Module], outs: list[Estimate] | None = None,
                         weights: list[float] | None = None) -> list[Estimate]:  # fmt: skip
    """:func:`checkpoint_estimate` of several test triples (one each in ``queries``; added, times ``weights``,
    into ``outs`` where given), their products over each stored array computed in one matrix product
    (:class:`ProductBatch`): the rows are read once for the batch, not once per test triple."""
    outs = outs or [None] * len(queries)
    weights = weights or [1.0] * len(queries)
    if len(queries) <= 1:
        return [checkpoint_estimate(plans, stored, q, modules, o, w) for q, o, w in zip(queries, outs, weights)]
    batch = ProductBatch(stored)
    token = _BATCH.set(batch)
    try:
        first = stored.first_row()
        for query in queries:  # the sketches the scans ask for
            checkpoint_estimate(plans, first, query, modules)
        batch.compute_sketches()
        for query in queries:  # the products, of queries made with those sketches
            checkpoint_estimate(plans, first, query, modules)
        batch.compute()
        return [checkpoint_estimate(plans, stored, q, modules, o, w) for q, o, w in zip(queries, outs, weights)]
    finally:
        _BATCH.reset(token)


def fold(per_row: torch.Tensor, per_fact: int) -> torch.Tensor:
    """Per stored row (example) -> per training triple: the sum of its ``per_fact`` adjacent rows."""
    return per_row if per_fact == 1 else per_row.view(-1, per_fact).sum(1)


def add_weighted(value: torch.Tensor, error: torch.Tensor, part, weight, per_fact: int) -> None:
    """``value`` and ``error`` (per training triple) += ``weight`` times a checkpoint's estimate and bound
    (per stored row, folded); ``weight``: the learning rate, or (the cosine form) a tensor per triple."""
    if torch.is_tensor(weight):
        value.addcmul_(weight, fold(part.value, per_fact))
        error.addcmul_(weight, fold(part.error, per_fact))
    else:
        value.add_(fold(part.value, per_fact), alpha=weight)
        error.add_(fold(part.error, per_fact), alpha=weight)


def checkpoint_weight(learning_rate: float, query: PerExampleGradients, inverse_norms_of_rows: torch.Tensor | None):
    """A checkpoint's weight in the sum over checkpoints: its learning rate, or for the cosine form
    (``inverse_norms_of_rows``: 1 / ||g(z)|| of the scanned training triples at this checkpoint) the learning
    rate times 1 / ||g(q)|| times 1 / ||g(z)||, a positive factor per triple that scales an estimate and
    its bound alike."""
    if inverse_norms_of_rows is None:
        return learning_rate
    return learning_rate * float(inverse_norms(query.squared_norms())[0]) * inverse_norms_of_rows
