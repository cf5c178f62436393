"""Agreement of the gradient index with exact TracIn (issue item 1), and the default projection dim.

Run from the repository root (defaults are the reported settings)::

    python benchmarks/agreement.py

Settings (each trained once with :func:`tracin_index.train.train_run` and cached under
``--work``, default ``/tmp/tracin-bench``, so that a rerun only redoes what is missing):

- ``umls-conve``: ConvE (PyKEEN defaults, embedding_dim 200) on bundled UMLS, 12 epochs, a
  checkpoint every 4 (3 checkpoints), Adam lr 0.001, sLCWA; parameters: the last 2 layers
  (``interaction.hr1d.0`` Linear 10368 -> 200 and the BatchNorm1d ``interaction.hr1d.2``).
- ``kinships-conve``: the same on bundled Kinships.
- ``umls-distmult``: DistMult (PyKEEN defaults, embedding_dim 50) on UMLS, 30 epochs, a checkpoint
  every 10, Adam lr 0.01 (lr 0.001 leaves it barely trained in 30 epochs); it has no
  non-embedding layer, so "last layers" falls back to the entity and relation embeddings (rows).

Per setting: 50 test triples (a seeded random sample of the test split, ``--num-test``), the
exact TracIn matrix over all training triples from
``TracInAnalyzer(model, checkpoints=run.checkpoints, use_last_layers_only=True).influence_scores``
(loss ``bce``), then for every projection dim (``--dims``) a
``GradientIndex.build(..., projection_dim=d, index_type="flat")`` (default float16 shards, seed 0;
d = 128 ... 32768: 8192 was the planned cap, 16384 and 32768 were added because no dim up to 8192
reaches the target), and at ``--extra-dims`` (default 2048 4096 8192) also ``flat-fp16``, ``ivf``
and ``hnsw`` with their library defaults (ivf: nlist 4 sqrt(N), nprobe nlist/8; hnsw: M 32, efSearch 128); their
FAISS index is built by ``GradientIndex.build`` into a copy of the flat index's directory, which
reuses its complete shards: the stored vectors are the same, only the search differs). Skipped to
keep the time down: the non-flat types below 2048 and above 8192.

Measured per (setting, dim, index type):

- ``recall@k`` (k = 10, 50) of proponents and of opponents: the share of the index's top-k whose
  exact score is at least the k-th best exact score (tie-aware; without exact ties it is
  |index top-k ∩ exact top-k| / k, which is also given as ``set_recall_*``), averaged over the test
  triples (exact scores within 1e-6 of the largest |score| count as tied: float32 round-off);
  index top-k from ``query(test, top_k=k)``;
- the same with ``query(test, top_k=50, rerank=100)`` (100 candidates each way rescored exactly;
  its top-10 is the first 10 of its top-50, which is what ``top_k=10, rerank=100`` returns);
- ``spearman``: Spearman rank correlation between the projected score of every training triple
  (query vector @ stored vectors, all N rows; read from the shards) and the exact score, averaged
  over the test triples (scipy.stats.spearmanr). It depends on the stored vectors only, so it is
  given per dim (the flat row).

``recall_at_10`` of a row = mean of proponent and opponent recall@10. The default projection dim
is the smallest dim whose flat ``recall_at_10`` is at least 0.9 on *every* ConvE setting (UMLS and
Kinships), without rerank. Writes ``benchmarks/results/agreement.json``, the plots
``benchmarks/results/agreement_<setting>.png`` and the summary keys ``default_projection_dim``,
``recall_at_10_default``, ``recall_at_10_rerank`` and ``spearman_default`` (the last three: the
mean over the ConvE settings at that dim, flat index).
"""

from __future__ import annotations

import argparse
import json
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
from common import update_summary, write_results  # noqa: E402

from tracin_index.analyzer import TracInAnalyzer  # noqa: E402
from tracin_index.index import DEFAULT_PROJECTION_DIM, GradientIndex  # noqa: E402
from tracin_index.models import load_model  # noqa: E402
from tracin_index.store import ShardTask, read_shard  # noqa: E402
from tracin_index.train import train_run  # noqa: E402
from tracin_index.triples import read_labeled_triples  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TARGET_RECALL = 0.9
TARGET_RERANK = 1.0
RERANK = 100
TIE_TOLERANCE = 1e-6

RUNS = {
    "umls-conve": dict(dataset="umls", model="ConvE", epochs=12, checkpoint_every=4),
    "kinships-conve": dict(dataset="kinships", model="ConvE", epochs=12, checkpoint_every=4),
    "umls-distmult": dict(dataset="umls", model="DistMult", epochs=30, checkpoint_every=10, learning_rate=0.01),
}
CONVE = ("umls-conve", "kinships-conve")


