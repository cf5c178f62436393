"""Query cost at scale: a gradient index of 100,000 and 1,000,000 synthetic training triples (issue item 3).

Run from the repository root (defaults are the reported settings; about 30 minutes on 2 cores)::

    python benchmarks/scale.py

What it does, per size (``--sizes``, default 100000 1000000):

1. **Data** (seeded, ``--seed``): a synthetic knowledge graph of ``--entities`` (50,000) entities and
   ``--relations`` (200) relations whose heads and tails are drawn from a Zipf-like law
   (p(rank i) ~ (i + 1)^-1.1 over a random permutation of the entities) and relations from
   p ~ (j + 1)^-1; duplicates dropped. The 100k training set is the first 100k rows of the 1M one.
   One ConvE (PyKEEN 1.11 defaults, ``embedding_dim`` 200, no inverse triples) serves both sizes;
   it is **randomly initialised, not trained**: the ``--checkpoints`` (2) checkpoint files are its
   initial weights plus seeded Gaussian perturbations (see ``make_checkpoints``) with learning rates
   1e-3, 5e-4, 2.5e-4. Timings do not depend on the weights' values; influence values are meaningless.
   Written as run directories with :func:`tracin_index.models.save_run_directory`.
2. **Build**: ``tracin-index build`` in a subprocess (so that its peak RSS, from ``wait4``, is the
   build's own), with ``--projection-dim`` (256), ``--index`` (ivf), ``--device cpu`` and the other
   defaults (last 2 layers, bce, float16 shards of 16,384 rows, batch 256). Recorded: wall time, CPU
   time, peak RSS, what the built FAISS index held (the RSS given back when the runner frees it) and
   the peak minus that, the same against the index's nominal size, bytes on disk (shards,
   faiss.index, triples, bases).
3. **Query** in a second subprocess (``--query-worker``): ``GradientIndex.open`` once; 5 warm-up
   queries; ``--queries`` (120) single-triple ``index.query(..., top_k=10)`` calls (proponents and
   opponents), timed one by one, under the quiet-machine guard in blocks of 20; a breakdown (test
   gradients at all checkpoints vs FAISS searches); batched throughput (``--batch`` (256) triples per
   call, 3 repeats); peak RSS of the query process up to here. Then the approximation: recall@10 of
   the index type against exact (flat) search over the very same stored vectors, for
   ``--recall-queries`` (300) test triples, proponents and opponents, at several ``nprobe`` values
   with their search latency; and the exact analyzer (``TracInAnalyzer.compute_influences_for_test_triple``
   over all training triples, same checkpoints and selection, once), with the overlap of its top-10
   and the index's (plain and ``rerank=100``).

Writes ``benchmarks/results/scale.json``, ``benchmarks/results/scale.png`` and the summary keys
``query_p50_ms_100k``, ``query_p50_ms_1m``, ``query_speedup_vs_exact_1m``, ``build_peak_rss_mb_100k``,
``build_peak_rss_mb_1m``. ``--workdir`` (default a folder under /tmp) keeps the data and indexes;
``--keep`` leaves them there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PYSTOW_HOME", os.path.join(tempfile.gettempdir(), "pystow-bench"))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS,
    QuietGuard,
    command_line,
    cpu_counters,
    foreign_cores,
    machine_info,
    peak_rss_mb,
    run_measured,
    update_summary,
    versions,
    write_json_atomic,
    write_results,
)

TARGET_P50_MS = {100_000: 50.0, 1_000_000: 200.0}
TARGET_SPEEDUP_1M = 1000.0
TARGET_BUILD_RSS_RATIO = 1.2
LEARNING_RATES = (1e-3, 5e-4, 2.5e-4)
NOTES = [
    "Shared 2-core machine: each measurement records the cores other processes used meanwhile (foreign_cores; single "
    "queries per block of 20). With 2 torch threads on 2 cores, one other busy process slows small torch calls by up "
    "to ~40x; with --also-threads N, query['also_threads'] repeats the latency measurements with N threads.",
    "Each size's entry carries its own 'measured' date; with --reuse-builds, --reuse-queries or --merge, sizes can "
    "come from separate runs of this script over the same work folder (identical data, model, checkpoints, settings).",
    "Where the exact analyzer's time is EXTRAPOLATED (--exact-rows; sizes.N.query.exact says so and how), the speedup "
    "uses the smallest estimate.",
    "Influence values are meaningless here (random weights); the recall figures compare the index type with exact "
    "search over the same stored vectors, and the top-10 overlaps with the exact analyzer show the cost of the "
    "projection dim on this model (not a setting tuned for accuracy).",
]


def _size_name(n: int) -> str:
    return f"{n // 1_000_000}m" if n % 1_000_000 == 0 else f"{n // 1000}k"


# -- data ---------------------------------------------------------------------------------------


def synthetic_triples(num: int, num_entities: int, num_relations: int, seed: int):
    """``num`` distinct (h, r, t) id triples with Zipf-like entity and relation frequencies, and 300 test triples."""
    import numpy as np

    rng = np.random.default_rng(seed)
    entity_p = (np.arange(num_entities) + 1.0) ** -1.1
    entity_p /= entity_p.sum()
    relation_p = (np.arange(num_relations) + 1.0) ** -1.0
    relation_p /= relation_p.sum()
    perm = rng.permutation(num_entities)  # popular entities get random ids

    def draw(n):
        h = perm[rng.choice(num_entities, size=n, p=entity_p)]
        r = rng.choice(num_relations, size=n, p=relation_p)
        t = perm[rng.choice(num_entities, size=n, p=entity_p)]
        return np.stack([h, r, t], axis=1).astype(np.int64)

    triples = draw(int(num * 1.25) + 1000)
    _, first = np.unique(triples, axis=0, return_index=True)
    triples = triples[np.sort(first)]
    while len(triples) < num:  # very skewed laws: draw more
        more = draw(num)
        both = np.concatenate([triples, more])
        _, first = np.unique(both, axis=0, return_index=True)
        triples = both[np.sort(first)]
    return triples[:num], draw(300)


def make_checkpoints(model, num: int, seed: int) -> list[dict]:
    """Checkpoint dicts: initial weights + c * 0.05 * std(tensor) * N(0, 1) per float parameter (c = 1..num)."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = []
    for c in range(1, num + 1):
        state = {}
        for key, value in base.items():
            if value.is_floating_point() and "running_" not in key:
                scale = float(value.std()) if value.numel() > 1 and float(value.std()) > 0 else 0.01
                value = value + c * 0.05 * scale * torch.randn(value.shape, generator=generator)
            state[key] = value.clone()
        out.append({"model_state_dict": state, "learning_rate": LEARNING_RATES[(c - 1) % len(LEARNING_RATES)], "epoch": c})
    return out


