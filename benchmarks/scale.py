"""Exact answers at scale on trained models: a planted synthetic graph of 100,000 and 1,000,000 triples (issue [1/5] items 4-5).

Run from the repository root (defaults are the reported settings; about an hour on 2 cores the first
time, a third of it training, which is cached under ``--work``)::

    python benchmarks/scale.py

Per size (``--sizes``, default 100000 1000000):

1. **Data**: :func:`synthetic.planted_graph` (seed ``--seed``): entities in 20 types of clusters of
   10, 200 relations each mapping the clusters of one type onto those of another, Zipf-like relation
   and head popularity, 5% noise; 2,000 test triples. 20 training triples per entity (``--entities``
   overrides): 50,000 entities for 1M triples, 5,000 for 100k, so that both models can learn the
   same way (100k triples over 50,000 entities leave 2 per entity, and a ConvE trained on that
   for 3 epochs ranks test triples no better than chance: kept as a stress case, see the README).
2. **Model**: ConvE (PyKEEN defaults: embedding_dim 200, 32 filters, so the last Linear is
   10,368 -> 200), trained by :func:`train_sampled_softmax`: 1-N softmax cross-entropy against the
   batch's tails plus ``--negatives`` (4,096) sampled ones, Adam lr ``--lr`` (0.003), batch
   ``--train-batch`` (1024), ``--epochs`` (5) epochs, ``--checkpoints`` (3) of them spread evenly
   (after epochs 2, 3 and 5), without inverse triples
   (the index explains tail predictions either way). ``--train-loop slcwa`` trains through
   :func:`tracin_index.kg.training.train_run` instead (PyKEEN's sLCWA, one negative per positive: after 3
   epochs, 97 min, the 1M model ranked test triples barely better than chance). Cached.
   Reported: its filtered tail-prediction MRR and Hits@10 on ``--mrr-test`` (500) test triples
   against all entities, and the random-ranking MRR for comparison.
3. **Build**: ``tracin-index build`` with its defaults in a subprocess (wall time, peak RSS from
   ``wait4``), the index's bytes per triple and checkpoint, and the build per checkpoint against one
   sLCWA training epoch of the model (timed on the first 100,000 training triples and scaled to all).
4. **Queries** in a subprocess: ``GradientIndex.open(..., pack=True)``, one untimed warm-up query (which
   packs the stored arrays for fbgemm: reported as ``first_query_s``), then
   ``--queries`` (50) single-triple ``index.query(triple, top_k=10)`` calls, timed one by one (p50,
   p95), with the candidates each rescored exactly; the cold time of the command line
   (``tracin-index query IDX --test ... --test-indices i``, imports and loading included, median of 3).
5. **Exact reference**: ``TracInAnalyzer.influence_scores`` over all training triples for
   ``--exact-test`` (20) of the same test triples (one pass, timed); recall@10 of the index's
   proponents and opponents against it (tie-aware, as in ``agreement.py``).

Writes ``benchmarks/results/scale.json`` and the summary keys ``query_p50_ms_warm_100k``,
``query_p50_ms_warm_1m``, ``scale_trained_test_mrr`` (1M), ``query_speedup_vs_exact_1m`` (the exact
pass per test triple over the warm query p50), ``build_peak_rss_mb_1m``, and (via
``common.update_accuracy_summary``) the recall and size keys.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("PYSTOW_HOME", os.path.join(tempfile.gettempdir(), "pystow-bench"))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402,E501
    RESULTS,
    QuietGuard,
    command_line,
    machine_info,
    run_measured,
    run_measured_from_small_process,
    update_accuracy_summary,
    update_summary,
    versions,
    write_json_atomic,
    write_results,
)
from synthetic import labels, planted_graph  # noqa: E402

TARGET_P50_MS = {100_000: 50.0, 1_000_000: 300.0}


def _name(n: int, entities: int | None = None) -> str:
    size = f"{n // 1_000_000}m" if n % 1_000_000 == 0 else f"{n // 1000}k"
    return size if entities is None or entities == default_entities(n) else f"{size}-{entities // 1000}k-entities"


def default_entities(n: int) -> int:
    """20 training triples per entity: the 1M graph's 50,000 entities, 5,000 for 100k."""
    return max(1000, n // 20)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def ensure_data(work: Path, n: int, entities: int, seed: int) -> Path:
    import numpy as np

    data = work / _name(n, entities)
    if not (data / "test.tsv").is_file():
        data.mkdir(parents=True, exist_ok=True)
        train, valid, test = planted_graph(n, num_entities=entities, seed=seed)
        for name, rows in (("train", train), ("valid", valid), ("test", test)):
            np.savetxt(data / f"{name}.tsv", labels(rows), fmt="%s", delimiter="\t")
    return data


def ensure_model(data: Path, args) -> tuple[Path, dict]:
    run, record = data / "run", data / "train_time.json"
    cached = json.loads(record.read_text()) if record.is_file() else {}
    wanted = {"loop": args.train_loop, "epochs": args.epochs, "checkpoints": args.checkpoints}
    if not (run / "model.pt").is_file() or any(cached.get(k) != v for k, v in wanted.items()):
        if run.exists():
            import shutil

            shutil.rmtree(run)
        start = time.perf_counter()
        if args.train_loop == "slcwa":
            from tracin_index.kg.training import train_run

            train_run(run, dataset=None, train_path=data / "train.tsv", valid_path=data / "valid.tsv",
                      test_path=data / "test.tsv", model="ConvE", epochs=args.epochs, checkpoint_every=1,
                      batch_size=args.train_batch, learning_rate=args.lr, random_seed=args.seed, progress=False,
                      inverse_triples=False)  # fmt: skip
            losses = None
        else:
            losses = train_sampled_softmax(data, run, args)
        record.write_text(json.dumps({"train_seconds": time.perf_counter() - start, **wanted, "batch_size": args.train_batch, "learning_rate": args.lr,
                                      "negatives": args.negatives, "losses": losses}))  # fmt: skip
    return run, json.loads(record.read_text())


def checkpoint_epochs(epochs: int, count: int) -> set[int]:
    """``count`` epochs spread evenly up to the last (5 epochs, 3 checkpoints: 2, 3, 5)."""
    return {max(1, round(epochs * (i + 1) / count)) for i in range(count)}


def checkpoint_steps(steps: int, count: int) -> set[int]:
    """``count`` optimizer steps spread evenly up to the last, for more checkpoints than epochs (the 5M graph:
    1 epoch of 4,883 steps, 2 checkpoints: after steps 2,442 and 4,883)."""
    return {max(1, round(steps * (i + 1) / count)) for i in range(count)}


#: PyKEEN 1.11's ConvE dropout rates (input, feature map, hidden), which the replica leaves at 0.5.
CONVE_DROPOUT = {"hr2d.1": 0.2, "hr2d.5": 0.2, "hr1d.1": 0.3}


def train_sampled_softmax(data: Path, run: Path, args) -> list[float]:
    """Train a PyKEEN ConvE on ``data`` by sampled 1-N softmax cross-entropy; write a run directory.

    ConvE was made to be trained 1-N (each (head, relation) against all tails); PyKEEN's sLCWA with
    one negative per positive left the 1M graph's model at random-level MRR after 3 epochs (97 min).
    Scoring all 50,000 tails per triple costs 1 s per batch of 1,024 here, so each batch scores its
    own tails plus ``--negatives`` tails drawn uniformly (shared by the batch): an unbiased-enough
    softmax that learns the planted clusters in a few epochs. The forward pass is the plain-torch
    replica (PyKEEN 1.11 scores ConvE against all tails by broadcasting: 40 GB for one such batch),
    which has the PyKEEN model's parameter names: the PyKEEN model is built by ``build_model`` (its
    initialisation, seeded), trained through the replica and saved with a checkpoint (state dict, the
    Adam learning rate, the epoch) after every epoch.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from tracin_index.kg.replicas import build_replica, replica_spec
    from tracin_index.kg.runs import CHECKPOINT_DIR, ModelConfig, build_model, save_run_directory
    from tracin_index.kg.triples import IdMaps, read_labeled_triples

    splits = {s: read_labeled_triples(data / f"{s}.tsv") for s in ("train", "valid", "test")}
    everything = np.concatenate([t.labels for t in splits.values()])
    id_maps = IdMaps({e: i for i, e in enumerate(sorted(set(everything[:, 0]) | set(everything[:, 2])))},
                     {r: i for i, r in enumerate(sorted(set(everything[:, 1])))})  # fmt: skip
    train = id_maps.to_ids(splits["train"])
    config = ModelConfig(model="ConvE", num_entities=id_maps.num_entities, num_relations=id_maps.num_relations,
                         random_seed=args.seed,
                         extra={"dataset": None, "training": {"loop": "benchmarks/scale.py sampled 1-N softmax",
                                "epochs": args.epochs, "batch_size": args.train_batch, "learning_rate": args.lr,
                                "optimizer": "Adam", "negatives": args.negatives}})  # fmt: skip
    model = build_model(config)
    replica = build_replica(replica_spec(model))
    replica.load_state_dict(model.state_dict())
    for name, module in replica.interaction.named_modules():
        if name in CONVE_DROPOUT:
            module.p = CONVE_DROPOUT[name]
    entities, biases = replica.entity_representations[0]._embeddings, replica.entity_representations[1]._embeddings
    optimizer = torch.optim.Adam(replica.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    losses = []
    saves = checkpoint_epochs(args.epochs, args.checkpoints)
    # more checkpoints than epochs: spread over the optimizer steps, files named by step and recording no epoch
    # (find_checkpoints then orders them by name; TracIn's sum does not depend on the order anyway)
    per_epoch = len(train) // args.train_batch + (len(train) % args.train_batch >= 2)  # batches of 2 or more
    step_saves = checkpoint_steps(args.epochs * per_epoch, args.checkpoints) if args.checkpoints > args.epochs else set()
    step = 0

    def save(name: str, **record) -> None:
        state = {k: v.detach().clone() for k, v in replica.state_dict().items()}
        path = run / CHECKPOINT_DIR / name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model_state_dict": state, "learning_rate": args.lr, **record}, path)

    for epoch in range(1, args.epochs + 1):
        replica.train()
        order = torch.randperm(len(train), generator=generator)
        total, batches, started = 0.0, 0, time.perf_counter()
        for start in range(0, len(order), args.train_batch):
            batch = train[order[start : start + args.train_batch]]
            if len(batch) < 2:  # batch norm cannot train on one example
                continue
            negatives = torch.randint(0, id_maps.num_entities, (args.negatives,), generator=generator)
            candidates, target = torch.unique(torch.cat([batch[:, 2], negatives]), return_inverse=True)
            x = replica.interaction.encode(entities(batch[:, 0]), replica.relation_representations[0](batch[:, 1]))
            logits = x @ entities(candidates).T + biases(candidates).view(1, -1)
            loss = F.cross_entropy(logits, target[: len(batch)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, batches, step = total + loss.item(), batches + 1, step + 1
            if step in step_saves:
                save(f"step-{step:07d}.pt", step=step)
        losses.append(total / max(batches, 1))
        print(f"  epoch {epoch}: loss {losses[-1]:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
        if not step_saves and epoch in saves:
            save(f"epoch-{epoch:04d}.pt", epoch=epoch)
    model.load_state_dict(replica.state_dict())
    save_run_directory(run, model=model.eval(), config=config, id_maps=id_maps, training=splits["train"],
                       validation=splits["valid"], testing=splits["test"])  # fmt: skip
    return losses


def measure_epoch(run: Path, data: Path, batch_size: int, max_rows: int = 100_000, quiet_cores: float = 0.3,
                  max_wait: float = 30.0) -> dict:
    """One sLCWA epoch (Adam, one negative per positive, the training batch size) of the run's model,
    timed on the first ``max_rows`` training triples and scaled to all of them (an epoch's cost is
    linear in its batches): the training's own wall time may include pauses of a shared machine."""
    from gradient_throughput import time_epoch
    from pykeen.triples import CoreTriplesFactory

    from tracin_index.kg.runs import load_model
    from tracin_index.kg.triples import read_labeled_triples

    loaded = load_model(run)
    hrt = loaded.id_maps.to_ids(read_labeled_triples(data / "train.tsv"))
    rows = min(len(hrt), max_rows)
    factory = CoreTriplesFactory.create(mapped_triples=hrt[:rows], num_entities=loaded.model.num_entities,
                                        num_relations=loaded.model.num_relations)  # fmt: skip
    QuietGuard(quiet_cores, max_wait, 0).wait()
    seconds, _ = time_epoch(loaded.model.train(), factory, batch_size, seed=0)
    return {"seconds": seconds * len(hrt) / rows, "timed_rows": rows, "all_rows": len(hrt),
            "how": f"one sLCWA epoch over the first {rows:,} training triples, times {len(hrt) / rows:g}"}


def filtered_mrr(run: Path, num: int) -> dict:
    """Filtered tail-prediction MRR and Hits@10 of the run's final model on its first ``num`` test triples."""
    import numpy as np
    import torch

    from tracin_index.kg.runs import load_model
    from tracin_index.kg.triples import read_labeled_triples

    loaded = load_model(run)
    model, maps = loaded.model.eval(), loaded.id_maps
    splits = [maps.to_ids(read_labeled_triples(run / f"{s}.tsv")) for s in ("train", "valid", "test")]
    test = splits[2][:num]
    known: dict[tuple[int, int], list[int]] = {}
    for h, r, t in torch.cat(splits).tolist():
        known.setdefault((h, r), []).append(t)
    reciprocal = []
    with torch.no_grad():
        for start in range(0, len(test), 100):
            batch = test[start : start + 100]
            scores = model.score_t(batch[:, :2])
            for i, (h, r, t) in enumerate(batch.tolist()):
                row = scores[i].clone()
                target = float(row[t])
                row[[x for x in known[(h, r)] if x != t]] = -float("inf")
                reciprocal.append(1.0 / (int((row > target).sum()) + 1))
    e = model.num_entities
    return {"mrr": float(np.mean(reciprocal)), "hits_at_10": float(np.mean([x >= 0.1 for x in reciprocal])),
            "test_triples": len(test), "random_mrr": float(sum(1.0 / k for k in range(1, e + 1)) / e)}  # fmt: skip


def run_build(run: Path, idx: Path, args, measure=run_measured) -> dict:
    """``tracin-index build`` at its defaults, timed and measured by ``measure`` (:func:`run_measured`, or
    :func:`run_measured_from_small_process` where this process holds a model by then)."""
    import shutil

    if idx.exists():
        shutil.rmtree(idx)
    cmd = [sys.executable, "-m", "tracin_index.cli", "build", "--model-path", str(run), "--out", str(idx), "--device", "cpu"]
    QuietGuard(args.quiet_cores, args.max_wait, 0).wait()
    result = measure(cmd, log_path=idx.parent / f"{idx.name}.build.log")
    if result["returncode"] != 0:
        raise SystemExit(f"build failed:\n{result['output_tail']}")
    manifest = json.loads((idx / "manifest.json").read_text())
    rows, checkpoints = manifest["inputs"]["training"]["num_triples"], len(manifest["inputs"]["checkpoints"])
    result["bytes"] = {"total": _dir_bytes(idx), "shards": _dir_bytes(idx / "shards"), "bases": _dir_bytes(idx / "bases"),
                       "triples_h5": (idx / "triples.h5").stat().st_size}  # fmt: skip
    result["bytes_per_triple_checkpoint"] = result["bytes"]["total"] / (rows * checkpoints)
    result["num_groups"] = manifest["num_groups"]
    result["sketch_dim"] = max((d for p in manifest["plans"] for d in p["sketch"]), default=0)
    result["replica"] = manifest.get("replica") is not None
    result["per_checkpoint_s"] = result["wall_s"] / checkpoints
    return result


QUERY_WORKER = r"""
import json, sys, time, statistics
import numpy as np, torch
torch.set_num_threads(int(sys.argv[4]))
from tracin_index.index import GradientIndex
from tracin_index.kg.triples import read_labeled_triples
index = GradientIndex.open(sys.argv[1], device="cpu", pack=True)  # warm: packed for fbgemm at the first query
maps = index.id_maps()
test = maps.to_ids(read_labeled_triples(sys.argv[2]))[: int(sys.argv[3])]
start = time.perf_counter(); index.query(test[:1]); first = time.perf_counter() - start
times, candidates, rounds, results = [], [], [], []
for i in range(len(test)):
    start = time.perf_counter()
    results.append(index.query(test[i : i + 1], top_k=10)[0])
    times.append(time.perf_counter() - start)
    candidates.append(index.last_query.rescored[0])
    rounds.append(index.last_query.rounds[0])
out = {"first_query_s": first, "times_s": times, "candidates": candidates, "rounds": rounds,
       "proponents": [[p.train_index for p in r.proponents] for r in results],
       "opponents": [[o.train_index for o in r.opponents] for r in results],
       "influences": [[[p.train_index, p.influence] for p in r.proponents + r.opponents] for r in results]}
json.dump(out, open(sys.argv[5], "w"))
"""


def run_queries(idx: Path, data: Path, args) -> dict:
    out = idx.parent / f"{idx.name}.queries.json"
    QuietGuard(args.quiet_cores, args.max_wait, 0).wait()
    measured = run_measured([sys.executable, "-c", QUERY_WORKER, str(idx), str(data / "test.tsv"), str(args.queries),
                             str(args.threads), str(out)])  # fmt: skip
    if measured["returncode"] != 0:
        raise SystemExit(f"queries failed:\n{measured['output_tail']}")
    found = json.loads(out.read_text())
    ms = sorted(1000 * t for t in found["times_s"])
    cold = []
    for i in range(3):
        QuietGuard(args.quiet_cores, args.max_wait, 0).wait()
        cold.append(run_measured(["tracin-index", "query", str(idx), "--test", str(data / "test.tsv"),
                                  "--test-indices", str(i)])["wall_s"])  # fmt: skip
    return {
        "process": {k: measured[k] for k in ("wall_s", "peak_rss_mb", "foreign_cores")},
        "first_query_s": found["first_query_s"],
        "p50_ms": statistics.median(ms),
        "p95_ms": ms[int(round(0.95 * (len(ms) - 1)))],
        "candidates_mean": statistics.mean(found["candidates"]),
        "candidates_max": max(found["candidates"]),
        "rounds_mean": statistics.mean(found["rounds"]),
        "rounds_max": max(found["rounds"]),
        "cold_cli_s": cold,
        "cold_cli_median_s": statistics.median(cold),
        "_lists": found,
    }


def exact_reference(run: Path, data: Path, num: int) -> tuple:
    import torch

    from tracin_index.exact import TracInAnalyzer
    from tracin_index.kg.runs import load_model
    from tracin_index.kg.triples import read_labeled_triples

    loaded = load_model(run)
    train = loaded.id_maps.to_ids(read_labeled_triples(data / "train.tsv"))
    test = loaded.id_maps.to_ids(read_labeled_triples(data / "test.tsv"))[:num]
    analyzer = TracInAnalyzer(loaded.model, checkpoints=loaded.checkpoints, use_last_layers_only=True, batch_size=1024)
    start = time.perf_counter()
    scores = analyzer.influence_scores(test, train).cpu().numpy()
    return scores, time.perf_counter() - start, torch.Size(scores.shape)


def batched_queries(idx: Path, data: Path, count: int, args) -> dict:
    """The command line on the first ``count`` test triples at its default settings (memory budget, batches),
    JSONL output, measured from a fresh small process: wall time, peak RSS, the plan it printed, the lists."""
    with tempfile.TemporaryDirectory() as work:
        first = Path(work) / "test.tsv"
        first.write_text("".join((data / "test.tsv").read_text().splitlines(keepends=True)[:count]))
        out = idx.parent / f"{idx.name}.batched.jsonl"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "tracin_index.cli", "query", str(idx), "--test", str(first), "--output", str(out),
               "--device", "cpu"]  # fmt: skip
        QuietGuard(args.quiet_cores, args.max_wait, 0).wait()
        measured = run_measured_from_small_process(cmd, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
                                                   log_path=idx.parent / f"{idx.name}.batched.log")  # fmt: skip
    if measured["returncode"] != 0:
        raise SystemExit(f"batched queries failed:\n{measured['output_tail']}")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    answers = [x for x in lines if "proponents" in x]
    plan = [line for line in measured["output_tail"].splitlines() if "memory budget" in line or "pass" in line]
    return {
        "command": measured["command"], "wall_s": measured["wall_s"], "peak_rss_mb": measured["peak_rss_mb"],
        "foreign_cores": measured["foreign_cores"], "test_triples": len(answers),
        "ms_per_test_triple": 1000 * measured["wall_s"] / max(1, len(answers)), "plan_printed": plan[-3:],
        "_answers": answers,
    }  # fmt: skip