def ensure_run(work: Path, name: str) -> Path:
    out = work / "runs" / name
    if not (out / "model.pt").is_file():
        if out.exists():
            shutil.rmtree(out)
        start = time.perf_counter()
        train_run(out, progress=False, **RUNS[name])
        print(f"{name}: trained in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def exact_scores(work: Path, name: str, run_dir: Path, test: torch.Tensor, train: torch.Tensor) -> tuple[np.ndarray, float]:
    cache = work / "exact" / f"{name}-{len(test)}.npz"
    if cache.is_file():
        data = np.load(cache)
        if np.array_equal(data["test"], test.numpy()):
            return data["scores"], float(data["seconds"])
    run = load_model(run_dir)
    analyzer = TracInAnalyzer(run.model, checkpoints=run.checkpoints, use_last_layers_only=True)
    start = time.perf_counter()
    scores = analyzer.influence_scores(test, train).cpu().numpy()
    seconds = time.perf_counter() - start
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, test=test.numpy(), scores=scores, seconds=seconds)
    return scores, seconds


def build(work: Path, name: str, run_dir: Path, dim: int, index_type: str) -> tuple[GradientIndex, float, bool]:
    """The index (built or reopened); seconds of the build call; whether it was cached."""
    out = work / "idx" / name / f"d{dim}-{index_type}"
    if (out / "manifest.json").is_file() and json.loads((out / "manifest.json").read_text()).get("complete"):
        return GradientIndex.open(out, use_gpu=False), 0.0, True
    if index_type != "flat":
        flat = work / "idx" / name / f"d{dim}-flat"
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(flat, out, ignore=shutil.ignore_patterns("faiss.index", ".lock", "*.tmp"))
    start = time.perf_counter()
    index = GradientIndex.build(out, model_path=run_dir, projection_dim=dim, index_type=index_type, progress=False)
    return index, time.perf_counter() - start, False


def stored_vectors(index: GradientIndex) -> np.ndarray:
    """(N, D) float32: per shard, the checkpoints' vectors side by side, as the FAISS index holds them."""
    shards = sorted({(s["shard"], s["row_start"], s["row_stop"]) for s in index.manifest["shards"]})
    blocks = []
    for shard, _, _ in shards:
        parts = [read_shard(index.directory / ShardTask(c, shard, 0, 0).relative_path)[0]
                 for c in range(index.num_checkpoints)]  # fmt: skip
        blocks.append(np.hstack(parts).astype(np.float32))
    return np.concatenate(blocks)


def spearman_rows(a: np.ndarray, b: np.ndarray) -> list[float]:
    from scipy.stats import spearmanr

    return [float(spearmanr(x, y).statistic) for x, y in zip(a, b)]


def recall(found: list[list[int]], exact: np.ndarray, k: int, sign: int) -> float:
    """Tie-aware recall@k: the share of the first k found rows whose exact score (times ``sign``: +1
    proponents, -1 opponents) is at least the k-th best exact score, averaged over the test triples.

    Without ties in the exact scores this is |found top-k ∩ exact top-k| / k. With ties at the k-th
    place (DistMult: most training triples share no embedding row with the test triple and score
    exactly 0) any of the tied rows is a correct answer, where plain set overlap would count an
    arbitrary tie-break. Scores within ``TIE_TOLERANCE`` times the largest |score| of the k-th
    count as tied (float32 round-off).
    """
    values = []
    for rows, scores in zip(found, exact):
        s = sign * scores
        threshold = np.partition(s, len(s) - k)[len(s) - k]
        # float32 round-off: the rerank's exact scores and the analyzer's differ in the 7th digit
        tolerance = TIE_TOLERANCE * float(np.abs(s).max() or 1.0)
        values.append(sum(1 for r in rows[:k] if s[r] >= threshold - tolerance) / k)
    return float(np.mean(values))


def set_recall(found: list[list[int]], exact: np.ndarray, k: int, sign: int) -> float:
    """Plain |found top-k ∩ exact top-k| / k (exact ties broken by row order), for reference."""
    order = np.argsort(-sign * exact, axis=1, kind="stable")[:, :k]
    return float(np.mean([len(set(f[:k]) & set(o.tolist())) / k for f, o in zip(found, order)]))


