"""Faithfulness under the tool's own defaults (issue [3/5] item 4): remove proponents, retrain through
PyKEEN's sLCWA loop, and see the prediction fall.

Run from the repository root (defaults are the reported settings)::

    python benchmarks/faithfulness_defaults.py
    python benchmarks/faithfulness_defaults.py --targets 4 --epochs 5 --results-dir /tmp/fd --no-summary   # smoke

``benchmarks/faithfulness.py`` measures with a lean 1-N loop, loss ``ce``, no inverse triples. Users get
something else: ``tracin-index train`` (PyKEEN's sLCWA loop, one negative per positive, ConvE's default
loss BCEAfterSigmoid, Adam, **inverse triples**), an index with its defaults (loss ``bce``, the last two
layers, float16 factors) and the default ``query``. This script measures that:

- **Model**: ConvE on Nations (small: embedding 64 = 8 x 8, 16 filters), trained by
  :func:`tracin_index.kg.training.train_run` from TSV files (ids numbered over all splits, so that a retrain
  without some training triples keeps them), ``--epochs`` (40), Adam ``--lr`` (0.005), batch 256, seed
  ``--seed``, checkpoints every ``--epochs / 4`` epochs, each with Adam's second moments.
- **Targets**: ``--targets`` (20) test triples whose tail the full model ranks first (filtered against
  train + valid + test), sampled with the seed; the explained prediction is the tail one (``--direction tail``).
- **Removal sets** (k = ``--ks``, default 10):

  - ``proponents``: the default ``query`` of a default index (exact TracIn; a training fact is both of
    its examples, (h, r, t) and (t, r_inv, h));
  - ``forward_only``: exact TracIn counting each fact's forward example only (what the tool did
    before inverse triples were handled);
  - ``adam``: ``TracInAnalyzer(optimizer="adam")`` (training gradients divided by Adam's root second moment);
  - ``normalized``: ``query(normalize=True)`` (cosine form);
  - ``random_neighbours``: k random training facts sharing an entity with the target; ``random``: k random facts.

- **Retrain**: the same call to ``train_run`` on the training file without the removed rows, same seed.
  PyKEEN shuffles the (now shorter) training set anew, so a retrain differs from the full model by more
  than the removal: ``random`` measures that noise. A retrain with nothing removed must reproduce the
  full model's scores (recorded).
- **Reported** per method: delta MRR and delta Hits@1 of the targets (after minus before; negative when
  they fall), the share of targets whose score drops, paired Wilcoxon tests of proponents against random
  neighbours (``faithfulness.summarise``).

Summary keys: ``faith_default_delta_mrr_proponents``, ``faith_default_delta_mrr_random_neighbours``,
``faith_default_delta_mrr_forward_only``, ``faith_default_delta_mrr_adam``,
``faith_default_delta_mrr_normalized`` (k = 10). Writes ``benchmarks/results/faithfulness_defaults.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PYSTOW_HOME", os.path.join(tempfile.gettempdir(), "pystow-bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, cpu_counters, foreign_cores, update_summary, write_results  # noqa: E402
from faithfulness import _init_worker, print_tables, random_removals, summarise, target_metrics  # noqa: E402

NAME = "faithfulness_defaults"
MODEL_KWARGS = {"embedding_dim": 64, "embedding_height": 8, "embedding_width": 8, "output_channels": 16}
METHODS = ("proponents", "forward_only", "adam", "normalized", "random_neighbours", "random")
#: ``--num-last-layers`` N (exact TracIn, N = 2 is the default ``proponents``) and all parameters
#: (issue [3/5] item 5): ``python benchmarks/faithfulness_defaults.py --methods layers_1 layers_3 layers_5
#: layers_all proponents random_neighbours --name faithfulness_layers``
LAYER_METHODS = ("layers_1", "layers_3", "layers_5", "layers_all")


# -- data, training, evaluation --------------------------------------------------------------------


def write_splits(work: Path) -> dict[str, Path]:
    """Nations' splits as labelled TSV files (what a user hands to ``tracin-index train``)."""
    from pykeen.datasets import Nations

    data = Nations()
    paths = {}
    for name, factory in (("train", data.training), ("valid", data.validation), ("test", data.testing)):
        labels = factory.label_triples(factory.mapped_triples)
        paths[name] = work / f"{name}.tsv"
        paths[name].write_text("".join("\t".join(row) + "\n" for row in labels.tolist()), encoding="utf-8")
    return paths


