"""Last-layer vs all-parameter exact TracIn on UMLS ConvE (issue item 4): agreement and speed.

Run from the repository root (defaults are the reported settings)::

    python benchmarks/last_vs_all.py

The original description says last-layer rankings are "comparable" to full-gradient ones. Same
run as ``benchmarks/agreement.py`` (``umls-conve``: ConvE, PyKEEN defaults, UMLS, 12 epochs, a
checkpoint every 4 -> 3 checkpoints; cached under ``--work``), the same 50 test triples (seeded
sample of the test split), loss ``bce``, all 5,216 training triples:

- ``last``: ``TracInAnalyzer(model, checkpoints=..., use_last_layers_only=True)`` (the final Linear
  ``interaction.hr1d.0`` and BatchNorm1d ``interaction.hr1d.2``);
- ``all``: ``use_last_layers_only=False``: every parameter (entity/relation embeddings as touched
  rows, the conv and batch-norm layers dense, the Linear factored).

Agreement per test triple, averaged: top-10 and top-50 overlap of proponents and of opponents
(|top_k(last) ∩ top_k(all)| / k), Spearman over all training triples, Pearson, and the
cosine of the two score vectors. ``last_vs_all_top10_overlap`` = mean of the proponent and opponent
top-10 overlaps.

Speed: ``influence_scores(test, train)`` of each analyzer, interleaved (last, all, last, all, ...)
``--repeats`` times (default 3) in one process, each run under the quiet-machine guard of
``common.QuietGuard``; medians. ``last_vs_all_speedup`` = median seconds of ``all`` / median
seconds of ``last``. Writes ``benchmarks/results/last_vs_all.json``, ``last_vs_all.png`` and the
summary keys.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agreement import load_setting  # noqa: E402
from common import REPO, RESULTS, QuietGuard, update_summary, write_results  # noqa: E402

from tracin_index.exact import TracInAnalyzer  # noqa: E402
from tracin_index.kg.runs import load_model  # noqa: E402

SETTING = "umls-conve"


def overlaps(a: np.ndarray, b: np.ndarray, k: int) -> tuple[float, float]:
    """Mean top-k overlap of proponents (largest) and of opponents (most negative) between score matrices."""
    pro, opp = [], []
    for x, y in zip(a, b):
        pro.append(len(set(np.argsort(-x, kind="stable")[:k]) & set(np.argsort(-y, kind="stable")[:k])) / k)
        opp.append(len(set(np.argsort(x, kind="stable")[:k]) & set(np.argsort(y, kind="stable")[:k])) / k)
    return float(np.mean(pro)), float(np.mean(opp))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-test", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--max-wait", type=float, default=20.0, help="quiet-machine guard: seconds to wait")
    parser.add_argument("--retries", type=int, default=1, help="quiet-machine guard: re-runs of a disturbed run")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tracin-bench")
    parser.add_argument("--epochs", type=int, default=None, help=f"override {SETTING}'s training epochs (smoke runs)")
    parser.add_argument("--checkpoint-every", type=int, default=None, help=f"override {SETTING}'s checkpoint interval")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    run_dir, run, train, test, picks = load_setting(args.work, SETTING, args.num_test, args.seed, args.epochs,
                                                    args.checkpoint_every)  # fmt: skip

    analyzers = {
        "last": TracInAnalyzer(run.model, checkpoints=run.checkpoints, use_last_layers_only=True),
        # its own model copy: the two selections must not share requires_grad state or weights
        "all": TracInAnalyzer(load_model(run_dir).model, checkpoints=run.checkpoints, use_last_layers_only=False),
    }
    parameters = {name: a.selection.parameter_names for name, a in analyzers.items()}
    counts = {name: int(sum(m.num_parameters for m in a.selection.modules)) for name, a in analyzers.items()}

    guard = QuietGuard(max_wait=args.max_wait, retries=args.retries)
    scores: dict[str, np.ndarray] = {}
    timings: dict[str, list[dict]] = {"last": [], "all": []}
    for repeat in range(args.repeats):
        for name in (("last", "all") if repeat % 2 == 0 else ("all", "last")):

            def timed(name=name):
                start = time.perf_counter()
                s = analyzers[name].influence_scores(test, train)
                return time.perf_counter() - start, s

            m = guard.measure(timed)
            scores[name] = m.result.cpu().numpy()
            timings[name].append({"seconds": m.seconds, "foreign_cores": m.foreign, "attempts": m.attempts,
                                  "waited_s": m.waited, "foreign_per_attempt": m.foreign_per_attempt})  # fmt: skip
            print(f"repeat {repeat + 1} {name:4s} {m.seconds:7.2f} s (others used {m.foreign} cores)", flush=True)

    from scipy.stats import spearmanr

    last, full = scores["last"], scores["all"]
    result = {}
    for k in (10, 50):
        pro, opp = overlaps(last, full, k)
        result[f"top{k}_overlap_proponents"] = pro
        result[f"top{k}_overlap_opponents"] = opp
        result[f"top{k}_overlap"] = (pro + opp) / 2
    per_test_spearman = [float(spearmanr(x, y).statistic) for x, y in zip(last, full)]
    result["spearman"] = float(np.mean(per_test_spearman))
    result["spearman_min"] = float(np.min(per_test_spearman))
    result["spearman_per_test"] = per_test_spearman
    result["pearson"] = float(np.mean([np.corrcoef(x, y)[0, 1] for x, y in zip(last, full)]))
    result["cosine"] = float(np.mean([x @ y / (np.linalg.norm(x) * np.linalg.norm(y)) for x, y in zip(last, full)]))
    result["sign_agreement"] = float(np.mean(np.sign(last) == np.sign(full)))
    medians = {name: statistics.median(t["seconds"] for t in timings[name]) for name in timings}
    speedup = medians["all"] / medians["last"]

    plots = []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        t = int(np.argsort(per_test_spearman)[len(per_test_spearman) // 2])  # the median test triple
        axes[0].scatter(full[t], last[t], s=3, alpha=0.5)
        axes[0].set_xlabel("all parameters")
        axes[0].set_ylabel("last 2 layers")
        axes[0].set_title(f"TracIn of every training triple, test triple {int(picks[t])} (median Spearman)")
        axes[0].title.set_fontsize(8)
        axes[1].hist(per_test_spearman, bins=20)
        axes[1].set_xlabel("Spearman(last, all) per test triple")
        axes[1].set_title(f"{len(test)} UMLS ConvE test triples; speed ratio all/last {speedup:.1f}x")
        axes[1].title.set_fontsize(8)
        fig.tight_layout()
        path = RESULTS / "last_vs_all.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        # relative to the repository where it lies there (TRACIN_BENCH_RESULTS may put it elsewhere)
        plots.append(str(path.resolve().relative_to(REPO)) if path.resolve().is_relative_to(REPO) else str(path))
    except ImportError:
        pass

    data = {
        "description": "last-layer vs all-parameter exact TracIn on UMLS ConvE: overlap, rank correlation, speed",
        "settings": {"setting": SETTING, "num_test": len(test), "test_rows": picks.tolist(), "num_train": len(train),
                     "checkpoints": [{"epoch": c.epoch, "learning_rate": c.learning_rate} for c in run.checkpoints],
                     "loss": "bce", "repeats": args.repeats, "threads": args.threads, "guard": guard.describe()},  # fmt: skip
        "parameters": parameters,
        "num_parameters": counts,
        "agreement": result,
        "timings": timings,
        "median_seconds": medians,
        "speedup_all_over_last": speedup,
        "plots": plots,
    }
    write_results("last_vs_all", data)
    summary = {"last_vs_all_top10_overlap": result["top10_overlap"], "last_vs_all_speedup": speedup}
    update_summary(summary)
    print({k: v for k, v in result.items() if k != "spearman_per_test"}, medians, summary)


if __name__ == "__main__":
    main()
