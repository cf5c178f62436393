"""The build and the query on a Dask cluster against one process (issue [4/5] item 5).

(Not ``benchmarks/distributed.py``: Python puts a script's folder first on ``sys.path``, and a
script of that name would shadow Dask's ``distributed`` package.)

Run from the repository root (needs the ``[distributed]`` extra and the 100k planted run that
``benchmarks/scale.py`` trains and caches)::

    python benchmarks/dask_cluster.py --run /work/scratch/scale/100k/run --test /work/scratch/scale/100k/test.tsv

On this 2-core machine, with the same inputs and settings (``--shard-size`` training triples per task):

1. **Build, one process**: ``GradientIndex.build`` with torch on 1 thread (plan, bases and every
   task in this process); per-task compute times from the task function itself.
2. **Build, LocalCluster**: 2 worker processes of 1 thread each (``DaskRunner.local(2, threads=1)``),
   the building process on 1 thread too; the cluster's start-up is timed apart. Every shard's sha256
   must equal the single-process build's. ``dask_build_speedup_2_workers`` = (1) / (2).
3. **Overhead per task**: ``--noop-tasks`` tasks that do nothing, submitted and gathered as the
   build does (the scheduler's round trip per task, in ms), and the bytes moved per task (the
   pickled job and record; shard files are written by the workers straight into the index directory).
4. **Query over search shards**: the index opened in ``--search-shards`` (4) shards on the
   cluster against the same index in this process (torch on 2 threads), ``--queries`` test triples
   one at a time after a warm-up, p50 of each; ``sharded_query_overhead_ms`` = the difference.

Writes ``benchmarks/results/dask_cluster.json`` and the summary keys ``dask_build_speedup_2_workers``,
``dask_task_overhead_ms``, ``sharded_query_overhead_ms``. ``docs/distributed.md`` holds the cost model
for 20M triples x 10 checkpoints built from these figures.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PYSTOW_HOME", os.path.join(tempfile.gettempdir(), "pystow-bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_counters, foreign_cores, update_summary, write_results  # noqa: E402

NAME = "dask_cluster"


def _noop(i: int) -> int:
    return i


class TaskTimer:
    """Times every call of the task function in this process (the single-process build's tasks)."""

    def __init__(self):
        import tracin_index.build.task as tasks

        self.tasks, self.seconds = tasks, []
        self.original = tasks.TaskInputs.compute

    def __enter__(self):
        original = self.original

        def timed(worker, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(worker, *args, **kwargs)
            finally:
                self.seconds.append(time.perf_counter() - start)

        self.tasks.TaskInputs.compute = timed
        return self

    def __exit__(self, *exc):
        self.tasks.TaskInputs.compute = self.original


def digests(index) -> dict:
    return {s["file"]: s["sha256"] for s in index.manifest["shards"]}


def query_p50(index, test: np.ndarray, queries: int) -> tuple[float, list[float]]:
    index.query(test[:1], top_k=10)  # warm-up: loads what the first query needs
    times = []
    for i in range(1, queries + 1):
        start = time.perf_counter()
        index.query(test[i : i + 1], top_k=10)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="run directory (e.g. scale.py's 100k run)")
    parser.add_argument("--test", type=Path, required=True, help="test triples TSV (labels)")
    parser.add_argument("--shard-size", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--search-shards", type=int, default=4)
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--noop-tasks", type=int, default=300)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tracin-distributed")
    parser.add_argument("--no-summary", action="store_true")
    args = parser.parse_args()

    from tracin_index.build.runners import DaskRunner
    from tracin_index.build.task import BuildTask
    from tracin_index.index import GradientIndex
    from tracin_index.kg.triples import read_labeled_triples
    from tracin_index.storage.layout import ShardFile

    args.work.mkdir(parents=True, exist_ok=True)
    counters = cpu_counters()
    started = time.perf_counter()
    torch.set_num_threads(1)

    single_dir, dask_dir = args.work / "single", args.work / "dask"
    for d in (single_dir, dask_dir):
        if d.exists():
            shutil.rmtree(d)
    with TaskTimer() as timer:
        t0 = time.perf_counter()
        single = GradientIndex.build(single_dir, model_path=args.run, shard_size=args.shard_size, device="cpu")
        single_s = time.perf_counter() - t0
    task_seconds = timer.seconds
    print(f"single process, 1 thread: {single_s:.1f} s, {len(task_seconds)} tasks, {sum(task_seconds):.1f} s in tasks", flush=True)

    t0 = time.perf_counter()
    runner = DaskRunner.local(args.workers, threads=1)
    cluster_start_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        clustered = GradientIndex.build(dask_dir, model_path=args.run, shard_size=args.shard_size, device="cpu",
                                        runner=runner, index_shards=args.search_shards)  # fmt: skip
        dask_s = time.perf_counter() - t0
        same = digests(clustered) == digests(single) and clustered.manifest["files"] == single.manifest["files"]
        print(f"LocalCluster of {args.workers} x 1 thread: {dask_s:.1f} s (cluster start {cluster_start_s:.1f} s); "
              f"speedup {single_s / dask_s:.2f}; shards identical: {same}", flush=True)  # fmt: skip

        client = runner.client
        client.gather([client.submit(_noop, i, pure=False) for i in range(20)])  # warm
        t0 = time.perf_counter()
        client.gather([client.submit(_noop, i, pure=False) for i in range(args.noop_tasks)])
        noop_ms = 1000 * (time.perf_counter() - t0) / args.noop_tasks
        job = BuildTask(str(dask_dir.resolve()), ShardFile(0, 0, 0, args.shard_size), "0" * 64, "0" * 64, "cpu", 1, False)
        record = clustered.manifest["shards"][0]
        bytes_per_task = len(pickle.dumps(job)) + len(pickle.dumps(record))
        print(f"overhead per task {noop_ms:.2f} ms; {bytes_per_task} bytes moved per task", flush=True)

        test_labels = read_labeled_triples(args.test)
        maps = single.id_maps()
        test = maps.to_ids(test_labels)[: args.queries + 1]
        torch.set_num_threads(2)
        local = GradientIndex.open(dask_dir, device="cpu", pack=True)  # warm: both packed for fbgemm
        local_p50, local_times = query_p50(local, test, args.queries)
        del local
        t0 = time.perf_counter()
        sharded = GradientIndex.open(dask_dir, device="cpu", dask=client, pack=True)
        place_s = time.perf_counter() - t0
        sharded_p50, sharded_times = query_p50(sharded, test, args.queries)
        print(f"query p50: one index {local_p50:.1f} ms, {len(sharded.engine.search.shards)} search shards on the cluster "
              f"{sharded_p50:.1f} ms (placing them took {place_s:.1f} s)", flush=True)  # fmt: skip
    finally:
        runner.close()
    others = foreign_cores(counters, cpu_counters())
    figures = {
        "single_process_build_s": single_s,
        "single_process_task_seconds_sum": sum(task_seconds),
        "single_process_tasks": len(task_seconds),
        "dask_build_s": dask_s,
        "dask_cluster_start_s": cluster_start_s,
        "dask_build_speedup_2_workers": single_s / dask_s,
        "shards_identical": same,
        "dask_task_overhead_ms": noop_ms,
        "bytes_moved_per_task": bytes_per_task,
        "query_p50_ms_one_index": local_p50,
        "query_p50_ms_search_shards": sharded_p50,
        "sharded_query_overhead_ms": sharded_p50 - local_p50,
        "search_shards": len(sharded.engine.search.shards),
        "search_shards_place_s": place_s,
        "query_times_ms_one_index": local_times,
        "query_times_ms_search_shards": sharded_times,
    }
    data = {
        "protocol": {"run": str(args.run), "training_triples": int(single.num_triples),
                     "checkpoints": single.num_checkpoints, "shard_size": args.shard_size, "workers": args.workers,
                     "threads": "1 torch thread per worker and for the single-process build; queries: 2 threads in "
                                "this process, 1 per worker", "queries": args.queries},  # fmt: skip
        "figures": figures,
        "wall_s": time.perf_counter() - started,
        "other_processes_cores_during_run": others,
    }
    path = write_results(NAME, data)
    if not args.no_summary:
        update_summary({k: round(figures[k], 3) for k in ("dask_build_speedup_2_workers", "dask_task_overhead_ms",
                                                           "sharded_query_overhead_ms")})  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