def measure(index: GradientIndex, test: torch.Tensor, exact: np.ndarray, rerank: bool) -> dict:
    row = {}
    runs = [(k, "", dict(top_k=k)) for k in (10, 50)]
    if rerank:
        runs.append((None, "rerank_", dict(top_k=50, rerank=RERANK)))
    for k, prefix, kwargs in runs:
        start = time.perf_counter()
        results = index.query(test, **kwargs)
        row[f"{prefix}query_seconds" + (f"_k{k}" if k else "")] = time.perf_counter() - start
        pro = [[i.train_index for i in r.proponents] for r in results]
        opp = [[i.train_index for i in r.opponents] for r in results]
        # top-10 of a rerank is the first 10 of its top-50 (same candidates); without rerank each k is its own query
        for kk in ((10, 50) if k is None else (k,)):
            row[f"{prefix}recall_pro_{kk}"] = recall(pro, exact, kk, +1)
            row[f"{prefix}recall_opp_{kk}"] = recall(opp, exact, kk, -1)
            row[f"{prefix}set_recall_pro_{kk}"] = set_recall(pro, exact, kk, +1)
            row[f"{prefix}set_recall_opp_{kk}"] = set_recall(opp, exact, kk, -1)
    for prefix in ("", "rerank_") if rerank else ("",):
        for kk in (10, 50):
            row[f"{prefix}recall_at_{kk}"] = (row[f"{prefix}recall_pro_{kk}"] + row[f"{prefix}recall_opp_{kk}"]) / 2
    return row


def run_setting(work: Path, name: str, dims: list[int], extra_dims: list[int], extra_types: list[str],
                num_test: int, seed: int) -> dict:  # fmt: skip
    run_dir = ensure_run(work, name)
    run = load_model(run_dir)
    train = run.id_maps.to_ids(read_labeled_triples(run.training_path))
    test_all = run.id_maps.to_ids(read_labeled_triples(run.test_path))
    picks = np.sort(np.random.default_rng(seed).choice(len(test_all), size=min(num_test, len(test_all)), replace=False))
    test = test_all[torch.as_tensor(picks)]
    exact, exact_seconds = exact_scores(work, name, run_dir, test, train)
    print(f"{name}: {len(train)} training triples, {len(test)} test triples, exact in {exact_seconds:.1f} s", flush=True)
    zero_share = float(np.mean(exact == 0))
    # test triples with fewer than k training triples of negative (positive) exact score: their
    # top-k opponents (proponents) are partly ties at 0
    short = {f"{side}_fewer_than_{k}": int(np.sum(np.sum(sign * exact > 0, axis=1) < k))
             for k in (10, 50) for side, sign in (("opponents", -1), ("proponents", 1))}  # fmt: skip
    rows = []
    for dim in dims:
        types = ["flat"] + ([t for t in extra_types] if dim in extra_dims else [])
        spearman = None
        for index_type in types:
            index, seconds, cached = build(work, name, run_dir, dim, index_type)
            row = {"setting": name, "dim": dim, "index_type": index_type,
                   "dim_per_checkpoint": index.manifest["projection"]["dim_per_checkpoint"],
                   "index_dim": index.manifest["index"]["dim"],
                   "blocks": index.manifest["projection"]["blocks"],
                   # None: reused from an earlier run's cache (build cost: benchmarks/build_cost.py)
                   "build_seconds": None if cached else seconds}  # fmt: skip
            row.update(measure(index, test, exact, rerank=True))
            if index_type == "flat":
                projected = index.query_vectors(test) @ stored_vectors(index).T
                per_test = spearman_rows(projected, exact)
                spearman = float(np.nanmean(per_test))
                row["spearman_min"] = float(np.nanmin(per_test))
                row["pearson"] = float(np.mean([np.corrcoef(p, e)[0, 1] for p, e in zip(projected, exact)]))
            row["spearman"] = spearman
            rows.append(row)
            print(f"{name} d={dim:5d} {index_type:9s} r@10 pro {row['recall_pro_10']:.3f} opp {row['recall_opp_10']:.3f} "
                  f"r@50 pro {row['recall_pro_50']:.3f} opp {row['recall_opp_50']:.3f} | rerank r@10 "
                  f"{row['rerank_recall_at_10']:.3f} r@50 {row['rerank_recall_at_50']:.3f} | spearman {spearman:.3f}"
                  f" | build {seconds:.1f} s{' (cached)' if cached else ''}", flush=True)  # fmt: skip
            del index
    config = json.loads((run_dir / "config.json").read_text())
    return {"setting": name, "train_settings": RUNS[name], "model": config.get("model"),
            "model_kwargs": config.get("model_kwargs"), "training": config.get("training"),
            "num_train": int(len(train)), "num_test": int(len(test)), "test_rows": picks.tolist(),
            "checkpoints": [{"epoch": c.epoch, "learning_rate": c.learning_rate} for c in run.checkpoints],
            "exact_seconds": exact_seconds, "exact_zero_share": zero_share, "test_triples_with": short, "rows": rows}  # fmt: skip