def make_runs(workdir: Path, sizes: list[int], args) -> dict[int, Path]:
    """Run directories (one ConvE, the same checkpoint files; training sets differ by size)."""
    import numpy as np
    import torch

    from tracin_index.models import ModelConfig, build_model, save_run_directory
    from tracin_index.triples import IdMaps

    runs = {n: workdir / f"run-{_size_name(n)}" for n in sizes}
    if all((p / "config.json").is_file() and (p / "checkpoints").is_dir() and (p / "test.tsv").is_file() for p in runs.values()):
        return runs
    start = time.perf_counter()
    # always the same graph (the first rows of a 1M-triple draw), whatever sizes this run measures
    triples, tests = synthetic_triples(max(1_000_000, max(sizes)), args.entities, args.relations, args.seed)
    id_maps = IdMaps({f"e{i:05d}": i for i in range(args.entities)}, {f"r{j:03d}": j for j in range(args.relations)})
    config = ModelConfig(
        model="ConvE", model_kwargs={"embedding_dim": args.embedding_dim}, num_entities=args.entities,
        num_relations=args.relations, create_inverse_triples=False, random_seed=args.seed,
        extra={"dataset": f"synthetic Zipf graph (benchmarks/scale.py, seed {args.seed})",
               "note": "randomly initialised ConvE; checkpoints are perturbed initial weights, not trained"},
    )  # fmt: skip
    model = build_model(config)
    checkpoints = make_checkpoints(model, args.checkpoints, args.seed)
    model.load_state_dict(checkpoints[-1]["model_state_dict"])
    for n, run in runs.items():
        save_run_directory(run, model=model, config=config, id_maps=id_maps, training=triples[:n], testing=tests)
        (run / "checkpoints").mkdir(exist_ok=True)
        for ckpt in checkpoints:
            torch.save(ckpt, run / "checkpoints" / f"epoch-{ckpt['epoch']:04d}.pt")
    degrees = np.bincount(np.concatenate([triples[:, 0], triples[:, 2]]), minlength=args.entities)
    (workdir / "data.json").write_text(json.dumps({
        "seconds": time.perf_counter() - start,
        "entity_degree_1m": {"max": int(degrees.max()), "median": float(np.median(degrees)),
                              "mean": float(degrees.mean()), "entities_with_degree_0": int((degrees == 0).sum())},
    }, indent=2))  # fmt: skip
    return runs


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


# -- build ----------------------------------------------------------------------------------------


