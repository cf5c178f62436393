"""Many test triples per query call against one at a time: the batched scan, measured side by side.

Run from the repository root (trains and caches the planted graph's ConvE as ``benchmarks/scale.py``
does, in the same ``--work``)::

    python benchmarks/batch_query.py                      # 100k training triples, 1,000 test triples
    python benchmarks/batch_query.py --size 20000 --test 50 --rounds 1 --epochs 1   # a quick look

One process, one opened index held in memory (``pack=False``: a command-line query never packs), torch on
``--threads`` threads. Each round times the same test triples answered one ``GradientIndex.query``
call each ("one by one") and in one call ("batched": each checkpoint's stored arrays scanned once
per batch of test triples, ``SCAN_BATCH``), alternating which goes first. Both are exact TracIn: the
benchmark checks that every list is the same (training rows in order) and reports the largest
relative difference of a printed influence (float32 rescoring of gradients computed in another batch
of test triples). Writes ``benchmarks/results/batch_query.json`` (``batch_query_1m.json`` for 1M training
triples); for at least 1,000 test triples, ``batch_speedup_100k`` (or ``batch_speedup_1m`` and
``batch_ms_per_test_triple_1m``) goes to ``summary.json``.

``--memory`` then answers the same test triples (from a fresh process of this script,
``--command-line-only``, whose own memory stays small: a child's peak RSS counts its parent's at fork) with the command line (``tracin-index query --test ...
--output x.jsonl``) in two processes, side by side: at its default settings (a memory budget of a quarter
of the memory available: an index whose stored arrays take more than a quarter of that is read from its
files in passes) and with ``--max-memory 1T`` (held in memory); each process's wall time and peak RSS
(``wait4``), and whether the two outputs list the same rows (influences within float32 rescoring). At 1M: ``query_peak_rss_mb_1m`` and
``query_default_vs_held_throughput_1m`` (held time over default time; 1 is as fast) go to ``summary.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PYSTOW_HOME", os.path.join(tempfile.gettempdir(), "pystow-bench"))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, QuietGuard, peak_rss_mb, run_measured, update_summary, write_results  # noqa: E402
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
    parser.add_argument("--memory", action="store_true", help="also compare the command line's default budget with held")
    parser.add_argument("--command-line-only", action="store_true",
                        help="only the --memory comparison, added to the results file of this size (from a small process)")
    args = parser.parse_args()
    if args.command_line_only:
        return command_line_only(args)
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
    index = GradientIndex.open(idx, pack=False, max_memory=2**40)  # held in memory: one by one reads nothing again
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
    name = "batch_query" if args.size == 100_000 else f"batch_query_{_name(args.size)}"
    path = write_results(name, {
        "settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "scan_batch": SCAN_BATCH,
                     "training": {k: trained.get(k) for k in ("loop", "epochs", "checkpoints", "train_seconds")},
                     "index_build_s_this_run": build_s, "packed": False},
        "figures": figures})  # fmt: skip
    if len(test) >= 1000 and same == len(test) and RESULTS.exists():
        if args.size == 100_000:
            update_summary({"batch_speedup_100k": round(speedup, 2)})
        if args.size == 1_000_000:
            update_summary({"batch_speedup_1m": round(speedup, 2), "batch_ms_per_test_triple_1m": round(ms["batched"], 1)})
    print(f"wrote {path}")
    if args.memory:  # from a fresh small process: a child's ru_maxrss counts this one's memory (the index) at fork
        del index, answers
        subprocess.run([sys.executable, __file__, "--command-line-only", "--size", str(args.size), "--epochs",
                        str(args.epochs), "--checkpoints", str(args.checkpoints), "--work", str(args.work), "--threads",
                        str(args.threads), "--rounds", str(args.rounds), "--max-wait", str(args.max_wait)], check=True)  # fmt: skip


def command_line_only(args) -> None:
    """The --memory comparison alone, run from this small process (a child's ru_maxrss counts the parent's memory
    at fork: measured from a process that holds an index, it would report at least that), into the results file.
    ``parent_peak_rss_mb``: this process's peak; spawned by a full run, it counts that run's memory at fork too,
    which the command lines it starts after its own exec do not."""
    import json

    idx = args.work / f"idx-{_name(args.size)}-e{args.epochs}-c{args.checkpoints}"
    data = args.work / _name(args.size, default_entities(args.size))
    name = "batch_query" if args.size == 100_000 else f"batch_query_{_name(args.size)}"
    path = RESULTS / f"{name}.json"
    results = json.loads(path.read_text())
    line = compare_budgets(idx, data / "test.tsv", results["figures"]["test_triples"], args)
    line["parent_peak_rss_mb"] = peak_rss_mb()
    results["figures"]["command_line"] = line
    results["command_line_command"] = " ".join([sys.executable, *sys.argv])
    write_results(name, results)
    if args.size == 1_000_000 and line["outputs_identical"] and RESULTS.exists():
        update_summary({"query_peak_rss_mb_1m": round(line["default"]["peak_rss_mb"], 1),
                        "query_default_vs_held_throughput_1m": round(line["default_vs_held_throughput"], 3)})
    print(f"wrote {path}")


def same_lines(ours: bytes, theirs: bytes) -> tuple[bool, float]:
    """Whether two JSONL outputs list the same training rows for every test triple, and the largest relative
    difference of a printed influence (float32 rescoring of gradients computed in other batches)."""
    import json

    a, b = ([json.loads(line) for line in text.splitlines()] for text in (ours, theirs))
    same, difference = len(a) == len(b) and a[0] == b[0], 0.0
    for x, y in zip(a[1:], b[1:]):
        for side in ("proponents", "opponents"):
            same = same and [i["train_index"] for i in x[side]] == [i["train_index"] for i in y[side]]
            for i, j in zip(x[side], y[side]):
                difference = max(difference, abs(i["influence"] - j["influence"]) / max(abs(j["influence"]), 1e-30))
    return same, difference


def compare_budgets(idx: Path, test_path: Path, count: int, args) -> dict:
    """The command line on the first ``count`` test triples, at its default memory budget and held in memory
    (``--max-memory 1T``), alternating which runs first; the medians of ``--rounds`` runs each."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    runs: dict[str, list[dict]] = {"default": [], "held": []}
    outputs: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as work:
        first = Path(work) / "test.tsv"  # the first ``count`` test triples, every row of which is answered
        first.write_text("".join(test_path.read_text().splitlines(keepends=True)[:count]))
        for r in range(args.rounds):
            for setting in (["default", "held"] if r % 2 == 0 else ["held", "default"]):
                out = Path(work) / f"{setting}.jsonl"
                out.unlink(missing_ok=True)
                cmd = [sys.executable, "-m", "tracin_index.cli", "query", str(idx), "--test", str(first), "--output",
                       str(out), "--device", "cpu"]  # fmt: skip
                cmd += ["--max-memory", "1T"] if setting == "held" else []
                QuietGuard(0.3, args.max_wait, 0).wait()
                measured = run_measured(cmd, env=env)
                if measured["returncode"] != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{measured['output_tail']}")
                runs[setting].append(measured)
                outputs[setting] = out.read_bytes()
                print(f"command line, {setting:<7}: {measured['wall_s']:.1f} s, peak RSS {measured['peak_rss_mb']:,.0f} MB",
                      flush=True)  # fmt: skip
    summary = {s: {"wall_s": statistics.median(m["wall_s"] for m in v), "peak_rss_mb": max(m["peak_rss_mb"] for m in v),
                   "runs": v} for s, v in runs.items()}  # fmt: skip
    summary["outputs_identical"], summary["largest_relative_influence_difference"] = same_lines(outputs["default"],
                                                                                                outputs["held"])
    summary["default_vs_held_throughput"] = summary["held"]["wall_s"] / summary["default"]["wall_s"]
    return summary


if __name__ == "__main__":
    main()
