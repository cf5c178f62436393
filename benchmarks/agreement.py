"""Agreement of the index's default query with exact TracIn, and what the sketch dim trades (issue [1/5] item 6).

Run from the repository root (defaults are the reported settings; about 15 minutes on 2 cores)::

    python benchmarks/agreement.py

Settings (each trained once with :func:`tracin_index.kg.training.train_run` and cached under ``--work``,
default ``/tmp/tracin-bench``, so that a rerun only redoes what is missing):

- ``umls-conve``: ConvE (PyKEEN defaults, embedding_dim 200, trained with inverse triples as
  ``tracin-index train`` does) on bundled UMLS, 12 epochs, a checkpoint every 4 (3 checkpoints),
  Adam lr 0.001, sLCWA; parameters: the last 2 layers (``interaction.hr1d.0`` Linear 10368 -> 200
  and the BatchNorm1d ``interaction.hr1d.2``).
- ``kinships-conve``: the same on bundled Kinships.
- ``umls-distmult``: DistMult (PyKEEN defaults, embedding_dim 50) on UMLS, 30 epochs, a checkpoint
  every 10, Adam lr 0.01; it has no non-embedding layer, so "last layers" falls back to the entity
  and relation embeddings (kept as sparse rows).

Per setting: ``--num-test`` (50) test triples, a seeded sample of the test split; the exact TracIn
matrix over all training triples from ``TracInAnalyzer(...).influence_scores`` (loss ``bce``, cached);
an index with the defaults of ``tracin-index build`` (sketch dim 128, or 256 where 128 directions
leave over 10% of the sampled inputs' energy out), and for the ConvE settings also at sketch dims
``--dims`` (32, 64, 256). Measured per index:

- size: bytes of the whole index directory per training triple and checkpoint;
- the default query (``index.query(test, top_k=10)``: candidates from the bounds, rescored exactly):
  recall@10 of proponents and of opponents against the exact matrix (tie-aware, see :func:`recall`),
  the largest relative difference of a printed influence from the exact score, candidates rescored
  per test triple, seconds per test triple (a warm index, after one warm-up query);
- ``candidates=K`` (K = 10, 20, 50, 100): the K best estimates each way rescored: recall@10, time;
- ``approximate=True``: recall@10 of the estimates themselves; and the Spearman correlation of the
  estimates of all rows with the exact scores (mean over test triples).

Writes ``benchmarks/results/agreement.json`` and, through ``common.update_accuracy_summary``, the summary
keys ``recall_at_10_proponents``/``recall_at_10_opponents`` (lowest over UMLS, Kinships and the 1M
graph of ``scale.py``, default query) and ``index_bytes_per_triple_ckpt`` (largest over the ConvE settings).
"""

from __future__ import annotations

import argparse
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
from common import command_line, machine_info, update_accuracy_summary, versions, write_results  # noqa: E402

from tracin_index.exact import TracInAnalyzer  # noqa: E402
from tracin_index.index import GradientIndex  # noqa: E402
from tracin_index.kg.runs import load_model  # noqa: E402
from tracin_index.kg.training import train_run  # noqa: E402
from tracin_index.kg.triples import read_labeled_triples  # noqa: E402

TIE_TOLERANCE = 1e-6
FIXED_CANDIDATES = (10, 20, 50, 100)

RUNS = {
    "umls-conve": dict(dataset="umls", model="ConvE", epochs=12, checkpoint_every=4),
    "kinships-conve": dict(dataset="kinships", model="ConvE", epochs=12, checkpoint_every=4),
    "umls-distmult": dict(dataset="umls", model="DistMult", epochs=30, checkpoint_every=10, learning_rate=0.01),
}
CONVE = ("umls-conve", "kinships-conve")


def run_spec(name: str, epochs: int | None = None, checkpoint_every: int | None = None) -> tuple[str, dict]:
    """(the name the run is cached under, its ``train_run`` settings): the setting's ``RUNS`` entry with
    ``--epochs`` / ``--checkpoint-every`` overrides (smoke runs), cached apart from the reported run."""
    spec = dict(RUNS[name])
    if epochs is None and checkpoint_every is None:
        return name, spec
    spec["epochs"] = spec["epochs"] if epochs is None else epochs
    spec["checkpoint_every"] = spec["checkpoint_every"] if checkpoint_every is None else checkpoint_every
    return f"{name}-e{spec['epochs']}-c{spec['checkpoint_every']}", spec