def run_build(run: Path, idx: Path, args, log: Path) -> dict:
    if idx.exists():
        shutil.rmtree(idx)
    stages_json = log.with_suffix(".stages.json")
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--build-runner", str(stages_json), "--",
        "--model-path", str(run), "--out", str(idx),
        "--projection-dim", str(args.projection_dim), "--index", args.index, "--device", "cpu",
        "--batch-size", str(args.batch_size),
    ]  # fmt: skip
    guard = QuietGuard(args.quiet_cores, args.max_wait, 0)
    waited = guard.wait()
    result = run_measured(cmd, log_path=log)
    result["waited_for_quiet_s"] = waited
    result["how"] = ("`tracin-index build` (tracin_index.cli.main) run in a fresh Python subprocess by this script's "
                     "--build-runner, which wraps the build's three stages (bases, shards, FAISS index) with timers "
                     "and memory probes; peak_rss_mb is the subprocess's ru_maxrss from wait4")
    runner = json.loads(stages_json.read_text()) if stages_json.is_file() else {}
    result["stages"] = runner.get("stages", {})
    if result["returncode"] != 0:
        raise SystemExit(f"build failed ({result['returncode']}):\n{result['output_tail']}")
    manifest = json.loads((idx / "manifest.json").read_text())
    ntotal, dim = manifest["index"]["ntotal"], manifest["index"]["dim"]
    faiss_in_memory = ntotal * dim * 4 + (ntotal * 8 if args.index == "ivf" else 0)
    if args.index == "flat-fp16":
        faiss_in_memory = ntotal * dim * 2
    result.update({
        "ntotal": ntotal,
        "index_dim": dim,
        "dim_per_checkpoint": manifest["projection"]["dim_per_checkpoint"],
        "projection_blocks": manifest["projection"]["blocks"],
        "bytes": {
            "shards": _dir_bytes(idx / "shards"),
            "faiss_index": (idx / "faiss.index").stat().st_size,
            "triples_h5": (idx / "triples.h5").stat().st_size,
            "bases": _dir_bytes(idx / "bases"),
            "total": _dir_bytes(idx),
        },
        "faiss_index_in_memory_mb": faiss_in_memory / 2**20,
        "peak_rss_mb_apart_from_faiss_index": result["peak_rss_mb"] - faiss_in_memory / 2**20,
        # measured: RSS given back when the built FAISS index was freed (its lists' spare capacity included)
        "faiss_footprint_mb": runner.get("faiss_footprint_mb"),
        "peak_rss_mb_apart_from_faiss_footprint": (result["peak_rss_mb"] - runner["faiss_footprint_mb"]
                                                   if runner.get("faiss_footprint_mb") is not None else None),
        "triples_per_s_per_checkpoint": ntotal * len(manifest["inputs"]["checkpoints"]) / result["wall_s"],
    })  # fmt: skip
    return result


# -- build runner (a subprocess): the CLI's build, with per-stage time and memory -----------------