def choose_default(settings: list[dict]) -> dict:
    conve = [s for s in settings if s["setting"] in CONVE]
    flat = {(r["setting"], r["dim"]): r for s in conve for r in s["rows"] if r["index_type"] == "flat"}
    dims = sorted({d for _, d in flat})
    chosen = None
    for dim in dims:
        rows = [flat.get((s["setting"], dim)) for s in conve]
        if all(r is not None and r["recall_at_10"] >= TARGET_RECALL for r in rows):
            chosen = dim
            break
    out = {"rule": f"smallest dim whose flat mean(proponent, opponent) recall@10 >= {TARGET_RECALL} on every ConvE setting "
                   f"({', '.join(s['setting'] for s in conve)}), without rerank",
           "default_projection_dim": chosen, "code_default_projection_dim": DEFAULT_PROJECTION_DIM}  # fmt: skip
    for label, dim in (("chosen", chosen), ("code_default", DEFAULT_PROJECTION_DIM)):
        rows = [flat.get((s["setting"], dim)) for s in conve] if dim else []
        if rows and all(rows):
            out[label] = {
                "dim": dim,
                "recall_at_10": float(np.mean([r["recall_at_10"] for r in rows])),
                "recall_at_10_min": float(min(min(r["recall_pro_10"], r["recall_opp_10"]) for r in rows)),
                "recall_at_10_rerank": float(np.mean([r["rerank_recall_at_10"] for r in rows])),
                "recall_at_50_rerank": float(np.mean([r["rerank_recall_at_50"] for r in rows])),
                "spearman": float(np.mean([r["spearman"] for r in rows])),
            }
    return out


def plot(settings: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for s in settings:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, prefix, title in ((axes[0], "", "index only"), (axes[1], "rerank_", f"rerank {RERANK}")):
            for index_type, style in (("flat", "-"), ("flat-fp16", "--"), ("ivf", ":"), ("hnsw", "-.")):
                rows = sorted((r for r in s["rows"] if r["index_type"] == index_type), key=lambda r: r["dim"])
                if not rows:
                    continue
                dims = [r["dim"] for r in rows]
                for key, marker in (("pro_10", "o"), ("opp_10", "s"), ("pro_50", "^"), ("opp_50", "v")):
                    if index_type != "flat" and key.endswith("50"):
                        continue
                    ax.plot(dims, [r[f"{prefix}recall_{key}"] for r in rows], style, marker=marker, markersize=4,
                            label=f"{index_type} {key.replace('_', '@')}")  # fmt: skip
            ax.axhline(TARGET_RECALL, color="grey", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("projection dim (per layer and checkpoint)")
            ax.set_title(f"{s['setting']}: {title}")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("recall vs exact TracIn")
        axes[1].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = RESULTS / f"agreement_{s['setting']}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path.relative_to(REPO)))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--dims", nargs="+", type=int, default=[128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--extra-dims", nargs="+", type=int, default=[2048, 4096, 8192])
    parser.add_argument("--extra-types", nargs="*", default=["flat-fp16", "ivf", "hnsw"])
    parser.add_argument("--num-test", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch and FAISS threads (the machine is shared)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tracin-bench")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    settings = [run_setting(args.work, name, args.dims, args.extra_dims, args.extra_types, args.num_test, args.seed)
                for name in args.settings]  # fmt: skip
    default = choose_default(settings)
    chosen = default.get("chosen", {})
    targets = {
        "recall_at_10_default_at_least_0.9": chosen.get("recall_at_10", 0) >= TARGET_RECALL if chosen else False,
        "recall_at_10_rerank_is_1.0": chosen.get("recall_at_10_rerank", 0) >= TARGET_RERANK if chosen else False,
    }
    data = {
        "benchmark": "agreement",
        "description": "gradient index vs exact TracIn: recall@10/50 of proponents and opponents, Spearman, rerank",
        "settings": {"dims": args.dims, "extra_dims": args.extra_dims, "extra_types": args.extra_types,
                     "num_test": args.num_test, "seed": args.seed, "rerank": RERANK, "threads": args.threads,
                     "loss": "bce", "selection": "last (2 layers; DistMult: embeddings)", "dtype": "float16",
                     "projection": "gaussian, seed 0, principal_fraction 0.75 (library defaults)"},  # fmt: skip
        "results": settings,
        "default": default,
        "targets": {"recall_at_10_default": TARGET_RECALL, "recall_at_10_rerank": TARGET_RERANK, "met": targets},
        "seconds": time.perf_counter() - start,
        "plots": plot(settings),
    }
    summary = {
        "default_projection_dim": default["default_projection_dim"],
        "recall_at_10_default": chosen.get("recall_at_10"),
        "recall_at_10_rerank": chosen.get("recall_at_10_rerank"),
        "spearman_default": chosen.get("spearman"),
    }
    write_results("agreement", data)
    update_summary(summary)
    print(json.dumps({"default": default, "summary": summary, "targets": targets}, indent=2))


if __name__ == "__main__":
    main()
