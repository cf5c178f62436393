r"""One checkpoint's stored arrays in memory (:class:`FactorArrays`), and their products with queries.

The scan (:mod:`tracin_index.search.scan`) reads every stored row once per test triple: it is bound by
memory bandwidth. Large float16 arrays can be packed for fbgemm's float16 GEMM (float16 rows, float32
query and sums), faster to scan than torch's float16 mat-vec on x86 CPUs but a second copy in memory
and a one-off cost of packing, so it is done only once an index has been queried often enough
(``pack_after``; ``benchmarks/scale.py`` measures both).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

import torch

from ..errors import TracInWarning
from ..machine import available_memory
from .sketch import Basis

#: A stored array of at least PACK_MIN_ROWS rows and PACK_MIN_WIDTH numbers per row is scanned by fbgemm's
#: float16 GEMM once its checkpoint has been scanned ``pack_after`` times (packing costs more than a
#: one-off query saves). The packed copy is held besides the stored arrays (candidates' rows are gathered
#: from those), its rows padded to a multiple of PACK_PAD numbers by fbgemm: narrow arrays stay unpacked
#: (a row much narrower than PACK_PAD would take several times its bytes packed).
PACK_MIN_ROWS = 4096
PACK_MIN_WIDTH = 128
PACK_PAD = 512
#: ... packed in blocks of this many rows (packing goes through a float32 copy of each block).
PACK_ROWS = 32768
#: An array is packed only while its packed copy leaves this share of the memory available.
PACK_SPARE = 0.25
#: Queries of one product call answered by mat-vec products (one test triple asks for at most two at once:
#: its own and a derived side's); more, a batch of test triples', by one matrix product.
MV_QUERIES = 2
#: A batch's matrix product on the CPU converts this many float16 rows at a time to float32 (exactly) and
#: multiplies in float32: as fast as float16's where the CPU computes in float16, several times faster where
#: it does not (``benchmarks/scan_kernels.py``); the float32 copy is one block at a time.
PRODUCT_ROWS = 4096


def batch_products(rows: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """(M, N) float16 products of float16 ``rows`` (N, d) with ``queries`` (M, d) rounded to float16, as one
    float16 matrix product gives them (and a test triple's mat-vec products: the same answers and counts,
    asked alone or in a batch); on the CPU computed in float32, :data:`PRODUCT_ROWS` rows at a time."""
    q = queries.to(device=rows.device, dtype=rows.dtype)
    if rows.device.type != "cpu":
        return q @ rows.T
    q = q.float()
    out = torch.empty(len(q), len(rows), dtype=rows.dtype)
    for start in range(0, len(rows), PRODUCT_ROWS):
        out[:, start : start + PRODUCT_ROWS] = q @ rows[start : start + PRODUCT_ROWS].float().T
    return out


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
class FactorArrays:
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
    #: the sketches of queries (:meth:`sketch_query`) by side and query, where the same checkpoint's rows are
    #: scanned in several ranges for the same queries (an index scanned in passes): computed once for all ranges
    sketches: dict | None = None
    #: arrays stored parameter by parameter, joined side by side for a batch's products (:meth:`_joined`)
    joined: dict[str, torch.Tensor] = field(default_factory=dict)

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
        few = len(queries) <= MV_QUERIES  # a batch's matrix product is faster unpacked: it neither packs nor uses a pack
        if (few and packed is None and len(flats[0]) >= PACK_MIN_ROWS and width >= PACK_MIN_WIDTH
                and flats[0].dtype == torch.float16 and self._packing(flats[0], len(flats[0]), width)):  # fmt: skip
            packed = self.packed["+".join(keys)] = _Packed(flats[0] if len(flats) == 1 else self._joined(keys))
        if not few and len(flats) > 1 and flats[0].dtype == torch.float16:  # a batch: one matrix product over the parts side by side
            flats = [self._joined(keys)]
        if packed is not None and few:
            out = packed.products(queries.float().cpu())
        elif len(flats) == 1:
            q = queries.to(device=flats[0].device, dtype=flats[0].dtype)
            # a test triple's own queries (at most MV_QUERIES): mat-vec products; a batch of test triples':
            # one float16 matrix product, which reads the rows once (benchmarks/scan_kernels.py)
            if len(q) <= MV_QUERIES:
                out = torch.stack([torch.mv(flats[0], q[i]) for i in range(len(q))])
            else:
                out = batch_products(flats[0], queries)  # (queries, rows): each query's products contiguous
        else:  # the parts' float16 products summed in float32 (exactly: a sum in float16 would round)
            q = queries.to(device=flats[0].device, dtype=flats[0].dtype)
            out = torch.zeros(len(q), len(flats[0]), dtype=torch.float32, device=flats[0].device)
            start = 0
            for flat in flats:
                piece = q[:, start : start + flat.shape[1]]
                start += flat.shape[1]
                if len(q) > MV_QUERIES:
                    out.add_(piece @ flat.T)
                    continue
                for i in range(len(q)):
                    if bool(piece[i].any()):
                        out[i].add_(torch.mv(flat, piece[i]))
        return out.view(len(queries), *parts[0].shape[:-1])

    def _joined(self, keys: tuple[str, ...]) -> torch.Tensor:
        """The arrays ``keys`` (the same rows, parameter by parameter) side by side in one array, made once:
        each key's array becomes a view of its columns (no second copy is held). A batch's products over
        them are then one float16 matrix product, where the parts' float16 products summed in float32 cost a
        float32 (queries, rows) temporary and two conversions, more than the products themselves at 1M rows."""
        name = "+".join(keys)
        if name not in self.joined:
            flats = [self.arrays[key].reshape(-1, self.arrays[key].shape[-1]) for key in keys]
            whole = torch.cat(flats, 1)
            start = 0
            for key, flat in zip(keys, flats):
                shape = self.arrays[key].shape
                self.arrays[key] = whole[:, start : start + flat.shape[1]].view(*shape[:-1], flat.shape[1])
                start += flat.shape[1]
            self.joined[name] = whole
        return self.joined[name]

    def first_row(self) -> "FactorArrays":
        """The same arrays cut to their first row (and group), never packed: a scan of it asks for the same
        products, in the same order, as a scan of all rows (what a batched scan records first)."""
        arrays = {}
        for key, values in self.arrays.items():
            block, side = key.split("/")[:2]
            # a grouped input side's rows are groups: keep the first row's group (a search shard's first
            # row may belong to a group first seen before it)
            first = int(self.groups[block][0]) if side == "in" and block in self.groups else 0
            arrays[key] = values[first : first + 1]
        return FactorArrays(arrays, self.bases, {k: torch.zeros_like(v[:1]) for k, v in self.groups.items()}, 1)

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
        if self.sketches is None:
            return self._sketch_query(side, query)
        memo = (side, query.detach().cpu().numpy().tobytes())
        if memo not in self.sketches:
            self.sketches[memo] = self._sketch_query(side, query)
        return self.sketches[memo]

    def sketch_queries(self, side: tuple[str, str], queries: list[torch.Tensor]) -> list[tuple[torch.Tensor, float]]:
        """:meth:`sketch_query` of several queries: in one matrix product with the basis, but where its basis is
        packed for fbgemm (each query then as alone)."""
        if f"{side[0]}/{side[1]}/basis" in self.packed or len(queries) <= 1:
            return [self.sketch_query(side, q) for q in queries]
        memos = [(side, q.detach().cpu().numpy().tobytes()) for q in queries] if self.sketches is not None else None
        missing = [i for i in range(len(queries)) if memos is None or memos[i] not in self.sketches]
        found = dict(zip(missing, self.bases[side].sketch_queries(torch.stack([queries[i].reshape(-1) for i in missing])))) if missing else {}
        if memos is None:
            return [found[i] for i in range(len(queries))]
        self.sketches.update({memos[i]: found[i] for i in missing})
        return [self.sketches[m] for m in memos]

    def _sketch_query(self, side: tuple[str, str], query: torch.Tensor) -> tuple[torch.Tensor, float]:
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

    def to(self, device: torch.device | str) -> "FactorArrays":
        """The same arrays on ``device`` (a GPU scans them much faster); joined arrays stay joined (each moved
        once, its parts views of it)."""
        joined = {name: whole.to(device) for name, whole in self.joined.items()}
        arrays = {}
        for name, whole in joined.items():
            start = 0
            for key in name.split("+"):
                shape = self.arrays[key].shape
                arrays[key] = whole[:, start : start + shape[-1]].view(shape)
                start += shape[-1]
        arrays.update({k: v.to(device) for k, v in self.arrays.items() if k not in arrays})
        return FactorArrays(arrays,
                      {k: replace(b, matrix=b.matrix.to(device), gram_inverse=b.gram_inverse.to(device))
                       for k, b in self.bases.items()},
                      {k: v.to(device) for k, v in self.groups.items()}, self.num_rows, pack_after=self.pack_after,
                      joined=joined)  # fmt: skip

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