def _vm_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _release_freed_memory() -> None:
    """Hand memory that was freed back to the OS (glibc keeps freed heap pages otherwise), so RSS drops."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build_runner(out: Path, cli_args: list[str]) -> None:
    """``tracin_index.cli.main(["build", ...])`` in this process, its stages wrapped with timers that also
    record RSS now (VmRSS) and the peak so far (ru_maxrss) at each stage's start and end. After the build,
    the FAISS index it returned is freed and the drop in RSS recorded: what the index really held
    (inverted lists with their spare capacity included)."""
    from tracin_index import cli
    from tracin_index.index import GradientIndex
    from tracin_index.search import InnerProductIndex

    stages: dict = {}
    start = time.perf_counter()
    wrapped = [(GradientIndex, "_prepare_bases", True), (GradientIndex, "_compute", True),
               (InnerProductIndex, "save", False)]  # fmt: skip
    for cls, name, static in wrapped:
        original = getattr(cls, name)

        def timed(*a, _original=original, _name=name, **kw):
            entry = stages.setdefault(_name, {})
            entry.update(start_s=time.perf_counter() - start, rss_at_start_mb=_vm_rss_mb(), peak_rss_before_mb=peak_rss_mb())
            try:
                return _original(*a, **kw)
            finally:
                entry.update(end_s=time.perf_counter() - start, rss_at_end_mb=_vm_rss_mb(), peak_rss_after_mb=peak_rss_mb())

        setattr(cls, name, staticmethod(timed) if static else timed)
    built = []
    original_build = GradientIndex.build.__func__

    def keep(cls, *a, **kw):
        built.append(original_build(cls, *a, **kw))
        return built[-1]

    GradientIndex.build = classmethod(keep)
    code = 0
    try:
        cli.main(["build", *cli_args])
    except SystemExit as exit_:
        code = exit_.code or 0
    peak = peak_rss_mb()
    faiss_footprint = None
    if built:
        _release_freed_memory()
        before = _vm_rss_mb()
        built[-1].search_index = None
        _release_freed_memory()
        faiss_footprint = before - _vm_rss_mb()
    write_json_atomic(out, {"stages": stages, "total_s": time.perf_counter() - start, "peak_rss_mb": peak,
                            "faiss_footprint_mb": faiss_footprint, "returncode": code})  # fmt: skip
    raise SystemExit(code)


# -- query worker (a subprocess) ------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _brute_force_topk(index, queries, k: int):
    """Exact top-k (largest and smallest inner products) over the stored shard vectors: flat search, streamed."""
    import numpy as np

    from tracin_index.store import ShardTask, read_shard

    num_ckpt = index.num_checkpoints
    shards = sorted({(s["shard"], s["row_start"], s["row_stop"]) for s in index.manifest["shards"]})
    q = queries.astype(np.float32)
    best = {"hi": (np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)),
            "lo": (np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64))}
    for shard, start, _ in shards:
        parts = [read_shard(index.directory / ShardTask(c, shard, 0, 0).relative_path)[0] for c in range(num_ckpt)]
        rows = np.ascontiguousarray(np.hstack(parts), dtype=np.float32)
        scores = q @ rows.T
        ids = np.broadcast_to(np.arange(start, start + rows.shape[0])[None, :], scores.shape)
        for key, sign in (("hi", -1.0), ("lo", 1.0)):
            s = np.concatenate([best[key][0], scores], axis=1)
            i = np.concatenate([best[key][1], ids], axis=1)
            order = np.argsort(sign * s, axis=1, kind="stable")[:, :k]
            best[key] = (np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1))
    return best["hi"][1], best["lo"][1]


def _recall(found, exact) -> float:
    return float(sum(len(set(f.tolist()) & set(e.tolist())) / len(e) for f, e in zip(found, exact)) / len(exact))


def query_worker(idx: Path, run: Path, out: Path, args) -> None:
    import numpy as np
    import torch

    from tracin_index.index import GradientIndex
    from tracin_index.triples import read_labeled_triples

    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    res: dict = {"threads": args.threads}
    start = time.perf_counter()
    index = GradientIndex.open(idx, device="cpu")
    res["open_s"] = time.perf_counter() - start
    res["rss_after_open_mb"] = peak_rss_mb()
    tests = torch.as_tensor(index.id_maps().to_ids(read_labeled_triples(run / "test.tsv"))).long()
    res["num_test_triples"] = int(tests.shape[0])
    search = index.search_index
    res["index"] = {"type": search.index_type, "dim": search.dim, "ntotal": search.ntotal,
                    "nlist": search.nlist, "nprobe_default": search.nprobe}  # fmt: skip

    for i in range(5):  # warm-up: per-checkpoint model copies, projection matrices, FAISS
        index.query(tests[i : i + 1], top_k=10)

    guard = QuietGuard(args.quiet_cores, args.max_wait, 1)
    latencies: list[float] = []
    blocks = []
    block = 20
    for b in range(0, args.queries, block):
        chunk = [tests[(b + j) % len(tests)] for j in range(min(block, args.queries - b))]

        def run_block(chunk=chunk):
            times = []
            for triple in chunk:
                t0 = time.perf_counter()
                index.query(triple.view(1, 3), top_k=10)
                times.append(time.perf_counter() - t0)
            return sum(times), times

        m = guard.measure(run_block)
        latencies.extend(m.result)
        blocks.append({"foreign_cores": m.foreign, "attempts": m.attempts, "waited_s": m.waited})
    ms = [t * 1000 for t in latencies]
    res["single_query"] = {
        "what": "index.query(one triple, top_k=10): test gradients at every checkpoint, projection, "
                "proponents and opponents in one FAISS search call, labels",
        "n": len(ms), "p50_ms": _pct(ms, 0.5), "p95_ms": _pct(ms, 0.95), "mean_ms": statistics.mean(ms),
        "min_ms": min(ms), "max_ms": max(ms), "blocks_of_20": blocks,
    }  # fmt: skip

    # breakdown: gradients + projection vs the search (proponents and opponents in one FAISS call)
    grad_ms, search_ms = [], []
    for i in range(30):
        t = tests[i % len(tests)].view(1, 3)
        t0 = time.perf_counter()
        v = index.query_vectors(t)
        t1 = time.perf_counter()
        search.search_both(v, 10)
        t2 = time.perf_counter()
        grad_ms.append((t1 - t0) * 1000)
        search_ms.append((t2 - t1) * 1000)
    res["single_query_breakdown_median_ms"] = {"query_vectors": statistics.median(grad_ms),
                                               "search_both": statistics.median(search_ms)}  # fmt: skip

    batch = tests[: args.batch]
    batch_times = []
    batch_foreign = []
    for _ in range(3):
        def run_batch():
            t0 = time.perf_counter()
            index.query(batch, top_k=10)
            return time.perf_counter() - t0, None

        m = guard.measure(run_batch)
        batch_times.append(m.seconds)
        batch_foreign.append(m.foreign)
    res["batched"] = {"triples_per_call": int(batch.shape[0]), "seconds_per_call": batch_times,
                      "median_s": statistics.median(batch_times),
                      "triples_per_s": batch.shape[0] / statistics.median(batch_times),
                      "foreign_cores": batch_foreign}  # fmt: skip
    res["query_peak_rss_mb"] = peak_rss_mb()
    res["query_peak_rss_note"] = "peak RSS of the query process after open, warm-up, single and batched queries"

    if args.latency_only:
        res["total_worker_s"] = time.perf_counter() - start
        write_json_atomic(out, res)
        return

    # approximation of the index type vs flat over the same stored vectors
    r = min(args.recall_queries, len(tests))
    vectors = index.query_vectors(tests[:r])
    t0 = time.perf_counter()
    exact_pro, exact_opp = _brute_force_topk(index, vectors, 10)
    res["flat_bruteforce_s_for_recall"] = time.perf_counter() - t0
    sweep = []
    if search.index_type == "ivf":
        default = search.nprobe
        nlist = search.nlist
        values = sorted({max(1, nlist // 64), max(1, nlist // 32), max(1, nlist // 16), default, max(1, nlist // 4)})
    else:
        default, values = None, [None]
    for nprobe in values:
        if nprobe is not None:
            search.nprobe = nprobe
        pro = search.search(vectors, 10).rows
        opp = search.search_opponents(vectors, 10).rows
        lat = []
        for i in range(20):
            t0 = time.perf_counter()
            search.search_both(vectors[i : i + 1], 10)
            lat.append((time.perf_counter() - t0) * 1000)
        sweep.append({"nprobe": nprobe, "default": nprobe == default, "recall_at_10_proponents": _recall(pro, exact_pro),
                      "recall_at_10_opponents": _recall(opp, exact_opp), "search_both_median_ms": statistics.median(lat)})  # fmt: skip
    if default is not None:
        search.nprobe = default
    res["recall_vs_flat"] = {"queries": r, "k": 10, "sweep": sweep,
                             "what": "fraction of the exact (flat) top-10 over the same stored vectors that the index returns"}  # fmt: skip

    # the exact analyzer, once
    if not args.skip_exact:
        from tracin_index.analyzer import TracInAnalyzer
        from tracin_index.models import load_model

        loaded = load_model(run)
        analyzer = TracInAnalyzer(loaded.model, use_last_layers_only=True, num_last_layers=2, device="cpu",
                                  checkpoints=loaded.checkpoints, loss="bce", id_maps=loaded.id_maps)  # fmt: skip
        train = torch.as_tensor(np.asarray(index.hrt), dtype=torch.long)
        full_rows = int(train.shape[0])
        if args.exact_rows and args.exact_rows < full_rows:
            train = train[: args.exact_rows]  # a measured fraction, extrapolated linearly below (said in the JSON)
        test = tests[0].tolist()
        before = cpu_counters()
        t0 = time.perf_counter()
        exact = analyzer.compute_influences_for_test_triple(test, train, top_k=10)
        exact_s = time.perf_counter() - t0
        plain = index.query([test], top_k=10)[0]
        reranked = index.query([test], top_k=10, rerank=100)[0]
        ex_pro = {i.train_index for i in exact.proponents}
        ex_opp = {i.train_index for i in exact.opponents}
        fraction = train.shape[0] / full_rows
        res["exact"] = {
            "seconds": exact_s / fraction, "measured_seconds": exact_s, "measured_rows": int(train.shape[0]),
            "extrapolated": fraction < 1,
            "extrapolation": None if fraction == 1 else (
                f"EXTRAPOLATED: the analyzer ran over the first {train.shape[0]:,} of {full_rows:,} training rows "
                f"({exact_s:.1f} s) and seconds = that / {fraction:g} (its cost is one gradient batch per 256 rows "
                "per checkpoint, linear in the rows); the top-10 overlaps below are over those rows only"),
            "foreign_cores": foreign_cores(before, cpu_counters()),
            "what": "TracInAnalyzer.compute_influences_for_test_triple over all training triples (same checkpoints, last 2 layers, bce)",
            "test_triple": test,
            "index_top10_overlap": {"proponents": len(ex_pro & {i.train_index for i in plain.proponents}) / 10,
                                    "opponents": len(ex_opp & {i.train_index for i in plain.opponents}) / 10},
            "rerank100_top10_overlap": {"proponents": len(ex_pro & {i.train_index for i in reranked.proponents}) / 10,
                                        "opponents": len(ex_opp & {i.train_index for i in reranked.opponents}) / 10},
        }  # fmt: skip
        if fraction < 1:  # overlaps against the index over the same rows only make sense for a full pass
            res["exact"]["index_top10_overlap"] = res["exact"]["rerank100_top10_overlap"] = None
        res["speedup_vs_exact_p50"] = res["exact"]["seconds"] / (res["single_query"]["p50_ms"] / 1000)
    res["total_worker_s"] = time.perf_counter() - start
    write_json_atomic(out, res)


# -- plot -----------------------------------------------------------------------------------------


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [s for s in results["sizes"]]
    labels = [_size_name(int(s)) for s in sizes]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    p50 = [results["sizes"][s]["query"]["single_query"]["p50_ms"] for s in sizes]
    p95 = [results["sizes"][s]["query"]["single_query"]["p95_ms"] for s in sizes]
    exact = [(lambda e: e.get("seconds_conservative", e.get("seconds", float("nan"))))(results["sizes"][s]["query"].get("exact", {})) * 1000
             for s in sizes]  # fmt: skip
    x = range(len(sizes))
    ax.bar([i - 0.27 for i in x], p50, 0.27, label="index p50")
    ax.bar(list(x), p95, 0.27, label="index p95")
    extrapolated = [_size_name(int(s)) for s in sizes if results["sizes"][s]["query"].get("exact", {}).get("extrapolated")]
    ax.bar([i + 0.27 for i in x], exact, 0.27,
           label="exact analyzer" + (f" ({', '.join(extrapolated)}: extrapolated)" if extrapolated else ""))
    for i, s in enumerate(sizes):
        target = TARGET_P50_MS.get(int(s))
        if target:
            ax.hlines(target, i - 0.45, i + 0.45, colors="k", linestyles="dashed")
    ax.set_yscale("log")
    ax.set_xticks(list(x), [f"{l} triples" for l in labels])
    ax.set_ylabel("ms per query (log)")
    ax.set_title("Single-query latency (dashed: p50 target)")
    ax.legend(fontsize=8)
    ax = axes[1]
    rss = [results["sizes"][s]["build"]["peak_rss_mb"] for s in sizes]
    apart = [results["sizes"][s]["build"].get("peak_rss_mb_apart_from_faiss_footprint") or float("nan") for s in sizes]
    qrss = [results["sizes"][s]["query"]["query_peak_rss_mb"] for s in sizes]
    ax.bar([i - 0.27 for i in x], rss, 0.27, label="build peak RSS")
    ax.bar(list(x), apart, 0.27, label="build peak minus what its FAISS index held")
    ax.bar([i + 0.27 for i in x], qrss, 0.27, label="query process peak RSS")
    ax.set_xticks(list(x), [f"{l} triples" for l in labels])
    ax.set_ylabel("MiB")
    ax.set_title("Memory")
    ax.legend(fontsize=8)
    fig.suptitle(f"tracin-index at scale: ConvE, {results['settings']['checkpoints']} checkpoints, "
                 f"--projection-dim {results['settings']['projection_dim']}, --index {results['settings']['index']}, 2 cores",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--entities", type=int, default=50_000)
    parser.add_argument("--relations", type=int, default=200)
    parser.add_argument("--embedding-dim", type=int, default=200)
    parser.add_argument("--checkpoints", type=int, default=2)
    parser.add_argument("--projection-dim", type=int, default=256)
    parser.add_argument("--index", default="ivf", choices=["flat", "flat-fp16", "ivf", "hnsw"])
    parser.add_argument("--batch-size", type=int, default=256, help="build batch size (default 256)")
    parser.add_argument("--queries", type=int, default=120, help="timed single queries (default 120)")
    parser.add_argument("--batch", type=int, default=256, help="triples per batched query call (default 256)")
    parser.add_argument("--recall-queries", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-exact", action="store_true")
    parser.add_argument("--latency-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--also-threads", type=int, default=None,
                        help="also time single and batched queries with this many torch/FAISS threads (query['also_threads'])")
    parser.add_argument("--exact-rows", type=int, default=None,
                        help="run the exact analyzer over only the first N training rows and extrapolate (said in the JSON)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "tracin-scale")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (data and indexes)")
    parser.add_argument("--reuse-builds", action="store_true", help="(development) reuse complete indexes, no build timing")
    parser.add_argument("--max-wait", type=float, default=20.0)
    parser.add_argument("--quiet-cores", type=float, default=0.3)
    parser.add_argument("--name", default="scale", help="results name (default scale)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the sizes of an existing results file that this run does not measure (same settings)")
    parser.add_argument("--reuse-queries", action="store_true",
                        help="reuse a size's query results in --workdir if there (same index settings)")
    parser.add_argument("--query-worker", nargs=3, metavar=("INDEX", "RUN", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--build-runner", metavar="OUT", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--build-runner" in argv:  # --build-runner OUT -- <tracin-index build arguments>
        i = argv.index("--build-runner")
        build_runner(Path(argv[i + 1]), argv[argv.index("--") + 1 :])
        return None
    args = parser.parse_args(argv)

    if args.query_worker:
        query_worker(Path(args.query_worker[0]), Path(args.query_worker[1]), Path(args.query_worker[2]), args)
        return None

    command = command_line()
    start = time.perf_counter()
    date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    machine = machine_info()
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    sizes = sorted(args.sizes)
    runs = make_runs(workdir, sizes, args)
    data = json.loads((workdir / "data.json").read_text()) if (workdir / "data.json").is_file() else {}
    per_size: dict = {}
    for n in sizes:
        name = _size_name(n)
        idx = workdir / f"idx-{name}"
        print(f"[{name}] build ...", file=sys.stderr, flush=True)
        if args.reuse_builds and (idx / "manifest.json").is_file() and json.loads((idx / "manifest.json").read_text()).get("complete"):
            build = json.loads((workdir / f"build-{name}.json").read_text())
        else:
            build = run_build(runs[n], idx, args, workdir / f"build-{name}.log")
            write_json_atomic(workdir / f"build-{name}.json", build)
        print(f"[{name}] build {build['wall_s']:.1f} s, peak RSS {build['peak_rss_mb']:.0f} MiB; query ...", file=sys.stderr, flush=True)
        worker_out = workdir / f"query-{name}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--query-worker", str(idx), str(runs[n]), str(worker_out),
               "--queries", str(args.queries), "--batch", str(args.batch), "--recall-queries", str(args.recall_queries),
               "--threads", str(args.threads), "--max-wait", str(args.max_wait), "--quiet-cores", str(args.quiet_cores)]  # fmt: skip
        if args.skip_exact:
            cmd.append("--skip-exact")
        if args.exact_rows:
            cmd += ["--exact-rows", str(args.exact_rows)]
        if args.reuse_queries and worker_out.is_file():
            query = json.loads(worker_out.read_text())
            query["reused_from_earlier_run"] = True
        else:
            proc = run_measured(cmd, log_path=workdir / f"query-{name}.log")
            if proc["returncode"] != 0:
                raise SystemExit(f"query worker failed:\n{proc['output_tail']}")
            query = json.loads(worker_out.read_text())
            query["process"] = {k: proc[k] for k in ("wall_s", "user_s", "sys_s", "peak_rss_mb", "foreign_cores")}
            write_json_atomic(worker_out, query)
        if args.also_threads:
            extra_out = workdir / f"query-{name}-threads{args.also_threads}.json"
            if not (args.reuse_queries and extra_out.is_file()):
                extra = [a if a != str(worker_out) else str(extra_out) for a in cmd]
                extra[extra.index("--threads") + 1] = str(args.also_threads)
                proc = run_measured(extra + ["--latency-only"], log_path=workdir / f"query-{name}-threads.log")
                if proc["returncode"] != 0:
                    raise SystemExit(f"query worker failed:\n{proc['output_tail']}")
            query["also_threads"] = json.loads(extra_out.read_text())
        per_size[str(n)] = {"training_triples": n, "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "build": build, "query": query}
        q = query["single_query"]
        print(f"[{name}] p50 {q['p50_ms']:.1f} ms, p95 {q['p95_ms']:.1f} ms, batched {query['batched']['triples_per_s']:.0f} "
              f"triples/s, exact {query.get('exact', {}).get('seconds', float('nan')):.1f} s", file=sys.stderr, flush=True)  # fmt: skip

    merged_from = None
    previous = RESULTS / f"{args.name}.json"
    if args.merge and previous.is_file():
        old = json.loads(previous.read_text())
        same = ("checkpoints", "projection_dim", "index", "graph")
        mine = {"checkpoints": args.checkpoints, "projection_dim": args.projection_dim, "index": args.index}
        if any(old["settings"].get(k) != mine[k] for k in mine):
            raise SystemExit(f"--merge: {previous} was made with other settings ({same}); not merging")
        for key, entry in old["sizes"].items():
            if key not in per_size:
                per_size[key] = entry
                merged_from = old.get("date")
        per_size = dict(sorted(per_size.items(), key=lambda kv: int(kv[0])))

    def get(n, *keys):
        value = per_size.get(str(n))
        for k in keys:
            value = None if value is None else value.get(k)
        return value

    # The speedup, recomputed here from the (possibly extrapolated) exact seconds. Where a size's exact time is
    # extrapolated from its first rows and a smaller size ran a full pass over exactly those rows (same model,
    # checkpoints and test triple: the smaller training set is a prefix of the larger), that full pass gives a
    # second estimate; the smaller (more conservative) of the two is the reported speedup.
    for key, entry in per_size.items():
        exact = entry["query"].get("exact")
        if not exact:
            continue
        p50_s = entry["query"]["single_query"]["p50_ms"] / 1000
        estimates = {"this_run": exact["seconds"]}
        if exact.get("extrapolated"):
            for other_key, other in per_size.items():
                o = other["query"].get("exact")
                if (o and not o.get("extrapolated") and int(other_key) == exact.get("measured_rows")
                        and o.get("test_triple") == exact.get("test_triple")):
                    estimates[f"{int(key) // int(other_key)}x_full_pass_at_{_size_name(int(other_key))}"] = \
                        o["seconds"] * int(key) / int(other_key)
        exact["estimates_s"] = estimates
        exact["seconds_conservative"] = min(estimates.values())
        entry["query"]["speedup_vs_exact_p50"] = exact["seconds_conservative"] / p50_s

    targets = {}
    for n, target in TARGET_P50_MS.items():
        p50 = get(n, "query", "single_query", "p50_ms")
        if p50 is not None:
            targets[f"query_p50_ms_{_size_name(n)}"] = {"value": p50, "target_at_most": target, "met": p50 <= target,
                                                        "factor_over_target": p50 / target}  # fmt: skip
    speedup = get(1_000_000, "query", "speedup_vs_exact_p50")
    if speedup is not None:
        targets["query_speedup_vs_exact_1m"] = {"value": speedup, "target_at_least": TARGET_SPEEDUP_1M,
                                                "met": speedup >= TARGET_SPEEDUP_1M}  # fmt: skip
    a, b = (get(100_000, "build", "peak_rss_mb_apart_from_faiss_footprint"),
            get(1_000_000, "build", "peak_rss_mb_apart_from_faiss_footprint"))  # fmt: skip
    if a and b:
        targets["build_peak_rss_1m_vs_100k_apart_from_faiss"] = {
            "value": b / a, "target_at_most": TARGET_BUILD_RSS_RATIO, "met": b / a <= TARGET_BUILD_RSS_RATIO,
            "measure": "the build's peak RSS minus what its FAISS index held at the end (the RSS given back when the "
                       "index the build returned was freed, inverted lists' spare capacity included)",
        }  # fmt: skip
    a, b = get(100_000, "build", "peak_rss_mb_apart_from_faiss_index"), get(1_000_000, "build", "peak_rss_mb_apart_from_faiss_index")
    if a and b:
        targets["build_peak_rss_1m_vs_100k_minus_nominal_faiss_size"] = {
            "value": b / a, "target_at_most": TARGET_BUILD_RSS_RATIO, "met": b / a <= TARGET_BUILD_RSS_RATIO,
            "measure": "whole build's peak RSS minus the FAISS index's nominal size (ntotal * (dim * 4 + 8) for ivf); "
                       "counts against the build what the index holds beyond that size (spare capacity of inverted "
                       "lists grown by doubling)",
        }  # fmt: skip

    results = {
        "machine": machine,
        "versions": versions(),
        "command": command,
        "date": date,
        "settings": {
            "graph": f"synthetic, seeded (seed {args.seed}): {args.entities:,} entities, {args.relations} relations, "
                     "Zipf-like heads/tails (exponent 1.1) and relations (exponent 1.0), duplicates dropped; "
                     "the 100k training set is the first 100k rows of the 1M one",
            "data": data,
            "model": f"ConvE (PyKEEN 1.11 defaults, embedding_dim {args.embedding_dim}, no inverse triples), "
                     "RANDOMLY INITIALISED, NOT TRAINED; checkpoints = initial weights + c * 0.05 * std * N(0,1) "
                     f"(c = 1..{args.checkpoints}), learning rates {list(LEARNING_RATES[: args.checkpoints])}; "
                     "timings do not depend on weight values",
            "checkpoints": args.checkpoints,
            "selection": "last 2 layers (interaction.hr1d.0 Linear 10368->200, interaction.hr1d.2 BatchNorm1d), loss bce",
            "projection_dim": args.projection_dim,
            "index": args.index,
            "build_flags": f"--projection-dim {args.projection_dim} --index {args.index} --device cpu --batch-size "
                           f"{args.batch_size} (defaults otherwise: float16 shards of 16,384 rows)",
            "threads": args.threads,
            "queries": args.queries,
            "batch": args.batch,
            "timing_guard": QuietGuard(args.quiet_cores, args.max_wait, 1).describe() + " (single queries: in "
                            "blocks of 20; builds: waited for quiet once, then not re-run, others' load recorded "
                            "in foreign_cores)",
        },
        "notes": NOTES,
        "sizes": per_size,
        "merged_sizes_from_run_of": merged_from,
        "targets": targets,
        "total_runtime_s": time.perf_counter() - start,
    }
    path = write_results(args.name, results)
    plot(results, RESULTS / f"{args.name}.png")
    summary = {}
    for n in (100_000, 1_000_000):
        if get(n, "query") is not None:
            summary[f"query_p50_ms_{_size_name(n)}"] = round(get(n, "query", "single_query", "p50_ms"), 3)
            summary[f"build_peak_rss_mb_{_size_name(n)}"] = round(get(n, "build", "peak_rss_mb"), 1)
    if speedup is not None:
        summary["query_speedup_vs_exact_1m"] = round(speedup, 1)
    if args.name == "scale" and summary:
        update_summary(summary)
    print(json.dumps(targets, indent=2))
    print(f"wrote {path}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
