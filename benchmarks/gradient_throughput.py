"""Per-example gradient throughput on UMLS ConvE: batched path vs per-triple loop vs one training epoch.

Run from the repository root (one command, defaults are the reported settings)::

    python benchmarks/gradient_throughput.py

Flags: ``--threads`` (torch threads, default 2), ``--repeats`` (default 3, medians reported),
``--batch-size`` (default 256), ``--loop-triples`` (how many triples the per-triple loop times,
default all; fewer are extrapolated by per-triple rate), ``--seed``, ``--output`` (default
``benchmarks/results/gradient_throughput.json``), and the shared-machine guard ``--max-wait``,
``--quiet-cores``, ``--retries``, ``--budget``, ``--loop-chunk`` (see below and ``--help``).

Over the same 5,216 UMLS training triples (PyKEEN's bundled UMLS, no inverse triples, as the
dataset gives them), a ConvE with PyKEEN defaults (embedding_dim 200, final Linear 10368 -> 200)
and the default parameter selection (last 2 layers: ``interaction.hr1d.0`` Linear and
``interaction.hr1d.2`` BatchNorm1d), loss ``bce``, each repeat times, in a rotating order:

1. ``batched``: :meth:`tracin_index.gradients.computer.GradientComputer.compute` over all batches, each
   result reduced by ``g.squared_norms().sum()`` so that nothing is skipped;
2. ``loop`` (the original method): model in eval mode, only the selected parameters requiring grad,
   one ``torch.autograd.grad(loss_i, selected_params)`` per triple, gradients flattened
   (``torch.cat``) and reduced to their squared norm;
3. ``epoch``: one PyKEEN sLCWA training epoch (``SLCWATrainingLoop``, Adam, basic negative
   sampler with one negative per positive, same batch size, ``drop_last=False`` so that all 5,216
   triples are used) on a fresh deep copy of the same ConvE. The timed span is PyKEEN's
   ``_train_epoch`` (all batches incl. data loading, negative sampling, forward, backward, optimizer
   steps and PyKEEN's end-of-epoch cleanup); one-time setup in ``train()`` (parameter reset,
   optimizer and data-loader creation) is excluded, but the whole ``train()`` call is recorded too;
4. ``forward`` (informative floor): ``model.score_hrt`` under ``torch.no_grad`` over the same batches.

Shared machines: with 2 torch threads on 2 cores, one other busy process slows every method by 5-15x
(thread oversubscription), the long per-triple loop most of all. So each timed run (the loop: each
chunk of 1,000 triples) waits briefly for other processes to go quiet, the CPU they use during the
run is measured from /proc/stat, and a disturbed run is re-run (the least disturbed attempt is kept,
never simply the fastest). What others used is recorded per repeat in the JSON.

Writes a JSON file (machine, versions, command, settings, per-repeat seconds, medians, triples/s,
ratios ``batched_vs_epoch`` and ``batched_vs_loop_speedup``, ``targets_met`` against 1.5 and 20) and
prints a short table.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PYSTOW_HOME", os.path.join(tempfile.gettempdir(), "pystow-bench"))

import torch  # noqa: E402
from pykeen.datasets import UMLS  # noqa: E402
from pykeen.models import ConvE  # noqa: E402
from pykeen.training import SLCWATrainingLoop  # noqa: E402

from tracin_index.gradients.computer import GradientComputer, only_selected_require_grad, per_example_losses  # noqa: E402
from tracin_index.gradients.selection import select_parameters  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

from common import RESULTS, QuietGuard, cpu_model  # noqa: E402  (benchmarks/ is this script's folder: on sys.path)

TARGET_EPOCH_RATIO = 1.5
TARGET_LOOP_SPEEDUP = 20.0
METHODS = ("batched", "loop", "epoch", "forward")


class _TimedSLCWA(SLCWATrainingLoop):
    """sLCWA loop that records the wall time of each epoch proper (``_train_epoch``), without setup."""

    epoch_seconds: list[float]

    def _train_epoch(self, *args, **kwargs):  # noqa: D102
        start = time.perf_counter()
        try:
            return super()._train_epoch(*args, **kwargs)
        finally:
            self.__dict__.setdefault("epoch_seconds", []).append(time.perf_counter() - start)


def _batches(mapped: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [mapped[i : i + batch_size] for i in range(0, mapped.shape[0], batch_size)]


def time_batched(gc: GradientComputer, batches: list[torch.Tensor]) -> tuple[float, float]:
    start = time.perf_counter()
    total = 0.0
    for batch in batches:
        g = gc.compute(batch)
        total += float(g.squared_norms().sum())
    return time.perf_counter() - start, total


def time_loop(model, selection, triples: torch.Tensor, loss: str) -> tuple[float, float]:
    params = [getattr(m.module, p) for m in selection.modules for p in m.parameter_names]
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with only_selected_require_grad(model, selection):
            start = time.perf_counter()
            for i in range(triples.shape[0]):
                loss_i = per_example_losses(model, triples[i : i + 1], loss).sum()
                grads = torch.autograd.grad(loss_i, params)
                flat = torch.cat([g.reshape(-1) for g in grads])
                total += float(flat @ flat)
            elapsed = time.perf_counter() - start
    finally:
        model.train(was_training)
    return elapsed, total


def time_forward(model, batches: list[torch.Tensor]) -> tuple[float, float]:
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with torch.no_grad():
            start = time.perf_counter()
            for batch in batches:
                total += float(model.score_hrt(batch).sum())
            elapsed = time.perf_counter() - start
    finally:
        model.train(was_training)
    return elapsed, total


def time_epoch(base_model, training, batch_size: int, seed: int) -> tuple[float, tuple[float, float]]:
    """(epoch seconds without setup, (whole train() seconds, epoch loss)) on a fresh copy of the model."""
    model = copy.deepcopy(base_model)
    torch.manual_seed(seed)
    loop = _TimedSLCWA(
        model=model,
        triples_factory=training,
        optimizer="Adam",
        negative_sampler="basic",
        negative_sampler_kwargs=dict(num_negs_per_pos=1),
    )
    start = time.perf_counter()
    losses = loop.train(
        triples_factory=training,
        num_epochs=1,
        batch_size=batch_size,
        drop_last=False,
        pin_memory=False,
        use_tqdm=False,
        use_tqdm_batch=False,
    )
    whole = time.perf_counter() - start
    return loop.epoch_seconds[-1], (whole, float(losses[-1]))


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _consistency_check(model, selection, gc, triples: torch.Tensor) -> float:
    """Max relative difference of squared gradient norms, batched vs per-triple loop, on a few triples."""
    batched = gc.compute(triples).squared_norms()
    params = [getattr(m.module, p) for m in selection.modules for p in m.parameter_names]
    model.eval()
    looped = []
    with only_selected_require_grad(model, selection):
        for i in range(triples.shape[0]):
            grads = torch.autograd.grad(per_example_losses(model, triples[i : i + 1], "bce").sum(), params)
            looped.append(sum(g.pow(2).sum() for g in grads))
    looped_t = torch.stack(looped).detach()
    return float(((batched - looped_t).abs() / looped_t.abs().clamp_min(1e-30)).max())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; medians reported (default 3)")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size of all methods (default 256)")
    parser.add_argument(
        "--loop-triples", type=int, default=None,
        help="triples timed by the per-triple loop (default: all); fewer are extrapolated by per-triple rate",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output", type=Path, default=RESULTS / "gradient_throughput.json",
        help="results JSON (default benchmarks/results/gradient_throughput.json, or under TRACIN_BENCH_RESULTS)",
    )
    parser.add_argument(
        "--max-wait", type=float, default=20.0,
        help="before each timed run, wait up to this many seconds for other processes to use under "
        "--quiet-cores cores (shared machines; default 30, 0 disables)",
    )
    parser.add_argument("--quiet-cores", type=float, default=0.3, help="see --max-wait (default 0.3)")
    parser.add_argument(
        "--retries", type=int, default=2,
        help="re-run a timed run during which other processes used --quiet-cores or more, up to this many times "
        "(default 2); the least disturbed attempt is kept",
    )
    parser.add_argument(
        "--budget", type=float, default=240.0,
        help="seconds after start past which no more waiting or retrying is done (default 240)",
    )
    parser.add_argument(
        "--loop-chunk", type=int, default=1000,
        help="the per-triple loop is timed in chunks of this many triples, each guarded on its own (default 1000)",
    )
    args = parser.parse_args(argv)
    command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    load_before = os.getloadavg()
    run_start = time.perf_counter()

    dataset = UMLS()
    training = dataset.training
    mapped = training.mapped_triples
    n = mapped.shape[0]
    loop_n = n if args.loop_triples is None else max(1, min(args.loop_triples, n))
    model = ConvE(triples_factory=training, random_seed=args.seed)
    selection = select_parameters(model, mode="last", num_last_layers=2)
    gc = GradientComputer(model, selection, loss="bce")
    batches = _batches(mapped, args.batch_size)

    # Correctness sanity check and warm-up (not timed): first-call allocations, oneDNN primitives, resolvers.
    check = _consistency_check(model, selection, gc, mapped[:16])
    time_batched(gc, batches[:2])
    time_forward(model, batches[:2])
    time_loop(model, selection, mapped[:32], "bce")
    time_epoch(model, training, args.batch_size, args.seed)

    guard = QuietGuard(args.quiet_cores, args.max_wait, args.retries, run_start + args.budget)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    foreign: dict[str, list[float | None]] = {m: [] for m in METHODS}
    waited: dict[str, list[float]] = {m: [] for m in METHODS}
    attempts: dict[str, list[int]] = {m: [] for m in METHODS}
    epoch_whole: list[float] = []
    epoch_losses: list[float] = []
    loadavg_per_repeat: list[list[float]] = []
    for r in range(args.repeats):
        order = METHODS[r % len(METHODS) :] + METHODS[: r % len(METHODS)]
        for method in order:
            if method == "loop":
                # Chunks, each guarded on its own: the loop is the long measurement, the most exposed to others.
                chunks = [mapped[lo : min(lo + args.loop_chunk, loop_n)] for lo in range(0, loop_n, args.loop_chunk)]
                parts = [guard.measure(lambda c=c: time_loop(model, selection, c, "bce")) for c in chunks]
                t = sum(p.seconds for p in parts)
                f = None if any(p.foreign is None for p in parts) else sum(p.foreign * p.seconds for p in parts) / t
                w, a = sum(p.waited for p in parts), sum(p.attempts for p in parts)
            else:
                fn = {
                    "batched": lambda: time_batched(gc, batches),
                    "forward": lambda: time_forward(model, batches),
                    "epoch": lambda r=r: time_epoch(model, training, args.batch_size, args.seed + 1 + r),
                }[method]
                m = guard.measure(fn)
                t, f, w, a = m.seconds, m.foreign, m.waited, m.attempts
                if method == "epoch":
                    epoch_whole.append(m.result[0])
                    epoch_losses.append(m.result[1])
            times[method].append(t)
            foreign[method].append(f)
            waited[method].append(w)
            attempts[method].append(a)
            busy = "" if f is None else f"  (other processes: {f:.2f} cores; {a} attempt(s), waited {w:.0f} s)"
            print(f"repeat {r + 1}/{args.repeats} {method:8s} {t:8.3f} s{busy}", file=sys.stderr, flush=True)
        loadavg_per_repeat.append(list(os.getloadavg()))

    med = {m: statistics.median(v) for m, v in times.items()}
    loop_per_triple = med["loop"] / loop_n
    loop_full = loop_per_triple * n
    batched_per_triple = med["batched"] / n
    batched_vs_epoch = med["batched"] / med["epoch"]
    speedup = loop_per_triple / batched_per_triple

    def entry(method: str, triples: int, **extra) -> dict:
        return {
            "per_repeat_s": times[method],
            "median_s": med[method],
            "min_s": min(times[method]),
            "other_processes_cores_per_repeat": foreign[method],
            "waited_for_quiet_s_per_repeat": waited[method],
            "attempts_per_repeat": attempts[method],
            "triples": triples,
            "triples_per_s": triples / med[method],
            **extra,
        }

    results = {
        "benchmark": "gradient_throughput",
        "machine": {
            "platform": platform.platform(),
            "cpu_model": cpu_model(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_before": list(load_before),
            "loadavg_after_each_repeat": loadavg_per_repeat,
            "note": (
                "shared machine: other processes may run concurrently. Each timed run (the per-triple loop: each chunk of "
                f"{args.loop_chunk} triples) is preceded by a wait (up to {args.max_wait:g} s) for other processes to "
                f"use under {args.quiet_cores:g} cores and re-run (up to {args.retries} times, least disturbed "
                "attempt kept) if they used more during it; the cores they used are recorded per repeat "
                f"(other_processes_cores_per_repeat). No waiting or retrying after {args.budget:g} s."
            ),
        },
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "pykeen": _version("pykeen"),
            "tracin_index": _version("tracin-index"),
            "git_commit": _git_commit(),
        },
        "settings": {
            "dataset": "pykeen.datasets.UMLS (bundled)",
            "training_triples": n,
            "create_inverse_triples": bool(training.create_inverse_triples),
            "model": "ConvE (PyKEEN defaults)",
            "embedding_dim": model.entity_representations[0].shape[0],
            "selection": selection.describe(),
            "selected_parameters": selection.parameter_names,
            "num_selected_parameters": selection.num_parameters,
            "loss": "bce",
            "batch_size": args.batch_size,
            "num_batches": len(batches),
            "repeats": args.repeats,
            "threads": args.threads,
            "loop_triples": loop_n,
            "seed": args.seed,
            "order": "methods rotated each repeat; one untimed warm-up of each method first",
            "epoch": (
                "SLCWATrainingLoop, Adam (PyKEEN default lr), negative_sampler=basic, num_negs_per_pos=1, "
                f"batch_size={args.batch_size}, drop_last=False (all {n} triples), fresh deepcopy of the model per "
                "repeat; timed span = PyKEEN's _train_epoch (setup in train() excluded; whole train() call in "
                "train_call_s)"
            ),
        },
        "consistency_check": {
            "what": "max relative difference of per-triple squared gradient norms, batched vs loop, first 16 triples",
            "max_rel_diff": check,
        },
        "times": {
            "batched": entry("batched", n),
            "loop": entry(
                "loop", loop_n,
                per_triple_s=loop_per_triple,
                full_s=loop_full,
                full_s_extrapolated=loop_n < n,
            ),
            "epoch": entry("epoch", n, train_call_s=epoch_whole, epoch_loss=epoch_losses),
            "forward": entry("forward", n),
        },
        "ratios": {
            "batched_vs_epoch": batched_vs_epoch,
            "batched_vs_loop_speedup": speedup,
            "batched_vs_forward": med["batched"] / med["forward"],
        },
        "targets": {"batched_vs_epoch_at_most": TARGET_EPOCH_RATIO, "batched_vs_loop_speedup_at_least": TARGET_LOOP_SPEEDUP},
        "targets_met": {
            "batched_vs_epoch": batched_vs_epoch <= TARGET_EPOCH_RATIO,
            "batched_vs_loop_speedup": speedup >= TARGET_LOOP_SPEEDUP,
        },
        "total_runtime_s": time.perf_counter() - run_start,
    }

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")

    print(f"UMLS ConvE, {n} triples, batch {args.batch_size}, {args.threads} threads, median of {args.repeats}")
    print(f"{'method':10s} {'median s':>10s} {'triples/s':>10s}")
    for method, label in (("batched", "batched"), ("loop", "loop"), ("epoch", "epoch"), ("forward", "forward")):
        e = results["times"][method]
        note = f"  ({loop_n} triples timed; full {loop_full:.2f} s)" if method == "loop" and loop_n < n else ""
        print(f"{label:10s} {e['median_s']:10.3f} {e['triples_per_s']:10.0f}{note}")
    ok = results["targets_met"]
    print(
        f"batched / epoch = {batched_vs_epoch:.2f}x (target <= {TARGET_EPOCH_RATIO}: {'met' if ok['batched_vs_epoch'] else 'MISSED'})"
    )
    print(
        f"loop / batched per triple = {speedup:.1f}x (target >= {TARGET_LOOP_SPEEDUP:g}: "
        f"{'met' if ok['batched_vs_loop_speedup'] else 'MISSED'})"
    )
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
