"""Many test triples per query call against one at a time: the batched scan, measured side by side.

Run from the repository root (trains and caches the planted graph's ConvE as ``benchmarks/scale.py``
does, in the same ``--work``)::

    python benchmarks/batch_query.py                      # 100k training triples, 1,000 test triples
    python benchmarks/batch_query.py --size 20000 --test 50 --rounds 1 --epochs 1   # a quick look

One process, one opened index (``pack=False``: a command-line query never packs), torch on
``--threads`` threads. Each round times the same test triples answered one ``GradientIndex.query``
call each ("one by one") and in one call ("batched": each checkpoint's stored arrays scanned once
per batch of test triples, ``SCAN_BATCH``), alternating which goes first. Both are exact TracIn: the
benchmark checks that every list is the same (training rows in order) and reports the largest
relative difference of a printed influence (float32 rescoring of gradients computed in another batch
of test triples). Writes ``benchmarks/results/batch_query.json``; for 100,000 training triples and at
least 1,000 test triples, ``batch_speedup_100k`` goes to ``summary.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PYSTOW_HOME", os.path.join(tempfile.gettempdir(), "pystow-bench"))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, QuietGuard, peak_rss_mb, update_summary, write_results  # noqa: E402
from scale import _name, default_entities, ensure_data, ensure_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=100_000, help="training triples of the planted graph")
    parser.add_argument("--test", type=int, default=1000, help="test triples answered")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tracin-scale")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-wait", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import torch

    from tracin_index import GradientIndex, read_labeled_triples
    from tracin_index.search.engine import SCAN_BATCH

    torch.set_num_threads(args.threads)
    training = argparse.Namespace(train_loop="sampled-1n", epochs=args.epochs, checkpoints=args.checkpoints,
                                  train_batch=1024, lr=0.003, seed=args.seed, negatives=4096)  # fmt: skip
    data = ensure_data(args.work, args.size, default_entities(args.size), args.seed)
    run, trained = ensure_model(data, training)
    idx = args.work / f"idx-{_name(args.size)}-e{args.epochs}-c{args.checkpoints}"
    started = time.perf_counter()
    GradientIndex.build(idx, model_path=run)  # resumes, or recomputes nothing where complete
    build_s = time.perf_counter() - started
    index = GradientIndex.open(idx, pack=False)
    test = index.id_maps().to_ids(read_labeled_triples(data / "test.tsv"))[: args.test]
    index.query(test[:2], top_k=10)  # warm: the model, the stored arrays

    times: dict[str, list[float]] = {"one_by_one": [], "batched": []}
    answers: dict[str, list] = {}
    for r in range(args.rounds):
        order = ["one_by_one", "batched"] if r % 2 == 0 else ["batched", "one_by_one"]
        for method in order:
            QuietGuard(0.3, args.max_wait, 0).wait()
            start = time.perf_counter()
            if method == "batched":
                found = index.query(test, top_k=10)
            else:
                found = [index.query(test[t : t + 1], top_k=10)[0] for t in range(len(test))]
            times[method].append(time.perf_counter() - start)
            answers[method] = found
            print(f"round {r + 1} {method:<10} {1000 * times[method][-1] / len(test):7.2f} ms per test triple", flush=True)
    same = difference = 0
    for a, b in zip(answers["batched"], answers["one_by_one"]):
        lists = all([i.train_index for i in x] == [i.train_index for i in y]
                    for x, y in ((a.proponents, b.proponents), (a.opponents, b.opponents)))  # fmt: skip
        same += lists
        for x, y in zip(a.proponents + a.opponents, b.proponents + b.opponents):
            difference = max(difference, abs(x.influence - y.influence) / max(abs(y.influence), 1e-30))
    ms = {m: 1000 * statistics.median(v) / len(test) for m, v in times.items()}
    speedup = ms["one_by_one"] / ms["batched"]
    figures = {"ms_per_test_triple_one_by_one": ms["one_by_one"], "ms_per_test_triple_batched": ms["batched"],
               "batch_speedup": speedup, "lists_identical": same, "test_triples": len(test),
               "largest_relative_influence_difference": difference,
               "seconds_all": {m: v for m, v in times.items()}, "peak_rss_mb": peak_rss_mb()}  # fmt: skip
    print(f"batched: {speedup:.2f}x as fast; {same} of {len(test)} test triples with identical lists; "
          f"influences within {difference:.1e}", flush=True)
    path = write_results("batch_query", {
        "settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "scan_batch": SCAN_BATCH,
                     "training": {k: trained.get(k) for k in ("loop", "epochs", "checkpoints", "train_seconds")},
                     "index_build_s_this_run": build_s, "packed": False},
        "figures": figures})  # fmt: skip
    if args.size == 100_000 and len(test) >= 1000 and same == len(test) and RESULTS.exists():
        update_summary({"batch_speedup_100k": round(speedup, 2)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
