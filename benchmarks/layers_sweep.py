"""How many last layers? A sweep of ``--num-last-layers`` 1, 2, 3, 5 against all parameters on UMLS ConvE (issue [3/5] item 5).

Run from the repository root (about three minutes on 2 cores; the model is cached under ``--work``,
shared with ``benchmarks/agreement.py``)::

    python benchmarks/layers_sweep.py

The setting is ``agreement.py``'s ``umls-conve`` (ConvE with PyKEEN's defaults, trained by
``tracin-index train`` with inverse triples, 3 checkpoints) and the same ``--num-test`` (50) test
triples; loss ``bce``; a training triple's gradient counts both its examples. ConvE's layers with
parameters, last first: ``interaction.hr1d.2`` (BatchNorm1d), ``hr1d.0`` (the Linear 10,368 -> 200),
``hr2d.3`` (BatchNorm2d), ``hr2d.2`` (the convolution), ``hr2d.0`` (BatchNorm2d): N = 5 is every layer
but the embeddings; "all" adds the entity and relation embeddings. Per selection:

- exact TracIn of every training triple on the test triples (``TracInAnalyzer.influence_scores``,
  one timed run under the quiet-machine guard);
- gradient throughput: ``GradientComputer.compute`` over all training triples at one checkpoint
  (training triples per second);
- the index with ``tracin-index build``'s defaults for that selection: bytes per triple and checkpoint;
- against all parameters: top-10 overlap of proponents and of opponents, and the Spearman
  correlation over the training triples that are proponents (all-parameter score > 0), and over the
  opponents (< 0), each averaged over the test triples.

Delta MRR in the remove-and-retrain test per N comes from ``faithfulness_defaults.py --methods
layers_1 layers_3 layers_5 layers_all --name faithfulness_layers``. ``best_n`` in the JSON is the N
with the highest mean top-10 overlap (proponents and opponents) with all parameters, the smaller N
on ties; the summary's ``layers_sweep_best_n`` is the N the README recommends
(``faithfulness_defaults.recommend_layers``: the smallest N that removes as well as the best, within
0.05 delta MRR, and finds the all-parameter proponents with an overlap of at least 0.8), and
``layers_sweep_top10_overlap_opponents`` its opponent overlap. Writes
``benchmarks/results/layers_sweep.json``.
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
from agreement import load_setting  # noqa: E402
from common import RESULTS, QuietGuard, command_line, machine_info, update_summary, versions, write_results  # noqa: E402
from last_vs_all import SETTING, overlaps  # noqa: E402

from tracin_index.exact import TracInAnalyzer  # noqa: E402
from tracin_index.gradients.computer import GradientComputer  # noqa: E402
from tracin_index.index import GradientIndex  # noqa: E402
from tracin_index.kg.runs import load_model  # noqa: E402

LAYERS = (1, 2, 3, 5)


def signed_spearman(scores: np.ndarray, reference: np.ndarray, sign: int) -> float:
    """Mean over test triples of the Spearman correlation over the training triples of that sign in ``reference``."""
    from scipy.stats import spearmanr

    values = []
    for x, y in zip(scores, reference):
        keep = (y * sign) > 0
        if keep.sum() > 2:
            values.append(float(spearmanr(x[keep], y[keep]).statistic))
    return float(np.mean(values)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-test", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tracin-bench")
    parser.add_argument("--max-wait", type=float, default=20.0, help="quiet-machine guard: seconds to wait")
    parser.add_argument("--retries", type=int, default=1, help="quiet-machine guard: re-runs of a disturbed run")
    parser.add_argument("--epochs", type=int, default=None, help=f"override {SETTING}'s training epochs (smoke runs)")
    parser.add_argument("--checkpoint-every", type=int, default=None, help=f"override {SETTING}'s checkpoint interval")
    parser.add_argument("--layers", type=int, nargs="+", default=list(LAYERS), help="the N to sweep (all parameters always)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    run_dir, run, train, test, picks = load_setting(args.work, SETTING, args.num_test, args.seed, args.epochs,
                                                    args.checkpoint_every)  # fmt: skip
    guard = QuietGuard(max_wait=args.max_wait, retries=args.retries)

    rows: dict[str, dict] = {}
    scores: dict[str, np.ndarray] = {}
    for key in [str(n) for n in args.layers] + ["all"]:
        model = load_model(run_dir).model  # each selection its own copy: requires_grad state is per model
        if key == "all":
            analyzer = TracInAnalyzer(model, checkpoints=run.checkpoints, use_last_layers_only=False)
        else:
            analyzer = TracInAnalyzer(model, checkpoints=run.checkpoints, num_last_layers=int(key))

        def exact(analyzer=analyzer):
            start = time.perf_counter()
            s = analyzer.influence_scores(test, train)
            return time.perf_counter() - start, s

        m = guard.measure(exact)
        scores[key] = m.result.cpu().numpy()
        run.checkpoints[-1].load_into(model)
        computer = GradientComputer(model.eval(), analyzer.selection, "bce")
        computer.compute(train[:256])  # warm-up
        start = time.perf_counter()
        for i in range(0, len(train), 256):
            computer.compute(train[i : i + 256])
        gradient_s = time.perf_counter() - start

        out = args.work / "idx" / "layers-sweep" / key
        if out.exists():
            shutil.rmtree(out)
        settings = {"selection": "all"} if key == "all" else {"num_last_layers": int(key)}
        build_start = time.perf_counter()
        GradientIndex.build(out, model_path=run_dir, device="cpu", **settings)
        build_s = time.perf_counter() - build_start
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        rows[key] = {
            "parameters": analyzer.selection.describe(),
            "num_parameters": analyzer.selection.num_parameters,
            "exact_seconds": m.seconds,
            "exact_foreign_cores": m.foreign,
            "gradient_triples_per_s": len(train) / gradient_s,
            "index_bytes_per_triple_checkpoint": size / (len(train) * len(run.checkpoints)),
            "build_seconds": build_s,
        }
        print(f"{key}: {rows[key]['parameters']}; exact {m.seconds:.1f} s, {rows[key]['gradient_triples_per_s']:,.0f} "
              f"triples/s, index {rows[key]['index_bytes_per_triple_checkpoint']:,.0f} B/triple/ckpt", flush=True)

    reference = scores["all"]
    for key, row in rows.items():
        pro, opp = overlaps(scores[key], reference, 10)
        row.update(top10_overlap_proponents=pro, top10_overlap_opponents=opp,
                   spearman_proponents=signed_spearman(scores[key], reference, +1),
                   spearman_opponents=signed_spearman(scores[key], reference, -1),
                   speed_vs_all=rows["all"]["exact_seconds"] / row["exact_seconds"])  # fmt: skip
    candidates = [str(n) for n in args.layers]
    best = max(candidates, key=lambda k: ((rows[k]["top10_overlap_proponents"] + rows[k]["top10_overlap_opponents"]) / 2, -int(k)))
    for key, row in rows.items():
        print(f"{key:>3}: overlap {row['top10_overlap_proponents']:.2f} / {row['top10_overlap_opponents']:.2f}, "
              f"Spearman {row['spearman_proponents']:.2f} / {row['spearman_opponents']:.2f}, {row['speed_vs_all']:.1f}x faster than all")
    data = {
        "machine": machine_info(),
        "versions": versions(),
        "command": command_line(),
        "settings": {"setting": SETTING, "num_test": len(test), "test_rows": picks.tolist(), "num_train": len(train),
                     "checkpoints": len(run.checkpoints), "loss": "bce", "threads": args.threads, "guard": guard.describe(),
                     "remove_and_retrain": "benchmarks/results/faithfulness_layers.json"},  # fmt: skip
        "results": rows,
        "best_n": int(best),
        "total_runtime_s": time.perf_counter() - started,
    }
    path = write_results("layers_sweep", data)
    from faithfulness_defaults import recommend_layers

    keys = recommend_layers(RESULTS)
    if keys:
        update_summary(keys)
    print(f"best N by overlap with all parameters: {best}; recommended (with remove-and-retrain): "
          f"{keys['layers_sweep_best_n'] if keys else 'not yet: run faithfulness_defaults.py for the layers'}; wrote {path}")


if __name__ == "__main__":
    main()