def train(out: Path, splits: dict[str, Path], args, removed=(), checkpoint_every: int | None = None) -> Path:
    """``train_run`` on the training file without the rows ``removed``."""
    from tracin_index.kg.training import train_run

    train_path = splits["train"]
    if len(removed):
        lines = splits["train"].read_text(encoding="utf-8").splitlines(keepends=True)
        gone = set(int(r) for r in removed)
        train_path = out.parent / f"{out.name}-train.tsv"
        train_path.write_text("".join(line for i, line in enumerate(lines) if i not in gone), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    return train_run(out, train_path=train_path, valid_path=splits["valid"], test_path=splits["test"], model="ConvE",
                     model_kwargs=dict(MODEL_KWARGS), epochs=args.epochs, checkpoint_every=checkpoint_every or args.epochs,
                     learning_rate=args.lr, batch_size=256, random_seed=args.seed, progress=False)  # fmt: skip


def known_tails(splits: dict[str, Path]) -> dict[tuple[str, str], set[str]]:
    known: dict[tuple[str, str], set[str]] = {}
    for path in splits.values():
        for line in path.read_text(encoding="utf-8").splitlines():
            h, r, t = line.split("\t")
            known.setdefault((h, r), set()).add(t)
    return known


@torch.no_grad()
def evaluate(run_dir: Path, targets: list[tuple[str, str, str]], known: dict) -> list[dict]:
    """Filtered tail rank (ties count half) of each target (labels), its score and log-probability,
    as the model predicts tails (its forward relation ids)."""
    from tracin_index.kg.runs import load_model

    run = load_model(run_dir)
    model, maps = run.model.eval(), run.resolve_id_maps(None, None)
    entity_of = {i: e for e, i in maps.entity_to_id.items()}
    rows = []
    for h, r, t in targets:
        hr = torch.tensor([[maps.entity_to_id[h], maps.relation_to_id[r]]])
        scores = model.score_t(model.relation_inverter.map(batch=hr)).view(-1).double()
        log_p = torch.log_softmax(scores, dim=0)
        row = target_metrics(scores, log_p, maps.entity_to_id[t], [maps.entity_to_id[x] for x in known[(h, r)]])
        rows.append({**row, "argmax": entity_of[row["argmax"]]})
    return rows


def retrain_task(task: tuple) -> tuple:
    """(work dir, splits, args, removed rows, targets) -> (removed, metrics per target, seconds)."""
    work, splits, args, removed, targets = task
    start = time.perf_counter()
    out = work / "retrains" / f"r-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    run = train(out, splits, args, removed)
    rows = evaluate(run, targets, known_tails(splits))
    return removed, rows, time.perf_counter() - start


# -- removal sets ------------------------------------------------------------------------------------


def forward_only_scores(run_dir: Path, targets_ids: torch.Tensor, train_ids: torch.Tensor) -> np.ndarray:
    """Exact TracIn with each training fact's forward example only (h, 2r, t), as before inverse triples
    were counted: sum_c lr_c <g_tail(target), g(h, 2r, t)>."""
    from tracin_index.gradients.computer import GradientComputer
    from tracin_index.gradients.selection import select_parameters
    from tracin_index.kg.directions import example_batches
    from tracin_index.kg.runs import load_model

    run = load_model(run_dir)
    model = run.model.eval()
    computer = GradientComputer(model, select_parameters(model, mode="last", num_last_layers=2), "bce")
    forward = example_batches(train_ids, True, "tail")[0]
    scores = torch.zeros(len(targets_ids), len(train_ids), dtype=torch.float64)
    for checkpoint in run.checkpoints:
        checkpoint.load_into(model)
        test = computer.compute(targets_ids, "tail")
        for start in range(0, len(forward), 256):
            g = computer.compute_examples(forward[start : start + 256])
            scores[:, start : start + 256] += checkpoint.learning_rate * test.dot(g).double()
    return scores.numpy()


def top_rows(scores: np.ndarray, k: int) -> list[list[int]]:
    """The k largest positive scores' rows per target (ties by row)."""
    out = []
    for s in scores:
        order = np.lexsort((np.arange(len(s)), -s))
        out.append([int(r) for r in order if s[r] > 0][:k])
    return out


def removal_sets(run_dir: Path, work: Path, targets_ids: torch.Tensor, picks: np.ndarray, args, log) -> tuple[dict, dict]:
    """Each method's removal sets: per target, its rows in order (the top k are the first k)."""
    from tracin_index.exact import TracInAnalyzer
    from tracin_index.index import GradientIndex
    from tracin_index.kg.runs import load_model
    from tracin_index.kg.triples import read_labeled_triples

    kmax = max(args.ks)
    run = load_model(run_dir)
    train_ids = run.resolve_id_maps(None, None).to_ids(read_labeled_triples(run.training_path))
    removal, timings, info_layers = {}, {}, {}
    t0 = time.perf_counter()
    index_dir = work / "index"
    if index_dir.exists():
        shutil.rmtree(index_dir)
    index = GradientIndex.build(index_dir, model_path=run_dir)
    timings["index_build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    removal["proponents"] = [[p.train_index for p in r.proponents] for r in index.query(targets_ids, top_k=kmax)]
    timings["query_s"] = time.perf_counter() - t0
    removal["normalized"] = [[p.train_index for p in r.proponents]
                             for r in index.query(targets_ids, top_k=kmax, normalize=True)]  # fmt: skip
    if "forward_only" in args.methods:
        t0 = time.perf_counter()
        removal["forward_only"] = top_rows(forward_only_scores(run_dir, targets_ids, train_ids), kmax)
        timings["forward_only_s"] = time.perf_counter() - t0
    if "adam" in args.methods:
        t0 = time.perf_counter()
        analyzer = TracInAnalyzer(run.model, checkpoints=run.checkpoints, optimizer="adam")
        removal["adam"] = top_rows(analyzer.influence_scores(targets_ids, train_ids).numpy(), kmax)
        timings["adam_s"] = time.perf_counter() - t0
    for method in (m for m in args.methods if m in LAYER_METHODS):
        t0 = time.perf_counter()
        n = method.split("_")[1]
        analyzer = TracInAnalyzer(run.model, checkpoints=run.checkpoints, use_last_layers_only=n != "all",
                                  num_last_layers=int(n) if n != "all" else 2)  # fmt: skip
        removal[method] = top_rows(analyzer.influence_scores(targets_ids, train_ids).numpy(), kmax)
        timings[f"{method}_s"] = time.perf_counter() - t0
        info_layers[method] = analyzer.selection.describe()

    removal["random_neighbours"], removal["random"] = random_removals(train_ids, targets_ids, picks, args.seed, kmax)
    overlap = {}
    for method in (m for m in args.methods if m not in ("proponents", "random", "random_neighbours")):
        for k in args.ks:
            overlap[f"{method}_vs_proponents_top{k}"] = float(np.mean(
                [len(set(a[:k]) & set(b[:k])) / k for a, b in zip(removal[method], removal["proponents"])]))  # fmt: skip
    log(f"removal sets: {timings}; overlap with proponents: {overlap}")
    return removal, {"timings": timings, "overlap": overlap, "index_plans": index.manifest["plans"],
                     "index_parameters": index.selection.describe(), "layer_selections": info_layers}  # fmt: skip


# -- the recommended number of last layers -----------------------------------------------------------

#: Delta MRRs within this of the best count as equal (random removals moved it by 0.16 here).
MRR_TIE = 0.05
#: ... and the recommended N must find the all-parameter proponents this well (layers_sweep.py).
MIN_PROPONENT_OVERLAP = 0.8


def recommend_layers(results_dir: Path) -> dict | None:
    """The N the README recommends (issue [3/5] item 5): the smallest N whose remove-and-retrain delta MRR
    at k = 10 is within :data:`MRR_TIE` of the best N's and whose top-10 proponents overlap all-parameter
    TracIn's at least :data:`MIN_PROPONENT_OVERLAP` (``layers_sweep.json``); N = 2 is the default
    ``proponents`` of ``faithfulness_defaults.json``. Returns the summary keys, or None without the inputs."""
    import json

    paths = [results_dir / f"{name}.json" for name in ("faithfulness_layers", "faithfulness_defaults", "layers_sweep")]
    if not all(p.is_file() for p in paths):
        return None
    layers, defaults, sweep = (json.loads(p.read_text(encoding="utf-8")) for p in paths)
    delta = {n: layers["tables"].get(f"layers_{n}@10", {}).get("delta_mrr") for n in ("1", "3", "5", "all")}
    delta["2"] = defaults["tables"]["proponents@10"]["delta_mrr"]
    delta = {n: d for n, d in delta.items() if d is not None}
    best = min(delta.values())
    overlap = {n: sweep["results"][n]["top10_overlap_proponents"] for n in delta if n != "all" and n in sweep["results"]}
    fit = [int(n) for n in overlap if delta[n] <= best + MRR_TIE and overlap[n] >= MIN_PROPONENT_OVERLAP]
    if not fit:
        return None
    n = str(min(fit))
    return {"layers_sweep_best_n": int(n),
            "layers_sweep_top10_overlap_opponents": round(sweep["results"][n]["top10_overlap_opponents"], 3),
            "layers_faith_delta_mrr": {k: round(v, 3) for k, v in sorted(delta.items())}}  # fmt: skip


# -- main --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", type=int, default=20)
    parser.add_argument("--ks", type=int, nargs="+", default=[10])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="retrain processes (1 torch thread each)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tracin-faith-defaults")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS + LAYER_METHODS))
    parser.add_argument("--name", default=NAME, help="results file name (benchmarks/results/<name>.json)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--no-summary", action="store_true", help="do not update summary.json")
    parser.add_argument("--recommend", action="store_true",
                        help="only recompute the recommended number of last layers from the results files")
    args = parser.parse_args()
    if args.recommend:
        keys = recommend_layers(args.results_dir)
        print(keys)
        if keys and not args.no_summary:
            update_summary(keys)
        return
    torch.set_num_threads(1)  # as in the workers: the full model and the retrains compute alike
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    counters = cpu_counters()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)

    splits = write_splits(args.work)
    known = known_tails(splits)
    t0 = time.perf_counter()
    run_dir = train(args.work / "full", splits, args, checkpoint_every=max(1, args.epochs // 4))
    train_s = time.perf_counter() - t0
    test_labels = [tuple(line.split("\t")) for line in splits["test"].read_text(encoding="utf-8").splitlines()]
    before_all = evaluate(run_dir, test_labels, known)
    first = np.array([i for i, row in enumerate(before_all) if row["rank"] == 1.0])
    test_mrr = float(np.mean([row["rr"] for row in before_all]))
    rng = np.random.default_rng(args.seed)
    picks = np.sort(rng.choice(first, size=min(args.targets, len(first)), replace=False))
    targets = [test_labels[i] for i in picks]
    before = [before_all[i] for i in picks]
    log(f"trained in {train_s:.1f} s; test MRR {test_mrr:.3f}; {len(first)}/{len(test_labels)} ranked first; "
        f"{len(picks)} targets")  # fmt: skip

    from tracin_index.kg.runs import load_model

    maps = load_model(run_dir).resolve_id_maps(None, None)
    targets_ids = torch.tensor([[maps.entity_to_id[h], maps.relation_to_id[r], maps.entity_to_id[t]] for h, r, t in targets])
    removal, info = removal_sets(run_dir, args.work, targets_ids, picks, args, log)

    jobs: dict[tuple, list[tuple[str, int, int]]] = {}
    for method in args.methods:
        for k in args.ks:
            for i, rows in enumerate(removal[method]):
                jobs.setdefault(tuple(sorted(rows[:k])), []).append((method, k, i))
    tasks = [(removed, sorted({i for _, _, i in uses})) for removed, uses in jobs.items()]
    tasks.append(((), list(range(len(targets)))))  # nothing removed: must reproduce the full model
    log(f"{len(tasks)} distinct retrains")
    after = {(m, k): [None] * len(targets) for m in args.methods for k in args.ks}
    reproduced, seconds = None, []
    t0 = time.perf_counter()
    context = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(args.workers, mp_context=context, initializer=_init_worker, initargs=(1,)) as pool:
        futures = {pool.submit(retrain_task, (args.work, splits, args, removed, [targets[i] for i in who])): (removed, who)
                   for removed, who in tasks}  # fmt: skip
        for done, future in enumerate(cf.as_completed(futures), 1):
            removed, who = futures[future]
            _, rows, s = future.result()
            seconds.append(s)
            by_target = dict(zip(who, rows))
            if not removed:
                reproduced = max(abs(by_target[i]["score"] - before[i]["score"]) for i in by_target)
            else:
                for method, k, i in jobs[removed]:
                    after[(method, k)][i] = by_target[i]
            if done % 20 == 0 or done == len(tasks):
                log(f"{done}/{len(tasks)} retrains, {time.perf_counter() - t0:.0f} s")
    summary = summarise({"before": before}, after, args)
    result = {"num_targets": len(targets), "tables": summary["tables"], "wilcoxon": summary["wilcoxon"]}
    print_tables("nations-conve-defaults", result)
    others = foreign_cores(counters, cpu_counters())
    if args.name == NAME:
        keys = {f"faith_default_delta_mrr_{method}": summary["tables"].get(f"{method}@10", {}).get("delta_mrr")
                for method in ("proponents", "random_neighbours", "forward_only", "adam", "normalized")}  # fmt: skip
    else:  # the layers sweep's remove-and-retrain: the recommended N (with layers_sweep.json's overlaps)
        keys = {}
    data = {
        "protocol": {
            "dataset": "nations", "model": "ConvE", "model_kwargs": MODEL_KWARGS, "training": "tracin_index.kg.training.train_run "
            "(PyKEEN sLCWA, 1 negative per positive, BCEAfterSigmoidLoss, Adam, inverse triples)",
            "epochs": args.epochs, "learning_rate": args.lr, "batch_size": 256, "seed": args.seed, "ks": args.ks,
            "targets": args.targets, "workers": args.workers, "methods": list(args.methods),
            "index": "GradientIndex defaults (loss bce, last 2 layers), default query, direction tail",
            "rank": "filtered tail rank among all entities, ties count half",
        },  # fmt: skip
        "full_model_test_mrr_filtered_tail": test_mrr,
        "test_triples_ranked_first": len(first),
        "num_test": len(test_labels),
        "train_s": train_s,
        "retrain_nothing_removed_max_abs_score_diff": reproduced,
        "retrain_seconds_mean": float(np.mean(seconds)),
        "retrains": len(tasks),
        **info,
        **result,
        "per_target": [{"target": list(t), "before": b, "removed": {m: removal[m][i] for m in args.methods},
                        "after": {f"{m}@{k}": after[(m, k)][i] for m in args.methods for k in args.ks}}
                       for i, (t, b) in enumerate(zip(targets, before))],  # fmt: skip
        "summary_keys": keys,
        "wall_s": time.perf_counter() - start,
        "other_processes_cores_during_run": others,
    }
    path = write_results(args.name, data, results_dir=args.results_dir)
    if args.name != NAME:
        keys = recommend_layers(args.results_dir) or {}
    if keys and not args.no_summary and Path(args.results_dir).resolve() == RESULTS.resolve():
        update_summary(keys)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
