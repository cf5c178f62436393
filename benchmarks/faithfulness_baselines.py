"""Faithfulness against what a user would try instead (issue 24, first step): remove each method's
explanations of a group of targets at once, retrain once, and compare the fall of the predictions with
paired statistics.

Run from the repository root::

    python benchmarks/faithfulness_baselines.py                    # the reported protocol
    python benchmarks/faithfulness_baselines.py --datasets nations --targets 4 --groups 2 --ks 1 3 --seeds 0 \\
        --epochs 3 --results-dir /tmp/fb --no-summary              # smoke

Protocol (Kelpie's grouped remove-and-retrain; training and evaluation are
``faithfulness_defaults.py``'s, imported):

- **Model**: per graph (``--datasets``: Nations, UMLS, Kinships), ConvE trained as ``tracin-index train``
  trains (``faithfulness_defaults.train``: PyKEEN sLCWA, Adam, inverse triples), seed = the first of
  ``--seeds``, four checkpoints.
- **Targets**: ``--targets`` test triples whose tail the full model ranks first (filtered), drawn with
  ``numpy.random.default_rng(first seed)`` as ``faithfulness_defaults`` draws them.
- **Removal sets** per target, the same k (``--ks``) for every method:

  - gradient methods (``faithfulness_defaults.removal_sets``): ``proponents`` (the index's default
    query), ``adam`` (TracInAnalyzer, Adam's preconditioner), ``cosine`` (``query(normalize=True)``),
    ``all_parameters`` (TracInAnalyzer over every parameter);
  - baselines without gradients (the functions below, each rule in its docstring): ``same_head_relation``,
    ``path_2hop``, ``same_tail_relation``, ``embedding_nearest``, ``random_neighbours``, ``random``.

- **Groups**: the targets are split into ``--groups`` groups whose removal sets overlap little
  (:func:`group_targets`). For each (method, k, group) the union of the group's removal sets is removed
  and the model retrained once; ``noise`` removes as many random facts as the proponents' union (the
  noise reference). ``--groups`` equal to ``--targets`` is the per-target protocol, so two runs give what
  grouping costs in precision.
- **Seeds**: every retrain is repeated with each of ``--seeds``; "before" for seed s is the retrain at
  seed s with nothing removed (at the first seed it is the full model). A target's delta is the mean over
  seeds of (after - before) of its reciprocal rank and Hits@1.
- **Statistics** (per graph and pooled over graphs): mean delta MRR and delta Hits@1 with 95% paired
  bootstrap intervals over targets (:func:`bootstrap_ci`), Wilcoxon signed-rank tests
  (:func:`paired_test`) of each method against the best baseline (the baseline with the lowest mean delta
  MRR at that k), of proponents against the noise reference and of the TracIn variants against each
  other, Holm's correction (:func:`holm`) over all
  the comparisons of a graph (and, separately, of the pool).
- **Cost**: seconds per explained prediction of each method (building the index counted with proponents).

Summary keys (k = the largest of ``--ks``; not with ``--no-summary``): ``faith3_delta_mrr_proponents_{graph}``,
``faith3_delta_mrr_proponents_{graph}_ci95``, ``faith3_delta_mrr_best_baseline_{graph}`` (with
``faith3_best_baseline_{graph}``, its name, and ``..._ci95``), ``faith3_proponents_beat_best_baseline`` (the
graphs where proponents' mean delta MRR is lower than the best baseline's with a Holm-adjusted p below 0.05)
and ``faith3_proponents_beat_best_baseline_pooled`` (the same over the pooled targets).
Writes ``<results-dir>/faithfulness_baselines.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import itertools
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PYSTOW_HOME", os.path.join(tempfile.gettempdir(), "pystow-bench"))

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

NAME = "faithfulness_baselines"
DATASETS = ("nations", "umls", "kinships")
#: this script's name -> the key ``faithfulness_defaults.removal_sets`` gives it
GRADIENT_METHODS = {"proponents": "proponents", "adam": "adam", "cosine": "normalized", "all_parameters": "layers_all"}
BASELINES = ("same_head_relation", "path_2hop", "same_tail_relation", "embedding_nearest", "random_neighbours", "random")
METHODS = tuple(GRADIENT_METHODS) + BASELINES
#: the noise reference: as many random facts as the proponents' union of the group
NOISE = "noise"


# -- baselines without gradients ---------------------------------------------------------------------
# Each takes the training facts ``train`` (n, 3) of (head, relation, tail) ids, the target (h, r, t), k and a
# seeded numpy Generator, and returns up to k training rows, the first the most relevant.


def _shuffled(rows: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    return [int(x) for x in rng.permutation(np.asarray(rows, dtype=np.int64))[:k]]


def same_head_relation(train: np.ndarray, target, k: int, rng: np.random.Generator) -> list[int]:
    """Facts (h, r, x) with the target's head and relation, any tail x != t: "what else does h r?".
    All are equally relevant: k of them in the order of ``rng.permutation`` (all of them when fewer)."""
    h, r, t = (int(v) for v in target)
    return _shuffled(np.flatnonzero((train[:, 0] == h) & (train[:, 1] == r) & (train[:, 2] != t)), k, rng)


def same_tail_relation(train: np.ndarray, target, k: int, rng: np.random.Generator) -> list[int]:
    """Facts (x, r, t) with the target's relation and tail, any head x != h: "who else r t?".
    Ties (all) broken by ``rng.permutation``; all of them when fewer than k."""
    h, r, t = (int(v) for v in target)
    return _shuffled(np.flatnonzero((train[:, 1] == r) & (train[:, 2] == t) & (train[:, 0] != h)), k, rng)


def path_2hop(train: np.ndarray, target, k: int, rng: np.random.Generator) -> list[int]:
    """Facts on the 2-hop paths from the head to the tail: h - m - t through an entity m not in {h, t},
    each step a training fact linking the two entities in either direction (any relation).

    Ranked by the number of such paths the fact lies on (a fact (h, ., m) lies on as many paths as there are
    facts linking m and t), most first; ties broken by ``rng.permutation``; all of them when fewer than k."""
    h, _, t = (int(v) for v in target)
    heads, tails = train[:, 0], train[:, 2]
    # facts touching h (resp. t) and the other entity of each
    near_h = np.flatnonzero(((heads == h) | (tails == h)) & (heads != tails))
    near_t = np.flatnonzero(((heads == t) | (tails == t)) & (heads != tails))
    other_h = np.where(heads[near_h] == h, tails[near_h], heads[near_h])
    other_t = np.where(heads[near_t] == t, tails[near_t], heads[near_t])
    keep_h, keep_t = ~np.isin(other_h, (h, t)), ~np.isin(other_t, (h, t))
    near_h, other_h, near_t, other_t = near_h[keep_h], other_h[keep_h], near_t[keep_t], other_t[keep_t]
    links_to_t = {m: int(c) for m, c in zip(*np.unique(other_t, return_counts=True))}
    links_to_h = {m: int(c) for m, c in zip(*np.unique(other_h, return_counts=True))}
    paths: dict[int, int] = {}
    for row, m in zip(near_h.tolist(), other_h.tolist()):
        if m in links_to_t:
            paths[row] = paths.get(row, 0) + links_to_t[m]
    for row, m in zip(near_t.tolist(), other_t.tolist()):
        if m in links_to_h:
            paths[row] = paths.get(row, 0) + links_to_h[m]
    if not paths:
        return []
    rows = rng.permutation(np.array(sorted(paths), dtype=np.int64))
    counts = np.array([paths[int(x)] for x in rows])
    return [int(rows[i]) for i in np.argsort(-counts, kind="stable")[:k]]


def embedding_nearest(train: np.ndarray, target, k: int, rng: np.random.Generator, entity_embeddings: np.ndarray) -> list[int]:
    """The k facts (h', r', t') nearest the target by entity-embedding similarity, any relation:
    cos(e_h, e_h') + cos(e_t, e_t') (rows of ``entity_embeddings``; complex ones as their real and imaginary
    parts), largest first; ties broken by ``rng.permutation``. ``rng`` only breaks ties."""
    h, _, t = (int(v) for v in target)
    e = np.asarray(entity_embeddings)
    if np.iscomplexobj(e):
        e = np.concatenate([e.real, e.imag], axis=1)
    e = e.reshape(len(e), -1).astype(np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    similarity = e[train[:, 0]] @ e[h] + e[train[:, 2]] @ e[t]
    order = rng.permutation(len(train))
    return [int(order[i]) for i in np.argsort(-similarity[order], kind="stable")[:k]]


def random_neighbours(train: np.ndarray, target, k: int, rng: np.random.Generator) -> list[int]:
    """k facts drawn uniformly without replacement from those that contain the target's head or tail (in
    either position), in the order of ``rng.permutation``; all of them when fewer than k."""
    h, _, t = (int(v) for v in target)
    touches = np.isin(train[:, 0], (h, t)) | np.isin(train[:, 2], (h, t))
    return _shuffled(np.flatnonzero(touches), k, rng)


def random_facts(train: np.ndarray, target, k: int, rng: np.random.Generator) -> list[int]:
    """k facts drawn uniformly without replacement from all training facts (``rng.choice``); the target
    is not looked at."""
    return [int(x) for x in rng.choice(len(train), size=min(k, len(train)), replace=False)]


def baseline_removals(name: str, train: np.ndarray, targets: np.ndarray, keys, k: int, seed: int,
                      entity_embeddings: np.ndarray | None = None) -> list[list[int]]:
    """Rule ``name``'s k rows per target; target i's Generator is ``default_rng([seed, keys[i], rule no.])``."""
    rules = {"same_head_relation": same_head_relation, "path_2hop": path_2hop, "same_tail_relation": same_tail_relation,
             "embedding_nearest": embedding_nearest, "random_neighbours": random_neighbours, "random": random_facts}  # fmt: skip
    rule, number = rules[name], BASELINES.index(name)
    out = []
    for key, target in zip(keys, targets):
        rng = np.random.default_rng([seed, int(key), 10 + number])
        extra = (entity_embeddings,) if name == "embedding_nearest" else ()
        out.append(rule(train, target, k, rng, *extra))
    return out


# -- groups ------------------------------------------------------------------------------------------


def group_targets(footprints: list[set[int]], groups: int, rng: np.random.Generator) -> list[list[int]]:
    """Split targets 0..n-1 into ``groups`` groups of sizes differing by at most one, greedily, so that
    the removal sets within a group overlap little.

    Targets are taken in the order of ``rng.permutation(n)``; each goes to the group, among those not yet
    full (capacity ceil(n / groups)), whose union of footprints shares the fewest rows with its footprint
    (``footprints[i]``: the union of target i's removal sets over the methods); ties go to the smaller
    group, then to the lower group number. Returns each group's targets in ascending order."""
    n = len(footprints)
    groups = max(1, min(groups, n))
    capacity = -(-n // groups)
    members: list[list[int]] = [[] for _ in range(groups)]
    unions: list[set[int]] = [set() for _ in range(groups)]
    for i in rng.permutation(n).tolist():
        open_groups = [g for g in range(groups) if len(members[g]) < capacity]
        g = min(open_groups, key=lambda g: (len(unions[g] & footprints[i]), len(members[g]), g))
        members[g].append(i)
        unions[g] |= footprints[i]
    return [sorted(m) for m in members]


# -- statistics --------------------------------------------------------------------------------------


def bootstrap_ci(values, resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the sample mean and the percentile bootstrap interval of the mean, from
    ``resamples`` resamples of the values with replacement (``default_rng(seed)``). Paired data: pass the
    per-target differences."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    means = x[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    return float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def paired_test(x, y) -> float:
    """Two-sided p of the Wilcoxon signed-rank test of the paired differences x - y (zero differences
    dropped, scipy's default); 1.0 when all differences are zero."""
    from scipy.stats import wilcoxon

    d = np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    if np.all(d == 0):
        return 1.0
    return float(wilcoxon(d, alternative="two-sided").pvalue)


def holm(pvalues) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: with p_(1) <= ... <= p_(m) sorted,
    adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return [float(v) for v in out]


def target_deltas(jobs: dict, groups: list[list[int]], after: dict, seeds, keys, n: int) -> dict:
    """Per-target deltas ``{f"{method}@{k}": {"rr": (n,), "hits1": (n,)}}``: target i's delta is the mean over
    ``seeds`` of after - before, where after is the retrain (seed, removed rows) of the job whose uses hold
    (method, k, i's group) and before is the retrain (seed, ()) with nothing removed.
    ``jobs``: removed rows -> uses [(method, k, group)]; ``after[(seed, rows)]``: target -> metrics."""
    out = {}
    for m, k in keys:
        rr, h1 = np.zeros(n), np.zeros(n)
        for rows, uses in jobs.items():
            for g in (g for mm, kk, g in uses if (mm, kk) == (m, k)):
                for i in groups[g]:
                    for seed in seeds:
                        a, b = after[(seed, rows)][i], after[(seed, ())][i]
                        rr[i] += (a["rr"] - b["rr"]) / len(seeds)
                        h1[i] += (a["hits1"] - b["hits1"]) / len(seeds)
        out[f"{m}@{k}"] = {"rr": rr, "hits1": h1}
    return out


def compare(deltas: dict[str, dict[str, np.ndarray]], ks, methods, seed: int) -> dict:
    """Tables and Holm-corrected comparisons from per-target deltas ``deltas[f"{method}@{k}"]["rr"|"hits1"]``."""
    tables = {}
    for key, d in deltas.items():
        mrr, lo, hi = bootstrap_ci(d["rr"], seed=seed)
        h1, h1_lo, h1_hi = bootstrap_ci(d["hits1"], seed=seed)
        tables[key] = {"n": len(d["rr"]), "delta_mrr": mrr, "delta_mrr_ci95": [lo, hi],
                       "delta_hits1": h1, "delta_hits1_ci95": [h1_lo, h1_hi]}  # fmt: skip
    comparisons, best = [], {}
    for k in ks:
        base = [b for b in BASELINES if b in methods and f"{b}@{k}" in tables]
        if base:
            best[k] = min(base, key=lambda b: tables[f"{b}@{k}"]["delta_mrr"])
            for m in methods:
                if m != best[k] and f"{m}@{k}" in tables:
                    comparisons.append((m, best[k], k))
        if "proponents" in methods and f"proponents@{k}" in tables and f"{NOISE}@{k}" in tables:
            comparisons.append(("proponents", NOISE, k))
        gradient = [m for m in GRADIENT_METHODS if m in methods and f"{m}@{k}" in tables]
        comparisons += [(a, b, k) for a, b in itertools.combinations(gradient, 2)]
    rows = []
    for a, b, k in comparisons:
        x, y = deltas[f"{a}@{k}"], deltas[f"{b}@{k}"]
        rows.append({"method": a, "against": b, "k": k, "mean_difference_mrr": float(np.mean(x["rr"] - y["rr"])),
                     "p_mrr": paired_test(x["rr"], y["rr"]), "p_hits1": paired_test(x["hits1"], y["hits1"])})  # fmt: skip
    for quantity in ("p_mrr", "p_hits1"):
        for row, adj in zip(rows, holm([r[quantity] for r in rows])):
            row[f"{quantity}_holm"] = adj
    return {"tables": tables, "best_baseline": {str(k): v for k, v in best.items()}, "comparisons": rows}


# -- one graph ---------------------------------------------------------------------------------------


def write_splits(dataset: str, work: Path) -> dict[str, Path]:
    """A bundled PyKEEN dataset's splits as labelled TSV files (as ``faithfulness_defaults.write_splits``
    writes Nations')."""
    from pykeen.datasets import get_dataset

    data = get_dataset(dataset=dataset)
    paths = {}
    work.mkdir(parents=True, exist_ok=True)
    for name, factory in (("train", data.training), ("valid", data.validation), ("test", data.testing)):
        labels = factory.label_triples(factory.mapped_triples)
        paths[name] = work / f"{name}.tsv"
        paths[name].write_text("".join("\t".join(row) + "\n" for row in labels.tolist()), encoding="utf-8")
    return paths


def run_graph(dataset: str, args, pool, log) -> dict:
    import torch
    from faithfulness_defaults import evaluate, known_tails, removal_sets, train

    from tracin_index.kg.runs import load_model
    from tracin_index.kg.triples import read_labeled_triples

    work = args.work / dataset
    splits = write_splits(dataset, work)
    known = known_tails(splits)
    first_seed = args.seeds[0]
    train_args = argparse.Namespace(epochs=args.epochs, lr=args.lr, seed=first_seed)
    t0 = time.perf_counter()
    run_dir = train(work / "full", splits, train_args, checkpoint_every=max(1, args.epochs // 4))
    train_s = time.perf_counter() - t0
    test_labels = [tuple(line.split("\t")) for line in splits["test"].read_text(encoding="utf-8").splitlines()]
    before_all = evaluate(run_dir, test_labels, known)
    first = np.array([i for i, row in enumerate(before_all) if row["rank"] == 1.0])
    rng = np.random.default_rng(first_seed)
    picks = np.sort(rng.choice(first, size=min(args.targets, len(first)), replace=False))
    targets = [test_labels[i] for i in picks]
    log(f"{dataset}: trained in {train_s:.1f} s; {len(first)}/{len(test_labels)} ranked first; {len(picks)} targets")

    run = load_model(run_dir)
    maps = run.resolve_id_maps(None, None)
    targets_ids = torch.tensor([[maps.entity_to_id[h], maps.relation_to_id[r], maps.entity_to_id[t]] for h, r, t in targets])
    train_ids = np.asarray(maps.to_ids(read_labeled_triples(run.training_path)))
    kmax = max(args.ks)

    removal, seconds = {}, {}
    wanted = [m for m in args.methods if m in GRADIENT_METHODS]
    info: dict = {}
    if wanted:
        grad_args = argparse.Namespace(ks=args.ks, seed=first_seed, methods=[GRADIENT_METHODS[m] for m in wanted])
        got, info = removal_sets(run_dir, work, targets_ids, picks, grad_args, log)
        for m in wanted:
            removal[m] = got[GRADIENT_METHODS[m]]
        timings = info["timings"]
        seconds["proponents"] = timings["index_build_s"] + timings["query_s"]
        seconds["cosine"] = timings["index_build_s"] + timings["query_s"]  # the same index, one query each
        seconds["adam"] = timings.get("adam_s")
        seconds["all_parameters"] = timings.get("layers_all_s")
    embeddings = run.model.entity_representations[0](indices=None).detach().cpu().numpy()
    for m in (m for m in args.methods if m in BASELINES):
        t0 = time.perf_counter()
        removal[m] = baseline_removals(m, train_ids, targets_ids.numpy(), picks, kmax, first_seed, embeddings)
        seconds[m] = time.perf_counter() - t0
    per_prediction_s = {m: (s / len(targets) if s is not None else None) for m, s in seconds.items() if m in removal}

    footprints = [set().union(*(set(removal[m][i]) for m in removal)) for i in range(len(targets))]
    groups = group_targets(footprints, args.groups, np.random.default_rng([first_seed, 7]))
    methods = [m for m in args.methods if m in removal]
    jobs: dict[tuple, list[tuple]] = {}  # removed rows -> uses (method, k, group)
    for k in args.ks:
        for g, members in enumerate(groups):
            for m in methods:
                rows = tuple(sorted(set().union(*(removal[m][i][:k] for i in members))))
                jobs.setdefault(rows, []).append((m, k, g))
            if "proponents" in removal:
                size = len(set().union(*(removal["proponents"][i][:k] for i in members)))
                noise = np.random.default_rng([first_seed, k, g, 99]).choice(len(train_ids), size=size, replace=False)
                jobs.setdefault(tuple(sorted(int(x) for x in noise)), []).append((NOISE, k, g))
    jobs.setdefault((), [])
    removed_sizes = {f"{m}@{k}": [len(rows) for rows, uses in jobs.items() for (mm, kk, _) in uses if (mm, kk) == (m, k)]
                     for m in methods + [NOISE] for k in args.ks}  # fmt: skip
    log(f"{dataset}: groups {groups}; {len(jobs)} distinct retrains x {len(args.seeds)} seeds")

    from faithfulness_defaults import retrain_task

    everyone = list(range(len(targets)))
    futures = {}
    for seed in args.seeds:
        seed_args = argparse.Namespace(epochs=args.epochs, lr=args.lr, seed=seed)
        for rows, uses in jobs.items():
            who = sorted({i for (_, _, g) in uses for i in groups[g]}) if rows else everyone
            task = (work, splits, seed_args, rows, [targets[i] for i in who])
            futures[pool.submit(retrain_task, task)] = (seed, rows, who)
    after: dict[tuple, dict] = {}
    retrain_seconds = []
    t0 = time.perf_counter()
    for done, future in enumerate(cf.as_completed(futures), 1):
        seed, rows, who = futures[future]
        _, metrics, s = future.result()
        retrain_seconds.append(s)
        after[(seed, rows)] = dict(zip(who, metrics))
        if done % 10 == 0 or done == len(futures):
            log(f"{dataset}: {done}/{len(futures)} retrains, {time.perf_counter() - t0:.0f} s")
    reproduced = max(abs(after[(first_seed, ())][i]["score"] - before_all[p]["score"]) for i, p in enumerate(picks))

    method_ks = [(m, k) for m in methods + ([NOISE] if "proponents" in removal else []) for k in args.ks]
    deltas = target_deltas(jobs, groups, after, args.seeds, method_ks, len(targets))
    stats = compare(deltas, args.ks, methods, seed=first_seed)
    return {
        "dataset": dataset, "train_s": train_s, "num_targets": len(targets), "targets": [list(t) for t in targets],
        "test_rows": picks, "groups": groups, "removal": {m: removal[m] for m in methods},
        "removed_rows_per_group": removed_sizes, "retrains": len(futures),
        "retrain_seconds_mean": float(np.mean(retrain_seconds)),
        "retrain_nothing_removed_max_abs_score_diff": reproduced,
        "seconds_per_explained_prediction": per_prediction_s,
        "index_plans": info.get("index_plans"), "overlap_with_proponents": info.get("overlap"),
        "deltas": {key: {q: v.tolist() for q, v in d.items()} for key, d in deltas.items()},
        **stats,
    }  # fmt: skip


def summary_keys(graphs: dict, pooled: dict, k: int) -> dict:
    keys = {}
    for name, g in graphs.items():
        t = g["tables"].get(f"proponents@{k}")
        best = g["best_baseline"].get(str(k))
        if t:
            keys[f"faith3_delta_mrr_proponents_{name}"] = round(t["delta_mrr"], 4)
            keys[f"faith3_delta_mrr_proponents_{name}_ci95"] = [round(v, 4) for v in t["delta_mrr_ci95"]]
        if best:
            b = g["tables"][f"{best}@{k}"]
            keys[f"faith3_delta_mrr_best_baseline_{name}"] = round(b["delta_mrr"], 4)
            keys[f"faith3_delta_mrr_best_baseline_{name}_ci95"] = [round(v, 4) for v in b["delta_mrr_ci95"]]
            keys[f"faith3_best_baseline_{name}"] = best
    def beats(stats: dict) -> bool | None:  # proponents lower MRR more than the best baseline, Holm p < 0.05
        best = stats["best_baseline"].get(str(k))
        row = next((r for r in stats["comparisons"] if r["method"] == "proponents" and r["against"] == best and r["k"] == k), None)
        return None if row is None else bool(row["mean_difference_mrr"] < 0 and row["p_mrr_holm"] < 0.05)

    keys["faith3_proponents_beat_best_baseline"] = [name for name, g in graphs.items() if beats(g)]  # the graphs where
    if beats(pooled) is not None:
        keys["faith3_proponents_beat_best_baseline_pooled"] = beats(pooled)
    return keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--targets", type=int, default=40, help="targets per graph")
    parser.add_argument("--groups", type=int, default=4, help="groups per graph (one retrain per group)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 3, 10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="retrain seeds (the first trains the full model)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--workers", type=int, default=2, help="retrain processes (1 torch thread each)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tracin-faith-baselines")
    parser.add_argument("--results-dir", type=Path, default=None, help="default benchmarks/results")
    parser.add_argument("--no-summary", action="store_true", help="do not update summary.json")
    args = parser.parse_args()

    import torch
    from common import RESULTS, cpu_counters, foreign_cores, update_summary, write_results
    from faithfulness import _init_worker

    torch.set_num_threads(1)  # as in the workers: the full model and the retrains compute alike
    results_dir = args.results_dir or RESULTS
    args.work.mkdir(parents=True, exist_ok=True)
    start, counters = time.perf_counter(), cpu_counters()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)

    graphs = {}
    context = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(args.workers, mp_context=context, initializer=_init_worker, initargs=(1,)) as pool:
        for dataset in args.datasets:
            graphs[dataset] = run_graph(dataset, args, pool, log)
    # pooled: the targets of all graphs side by side (the same method keys)
    keys = set.intersection(*(set(g["deltas"]) for g in graphs.values()))
    pooled_deltas = {key: {q: np.concatenate([np.asarray(g["deltas"][key][q]) for g in graphs.values()])
                           for q in ("rr", "hits1")} for key in sorted(keys)}  # fmt: skip
    pooled = compare(pooled_deltas, args.ks, list(args.methods), seed=args.seeds[0])
    for name, g in graphs.items():
        for key, t in sorted(g["tables"].items()):
            log(f"{name} {key:28s} dMRR {t['delta_mrr']:+.3f} [{t['delta_mrr_ci95'][0]:+.3f}, {t['delta_mrr_ci95'][1]:+.3f}]"
                f"  dHits@1 {t['delta_hits1']:+.3f}")  # fmt: skip
    keys_out = summary_keys(graphs, pooled, max(args.ks))
    data = {
        "protocol": {
            "datasets": args.datasets, "model": "ConvE (faithfulness_defaults.MODEL_KWARGS)",
            "training": "faithfulness_defaults.train (tracin_index.kg.training.train_run: PyKEEN sLCWA, Adam, inverse triples)",
            "epochs": args.epochs, "learning_rate": args.lr, "targets": args.targets, "groups": args.groups,
            "ks": args.ks, "seeds": args.seeds, "methods": args.methods, "workers": args.workers,
            "removal": "union of the group's removal sets, one retrain per (method, k, group, seed)",
            "noise": "as many random training facts as the proponents' union of the group",
            "statistics": "per-target deltas (mean over seeds); percentile bootstrap 10,000 resamples; "
                          "Wilcoxon signed-rank two-sided; Holm over each graph's (and the pool's) comparisons",
        },  # fmt: skip
        "graphs": graphs,
        "pooled": pooled,
        "summary_keys": keys_out,
        "wall_s": time.perf_counter() - start,
        "other_processes_cores_during_run": foreign_cores(counters, cpu_counters()),
    }
    path = write_results(NAME, data, results_dir=results_dir)
    if keys_out and not args.no_summary and Path(results_dir).resolve() == RESULTS.resolve():
        update_summary(keys_out)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