def ensure_run(work: Path, name: str, epochs: int | None = None, checkpoint_every: int | None = None) -> Path:
    key, spec = run_spec(name, epochs, checkpoint_every)
    out = work / "runs" / key
    if not (out / "model.pt").is_file():
        if out.exists():
            shutil.rmtree(out)
        start = time.perf_counter()
        train_run(out, progress=False, **spec)
        print(f"{key}: trained in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def exact_scores(work: Path, name: str, run_dir: Path, test: torch.Tensor, train: torch.Tensor) -> tuple[np.ndarray, float]:
    from tracin_index.storage.layout import FORMAT_VERSION

    # keyed by the index format too: format 3 counts both examples of a model trained with inverse triples
    cache = work / "exact" / f"{name}-{len(test)}-v{FORMAT_VERSION}.npz"
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


def recall(found: list[list[int]], exact: np.ndarray, k: int, sign: int) -> float:
    """Tie-aware recall@k of one list kind, averaged over test triples.

    The rows of the sign (proponents +1, opponents -1) that deserve a place are those whose exact
    score times ``sign`` is positive and at least the k-th best such score; ties within
    ``TIE_TOLERANCE`` x the largest |score| count as equal (float32 round-off; DistMult has exact
    ties). Recall = found rows among the first k that deserve a place / min(k, rows of that sign).
    Without ties it is |found top-k ∩ exact top-k| / k.
    """
    values = []
    for rows, scores in zip(found, exact):
        s = sign * scores
        positive = np.sort(s[s > 0])[::-1]
        if len(positive) == 0:
            values.append(1.0 if not rows else 0.0)
            continue
        threshold = positive[min(k, len(positive)) - 1] - TIE_TOLERANCE * float(np.abs(s).max())
        values.append(sum(1 for r in rows[:k] if s[r] > 0 and s[r] >= threshold) / min(k, len(positive)))
    return float(np.mean(values))


def query_rows(results) -> tuple[list[list[int]], list[list[int]]]:
    return ([[i.train_index for i in r.proponents] for r in results], [[i.train_index for i in r.opponents] for r in results])


def largest_relative_error(results, exact: np.ndarray) -> float:
    worst = 0.0
    for t, r in enumerate(results):
        scale = float(np.abs(exact[t]).max()) or 1.0
        for item in r.proponents + r.opponents:
            worst = max(worst, abs(item.influence - exact[t, item.train_index]) / scale)
    return worst


def measure(index: GradientIndex, test: torch.Tensor, exact: np.ndarray) -> dict:
    index.query(test[:1])  # warm-up: loads the stored factors and the model at every checkpoint
    row: dict = {}
    start = time.perf_counter()
    results = index.query(test, top_k=10)
    seconds = time.perf_counter() - start
    pro, opp = query_rows(results)
    row["default"] = {
        "recall_at_10_proponents": recall(pro, exact, 10, +1),
        "recall_at_10_opponents": recall(opp, exact, 10, -1),
        "largest_relative_error": largest_relative_error(results, exact),
        "candidates_per_test_triple_mean": float(np.mean(index.last_query.rescored)),
        "candidates_per_test_triple_max": int(np.max(index.last_query.rescored)),
        "seconds_per_test_triple": seconds / len(test),
    }
    row["fixed_candidates"] = {}
    for k in FIXED_CANDIDATES:
        start = time.perf_counter()
        pro, opp = query_rows(index.query(test, top_k=10, candidates=k))
        row["fixed_candidates"][str(k)] = {"recall_at_10_proponents": recall(pro, exact, 10, +1),
                                           "recall_at_10_opponents": recall(opp, exact, 10, -1),
                                           "seconds_per_test_triple": (time.perf_counter() - start) / len(test)}  # fmt: skip
    start = time.perf_counter()
    pro, opp = query_rows(index.query(test, top_k=10, approximate=True))
    row["approximate"] = {"recall_at_10_proponents": recall(pro, exact, 10, +1), "recall_at_10_opponents": recall(opp, exact, 10, -1),
                          "seconds_per_test_triple": (time.perf_counter() - start) / len(test)}  # fmt: skip
    from scipy.stats import spearmanr

    grads = index.test_gradients(test)
    rho = [float(spearmanr(index.estimates(grads, t)[0].numpy(), exact[t]).statistic) for t in range(len(test))]
    row["approximate"]["spearman_mean"] = float(np.mean(rho))
    return row


def load_setting(work: Path, name: str, num_test: int, seed: int, epochs: int | None = None,
                 checkpoint_every: int | None = None):  # fmt: skip
    """(run directory, loaded run, training ids, test ids, test rows): the setting's run (trained if
    missing; ``epochs`` / ``checkpoint_every`` override its training, see :func:`run_spec`) and a seeded
    sample of ``num_test`` of its test triples, the same in every benchmark."""
    run_dir = ensure_run(work, name, epochs, checkpoint_every)
    run = load_model(run_dir)
    train = run.id_maps.to_ids(read_labeled_triples(run.training_path))
    test_all = run.id_maps.to_ids(read_labeled_triples(run.test_path))
    picks = np.sort(np.random.default_rng(seed).choice(len(test_all), size=min(num_test, len(test_all)), replace=False))
    return run_dir, run, train, test_all[torch.as_tensor(picks)], picks


def run_setting(work: Path, name: str, dims: list[int], num_test: int, seed: int, epochs: int | None = None,
                checkpoint_every: int | None = None) -> dict:  # fmt: skip
    run_dir, run, train, test, _ = load_setting(work, name, num_test, seed, epochs, checkpoint_every)
    exact, exact_s = exact_scores(work, run_dir.name, run_dir, test, train)  # cached per run (overrides apart)
    entry = {"training_triples": len(train), "checkpoints": len(run.checkpoints), "test_triples": len(test),
             "exact_analyzer_seconds": exact_s, "indexes": {}}  # fmt: skip
    for dim in ([None] + dims) if name in CONVE else [None]:  # None: the default (the build chooses 128 or 256)
        key = "default" if dim is None else str(dim)
        out = work / "idx" / name / f"k{key}"
        if out.exists():
            shutil.rmtree(out)
        start = time.perf_counter()
        index = GradientIndex.build(out, model_path=run_dir, sketch_dim=dim, device="cpu")
        build_s = time.perf_counter() - start
        index = GradientIndex.open(out, device="cpu")
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        chosen = max((d for p in index.plans for d in p.sketch), default=0)
        row = {"sketch_dim": chosen, "sketch_dim_asked": dim, "build_seconds": build_s, "index_bytes": size,
               "bytes_per_triple_checkpoint": size / (len(train) * len(run.checkpoints)),
               "plans": index.manifest["plans"], **measure(index, test, exact)}  # fmt: skip
        entry["indexes"][key] = row
        d = row["default"]
        print(f"{name} k={key} ({chosen}): {row['bytes_per_triple_checkpoint']:.0f} B/triple/ckpt, recall@10 "
              f"{d['recall_at_10_proponents']:.3f}/{d['recall_at_10_opponents']:.3f}, candidates "
              f"{d['candidates_per_test_triple_mean']:.0f} (max {d['candidates_per_test_triple_max']}), "
              f"{1000 * d['seconds_per_test_triple']:.1f} ms/query", flush=True)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tracin-bench")
    parser.add_argument("--settings", nargs="+", default=list(RUNS))
    parser.add_argument("--dims", type=int, nargs="+", default=[32, 64, 256])
    parser.add_argument("--num-test", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None, help="override every setting's training epochs (smoke runs)")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="override every setting's checkpoint interval")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    machine = machine_info()
    settings = {name: run_setting(args.work, name, args.dims, args.num_test, args.seed, args.epochs, args.checkpoint_every)
                for name in args.settings}  # fmt: skip
    results = {
        "machine": machine,
        "versions": versions(),
        "command": command_line(),
        "settings": {name: run_spec(name, args.epochs, args.checkpoint_every)[1] for name in args.settings},
        "results": settings,
        "total_runtime_s": time.perf_counter() - started,
    }
    path = write_results("agreement", results)
    update_accuracy_summary()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
