"""The scan's matrix products, one test triple at a time against many: what batching test triples can buy.

Run from the repository root::

    python benchmarks/scan_kernels.py                 # rows 100,000 and 1,000,000, width 400
    python benchmarks/scan_kernels.py --rows 20000 --columns 1 8 --repeats 1   # a quick look

The scan reads every stored row once per test triple and checkpoint: a float16 array of (rows, width)
times one query vector (``torch.mv``, or fbgemm's float16 GEMM once the index is packed). A batch of
test triples could read the rows once for many queries. For each row count and each number of queries
(columns) M, each kernel computes the (rows, M) products of the same random float16 rows and queries,
and the median of ``--repeats`` timings per column is reported, side by side in one run:

- ``mv_fp16``: M separate ``torch.mv`` calls on the float16 rows (the unpacked scan today);
- ``fbgemm_fp16``: fbgemm's float16 GEMM on the rows packed once (the packed scan; packing untimed);
- ``mm_fp16``: ``Q @ rows.T`` in float16 (no copy);
- ``batch_products``: the batched scan's product: float16 rows converted to float32 4,096 at a time, float32
  products rounded to float16 (the same numbers as ``mm_fp16``, from float32 arithmetic);
- ``mm_fp32``: ``rows_fp32 @ Q`` on a float32 copy of the rows (twice the bytes);
- ``mm_bf16``: ``rows_bf16 @ Q`` on a bfloat16 copy (the same bytes as float16, a coarser mantissa).

Also recorded: the largest deviation of each kernel's products from float64 products of the same
float16 rows, relative to the largest |product| (what the scan's bounds must cover), and the peak
resident memory. Writes ``benchmarks/results/scan_kernels.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QuietGuard, peak_rss_mb, write_results  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tracin_index.storage.arrays import _fbgemm_available, _Packed, batch_products  # noqa: E402


def kernels(rows16: torch.Tensor):
    """name -> (prepare, run(Q (M, width) float32) -> (M, rows) float32)."""
    found = {"mv_fp16": lambda q: torch.stack([torch.mv(rows16, c.half()) for c in q]).float()}
    if _fbgemm_available():
        packed = _Packed(rows16)
        found["fbgemm_fp16"] = packed.products
    found["mm_fp16"] = lambda q: (q.half() @ rows16.T).float()  # one float16 matrix product, no copy
    found["batch_products"] = lambda q: batch_products(rows16, q).float()  # the batched scan's (FactorArrays.products)
    rows32 = rows16.float()
    found["mm_fp32"] = lambda q: (rows32 @ q.T).T
    rows_bf16 = rows16.bfloat16()
    found["mm_bf16"] = lambda q: (rows_bf16 @ q.T.bfloat16()).T.float()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--width", type=int, default=400, help="numbers per stored row (ConvE's batch norm: 400)")
    parser.add_argument("--columns", type=int, nargs="+", default=[1, 8, 64], help="test triples per product")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-wait", type=float, default=30.0, help="seconds to wait for a quiet machine per timing")
    parser.add_argument("--name", default="scan_kernels")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    generator = torch.Generator().manual_seed(0)
    results = []
    for n in args.rows:
        rows16 = (torch.randn(n, args.width, generator=generator) / args.width**0.5).half()
        found = kernels(rows16)
        exact_rows = rows16.double()
        for m in args.columns:
            queries = torch.rand(m, args.width, generator=generator) * 2 - 1
            reference = (exact_rows @ queries.double().T).T
            scale = float(reference.abs().max())
            for name, run in found.items():
                run(queries)  # warm
                seconds = []
                for _ in range(args.repeats):
                    QuietGuard(0.3, args.max_wait, 0).wait()
                    start = time.perf_counter()
                    out = run(queries)
                    seconds.append(time.perf_counter() - start)
                deviation = float((out.double() - reference).abs().max()) / scale
                row = {"rows": n, "width": args.width, "columns": m, "kernel": name,
                       "ms_per_column": 1000 * statistics.median(seconds) / m,
                       "ms_per_column_all": [1000 * s / m for s in seconds],
                       "max_relative_deviation": deviation}  # fmt: skip
                results.append(row)
                print(f"rows {n:>9,}  columns {m:>3}  {name:<12} {row['ms_per_column']:8.2f} ms per column  "
                      f"deviation {deviation:.1e}", flush=True)
        del found, rows16, exact_rows
    baseline = {(r["rows"], r["columns"]): r["ms_per_column"] for r in results if r["kernel"] == "mv_fp16"}
    for r in results:
        r["speedup_vs_mv_fp16_one_column"] = baseline.get((r["rows"], 1), float("nan")) / r["ms_per_column"]
    path = write_results(args.name, {"settings": vars(args), "results": results, "peak_rss_mb": peak_rss_mb()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