def batched_flow(n: int, name: str, data: Path, run: Path, training: dict, args) -> tuple[dict, dict]:
    """A graph too large for the single-query flow (``--batched``, the 5M graph): build, then ``--batch-test``
    test triples through the command line at its default settings (bounded memory, batches, JSONL), recall@10
    of its lists against exact TracIn on the first ``--exact-test``, peak memory of the build and of the
    query process (each measured from a fresh small process), disk size, the model's quality."""
    from agreement import recall

    idx = args.work / f"idx-{name}"
    build = run_build(run, idx, args, measure=run_measured_from_small_process)
    print(f"{name}: build {build['wall_s']:.0f} s, peak RSS {build['peak_rss_mb']:,.0f} MB, "
          f"{build['bytes_per_triple_checkpoint']:.0f} B/triple/ckpt, {build['bytes']['total'] / 2**30:.2f} GiB", flush=True)
    batched = batched_queries(idx, data, args.batch_test, args)
    answers = batched.pop("_answers")
    print(f"{name}: {batched['test_triples']} test triples in {batched['wall_s']:.0f} s "
          f"({batched['ms_per_test_triple']:.0f} ms each), peak RSS {batched['peak_rss_mb']:,.0f} MB", flush=True)
    exact, exact_s, _ = exact_reference(run, data, args.exact_test)
    m = min(len(exact), len(answers))
    lists = {side: [[i["train_index"] for i in a[side]] for a in answers[:m]] for side in ("proponents", "opponents")}
    worst = max((abs(i["influence"] - exact[t][i["train_index"]]) / (abs(exact[t]).max() or 1.0)
                 for t in range(m) for side in ("proponents", "opponents") for i in answers[t][side]), default=0.0)  # fmt: skip
    accuracy = {"recall_at_10_proponents": recall(lists["proponents"], exact[:m], 10, +1),
                "recall_at_10_opponents": recall(lists["opponents"], exact[:m], 10, -1),
                "largest_relative_error": float(worst), "test_triples_checked": m}  # fmt: skip
    print(f"{name}: recall@10 {accuracy['recall_at_10_proponents']:.3f}/{accuracy['recall_at_10_opponents']:.3f} "
          f"against an exact pass of {exact_s:.0f} s", flush=True)
    quality = filtered_mrr(run, args.mrr_test)
    print(f"{name}: filtered MRR {quality['mrr']:.4f} (random {quality['random_mrr']:.5f})", flush=True)
    result = {
        "training_triples": n, "entities": args.entities or default_entities(n), "flow": "batched", "training": training,
        "model_quality": quality, "build": build, "batched_queries": batched,
        "exact": {"seconds_one_pass": exact_s, "test_triples": len(exact), "seconds_per_test_triple": exact_s / len(exact)},
        "indexes": {"default": {"default": accuracy, "bytes_per_triple_checkpoint": build["bytes_per_triple_checkpoint"],
                                "sketch_dim": build["sketch_dim"]}},
        "measured": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "git_commit": versions().get("git_commit"), "command": command_line()},
    }  # fmt: skip
    keys = {
        f"scale_{name}_recall_at_10": round(min(accuracy["recall_at_10_proponents"], accuracy["recall_at_10_opponents"]), 4),
        f"scale_{name}_query_peak_rss_mb": round(batched["peak_rss_mb"], 1),
        f"scale_{name}_ms_per_test_triple": round(batched["ms_per_test_triple"], 1),
        f"scale_{name}_build_peak_rss_mb": round(build["peak_rss_mb"], 1),
        f"scale_{name}_bytes_per_triple_ckpt": round(build["bytes_per_triple_checkpoint"], 1),
    }  # fmt: skip
    return result, keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--entities", type=int, default=None, help="entities of every size [20 triples per entity]")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tracin-scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--checkpoints", type=int, default=3, help="checkpoints, spread evenly over the epochs (sampled-1n), over the steps when more than the epochs")
    parser.add_argument("--train-loop", choices=["sampled-1n", "slcwa"], default="sampled-1n")
    parser.add_argument("--negatives", type=int, default=4096, help="sampled tails per batch (sampled-1n)")
    parser.add_argument("--train-batch", type=int, default=1024)
    parser.add_argument("--mrr-test", type=int, default=500)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--exact-test", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quiet-cores", type=float, default=0.3)
    parser.add_argument("--max-wait", type=float, default=30.0)
    parser.add_argument("--batched", action="store_true",
                        help="the batched flow (a graph too large for single warm queries, e.g. 5M): build, then "
                             "--batch-test test triples through the command line at its defaults, exact on --exact-test")
    parser.add_argument("--batch-test", type=int, default=1000)
    args = parser.parse_args()
    import torch
    from agreement import recall

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results: dict = {}
    batched_keys: dict = {}
    # sizes measured before are kept: the results file's (benchmarks/results/, or TRACIN_BENCH_RESULTS)
    previous = json.loads((RESULTS / "scale.json").read_text()).get("results", {}) if (RESULTS / "scale.json").is_file() else {}
    for n in args.sizes:
        entities = args.entities or default_entities(n)
        name = _name(n, entities)
        data = ensure_data(args.work, n, entities, args.seed)
        run, training = ensure_model(data, args)
        if args.batched:
            results[name], keys = batched_flow(n, name, data, run, training, args)
            batched_keys.update(keys)
            continue
        epoch = measure_epoch(run, data, training["batch_size"], quiet_cores=args.quiet_cores, max_wait=args.max_wait)
        epoch_s = epoch["seconds"]
        print(f"{name}: trained ({training['train_seconds']:.0f} s wall); one epoch {epoch_s:.0f} s", flush=True)
        quality = filtered_mrr(run, args.mrr_test)
        print(f"{name}: filtered MRR {quality['mrr']:.4f} (random {quality['random_mrr']:.5f})", flush=True)
        idx = args.work / f"idx-{name}"
        build = run_build(run, idx, args)
        print(f"{name}: build {build['wall_s']:.0f} s, {build['bytes_per_triple_checkpoint']:.0f} B/triple/ckpt", flush=True)
        queries = run_queries(idx, data, args)
        lists = queries.pop("_lists")
        print(f"{name}: p50 {queries['p50_ms']:.1f} ms, candidates {queries['candidates_mean']:.0f}, "
              f"cold CLI {queries['cold_cli_median_s']:.1f} s", flush=True)
        exact, exact_s, _ = exact_reference(run, data, args.exact_test)
        m = min(args.exact_test, len(lists["proponents"]))
        worst = max((abs(v - exact[t][row]) / (abs(exact[t]).max() or 1.0)
                     for t in range(m) for row, v in lists["influences"][t]), default=0.0)  # fmt: skip
        default = {
            "recall_at_10_proponents": recall(lists["proponents"][:m], exact[:m], 10, +1),
            "recall_at_10_opponents": recall(lists["opponents"][:m], exact[:m], 10, -1),
            "largest_relative_error": float(worst),
            "test_triples_checked": m,
        }
        print(f"{name}: recall@10 {default['recall_at_10_proponents']:.3f}/{default['recall_at_10_opponents']:.3f} "
              f"against an exact pass of {exact_s:.0f} s", flush=True)
        results[name] = {
            "training_triples": n,
            "entities": entities,
            "training": training,
            "epoch_s": epoch_s,
            "epoch": epoch,
            "model_quality": quality,
            "build": build,
            "build_per_checkpoint_vs_epoch": build["per_checkpoint_s"] / epoch_s,
            "queries": queries,
            "exact": {"seconds_one_pass": exact_s, "test_triples": len(exact), "seconds_per_test_triple": exact_s / len(exact)},
            "speedup_vs_exact": (exact_s / len(exact)) / (queries["p50_ms"] / 1000),
            "indexes": {"default": {"default": default, "bytes_per_triple_checkpoint": build["bytes_per_triple_checkpoint"],
                                    "sketch_dim": build["sketch_dim"]}},
            # each size's own provenance: the file keeps sizes from earlier runs (merged below)
            "measured": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         "git_commit": versions().get("git_commit"), "command": command_line()},
        }
    merged = {**previous, **results}
    out = {
        "machine": machine_info(),
        "versions": versions(),
        "command": command_line(),
        "targets_ms": {_name(k): v for k, v in TARGET_P50_MS.items()},
        "results": merged,
        "total_runtime_s": time.perf_counter() - started,
    }
    path = write_results("scale", out)
    keys = {}
    for name, key in (("100k", "query_p50_ms_warm_100k"), ("1m", "query_p50_ms_warm_1m")):
        if name in merged:
            keys[key] = round(merged[name]["queries"]["p50_ms"], 1)
    if "1m" in merged:
        keys.update(scale_trained_test_mrr=round(merged["1m"]["model_quality"]["mrr"], 4),
                    query_speedup_vs_exact_1m=round(merged["1m"]["speedup_vs_exact"], 1),
                    build_peak_rss_mb_1m=round(merged["1m"]["build"]["peak_rss_mb"], 1))  # fmt: skip
    update_summary({**keys, **batched_keys})
    update_accuracy_summary()
    write_json_atomic(args.work / "last.json", out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
