"""Smoke run of every benchmark script at its smallest settings: does each still run end to end?

Run from anywhere (about 10 minutes on 2 cores)::

    python benchmarks/smoke.py                      # all scripts
    python benchmarks/smoke.py --only scale dask_cluster --keep

Each script runs as a subprocess of this Python, from the repository root, with
``TRACIN_BENCH_RESULTS`` set to a fresh temporary folder (``benchmarks/common.py`` writes results files
and ``summary.json`` there) and its ``--work`` / ``--workdir`` / ``--output`` / ``--results-dir`` in the
same temporary tree, so that nothing under ``benchmarks/results/`` is written: its files are
fingerprinted (and ``git status benchmarks/results`` read) before and after, and a change fails the run.
The figures of a smoke run mean nothing (tiny models, one repeat, no quiet-machine waits); only
whether each script ran and wrote its results file is checked.

Order matters where one script feeds another: ``agreement.py`` trains the UMLS runs that
``last_vs_all.py`` and ``layers_sweep.py`` reuse (one shared ``--work``), ``scale.py`` makes the small
run that ``dask_cluster.py`` builds on a LocalCluster, and ``demo_cli.py`` makes the index that
``serve_load.py`` serves. ``common.py`` and ``synthetic.py`` are libraries: they are imported only.

Prints one line per script (name, exit status, seconds, whether its results JSON appeared) and exits
non-zero if any failed, or if ``benchmarks/results/`` changed. Each script's output goes to
``<tmp>/logs/<name>.log``; the tail of a failed one is printed. ``--keep`` keeps the temporary folder
(it is kept anyway when something failed).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS_DIR = BENCH / "results"
LIBRARIES = ("common", "synthetic")

#: the small planted graph of scale.py (2,000 training triples, 1,000 entities: scale.py names it "2k")
SCALE_SIZE = 2000
SCALE_NAME = "2k"


@dataclass
class Step:
    name: str  # as printed and as --only names it
    args: Callable[[Path], list[str]]  # the script's arguments, given the temporary work folder
    results: tuple[str, ...] = ()  # results JSON files (under TRACIN_BENCH_RESULTS) it must write
    needs: tuple[str, ...] = ()  # steps whose outputs it reads (run first, also under --only)
    script: str | None = None  # benchmarks/<script>.py (default: the name)
    command: Callable[[Path], list[str]] | None = None  # instead of ``python benchmarks/<script>.py ARGS``

    @property
    def label(self) -> str:
        return self.name if self.script in (None, self.name) else f"{self.name} ({self.script}.py)"

    def cmd(self, work: Path) -> list[str]:
        if self.command is not None:
            return self.command(work)
        return [sys.executable, str(BENCH / f"{self.script or self.name}.py"), *self.args(work)]


def steps() -> list[Step]:
    """The smoke settings of every script: the smallest that still go through each code path."""
    no_wait = ["--max-wait", "0", "--retries", "0"]
    umls = ["--epochs", "2", "--checkpoint-every", "1"]  # the UMLS runs: 2 epochs, 2 checkpoints (cached apart)
    return [
        *(Step(f"{lib}.py (import)", lambda w: [], command=lambda w, lib=lib: [
            sys.executable, "-c", f"import sys; sys.path.insert(0, {str(BENCH)!r}); import {lib}"]) for lib in LIBRARIES),
        Step("gradient_throughput", lambda w: ["--repeats", "1", "--loop-triples", "16", "--loop-chunk", "16",
                                               *no_wait, "--budget", "0"],  # --output: its default, under RESULTS
             results=("gradient_throughput.json",)),
        Step("build_cost", lambda w: ["--repeats", "1", *umls, "--loop-triples", "16", "--captum-projection-dim", "32",
                                      *no_wait, "--budget", "0", "--workdir", str(w / "build_cost")],
             results=("build_cost.json",)),
        # trains the UMLS ConvE (and DistMult) that last_vs_all.py and layers_sweep.py reuse from the same --work
        # (each trains it itself when it is missing)
        Step("agreement", lambda w: ["--settings", "umls-conve", "umls-distmult", "--dims", "32", "--num-test", "3", *umls,
                                     "--work", str(w / "bench")],
             results=("agreement.json",)),
        Step("last_vs_all", lambda w: ["--num-test", "3", "--repeats", "1", *no_wait, *umls, "--work", str(w / "bench")],
             results=("last_vs_all.json",)),
        Step("layers_sweep", lambda w: ["--num-test", "3", "--layers", "1", *no_wait, *umls, "--work", str(w / "bench")],
             results=("layers_sweep.json",)),
        Step("scale", lambda w: ["--sizes", str(SCALE_SIZE), "--epochs", "2", "--checkpoints", "2", "--negatives", "256",
                                 "--train-batch", "256", "--mrr-test", "50", "--queries", "3", "--exact-test", "3",
                                 "--max-wait", "0", "--work", str(w / "scale")],
             results=("scale.json",)),
        Step("dask_cluster", lambda w: ["--run", str(w / "scale" / SCALE_NAME / "run"),
                                        "--test", str(w / "scale" / SCALE_NAME / "test.tsv"), "--shard-size", "512",
                                        "--workers", "2", "--search-shards", "2", "--queries", "3", "--noop-tasks", "20",
                                        "--work", str(w / "dask")],
             results=("dask_cluster.json",), needs=("scale",)),
        Step("batch_query", lambda w: ["--size", "3000", "--test", "12", "--rounds", "1", "--epochs", "1", "--checkpoints",
                                       "1", "--max-wait", "0", "--work", str(w / "batch_query")],
             results=("batch_query.json",)),
        Step("scan_kernels", lambda w: ["--rows", "2000", "--columns", "1", "4", "--repeats", "1", "--max-wait", "0"],
             results=("scan_kernels.json",)),
        Step("demo_cli", lambda w: ["--work", str(w / "demo_cli"), "--repeats", "1", "--max-wait", "0", *umls],
             results=("demo_cli.json",)),
        Step("serve_load", lambda w: ["--index", str(w / "demo_cli" / "demo" / "index"), "--clients", "2", "--seconds", "3",
                                      *(["--screenshot", str(w / "explorer.png")] if chromium() else [])],
             results=("serve_load.json",), needs=("demo_cli",)),
        # the lean 1-N settings: DistMult (the embeddings) and ConvE (exact TracIn over all parameters too)
        Step("faithfulness", lambda w: ["--settings", "nations-distmult", "nations-conve", "--main-targets", "2",
                                        "--targets", "2", "--ks", "10", "--epochs", "5", "--checkpoints", "2",
                                        "--workers", "2", "--work", str(w / "faithfulness")],
             results=("faithfulness.json",)),
        Step("faithfulness_defaults", lambda w: ["--targets", "2", "--ks", "10", "--epochs", "4", "--workers", "2",
                                                 "--work", str(w / "faithfulness_defaults")],
             results=("faithfulness_defaults.json",)),
        # the layers' remove-and-retrain: then the recommended N from it, faithfulness_defaults.json and layers_sweep.json
        Step("faithfulness_layers", script="faithfulness_defaults",
             args=lambda w: ["--targets", "2", "--ks", "10", "--epochs", "4", "--workers", "2", "--methods", "layers_1",
                             "layers_all", "proponents", "random_neighbours", "--name", "faithfulness_layers",
                             "--work", str(w / "faithfulness_layers")],
             results=("faithfulness_layers.json",), needs=("faithfulness_defaults", "layers_sweep")),
        Step("faithfulness_baselines", lambda w: ["--datasets", "nations", "--targets", "4", "--groups", "2", "--ks", "1",
                                                  "--seeds", "0", "--epochs", "3", "--workers", "2",
                                                  "--work", str(w / "faithfulness_baselines")],
             results=("faithfulness_baselines.json",)),
    ]  # fmt: skip


def chromium() -> str | None:
    """The browser serve_load.py's ``--screenshot`` drives (its explorer path is smoked only where there is one)."""
    return os.environ.get("TRACIN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


# -- benchmarks/results/ must not change ---------------------------------------------------------------


def fingerprint(folder: Path) -> dict[str, tuple[int, str]]:
    """(size, sha256) of every file under ``folder``."""
    return {str(p.relative_to(folder)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def git_status(folder: Path) -> str:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", str(folder)],
                             cwd=REPO, capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as error:
        return f"(git status failed: {error})"
    return out.stdout if out.returncode == 0 else f"(git status failed: {out.stderr.strip()})"


# -- running ------------------------------------------------------------------------------------------


def environment(results: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["TRACIN_BENCH_RESULTS"] = str(results)
    env.setdefault("PYSTOW_HOME", os.path.join(tempfile.gettempdir(), "pystow-bench"))
    env["PYTHONUNBUFFERED"] = "1"
    env["MPLBACKEND"] = "Agg"
    # the scripts call `tracin-index`: the one next to this Python first
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run_step(step: Step, work: Path, results: Path, logs: Path, env: dict, timeout: float) -> dict:
    cmd = step.cmd(work)
    log = logs / (step.name.replace(" ", "").replace("(", "-").replace(")", "") + ".log")
    start = time.perf_counter()
    with open(log, "wb") as out:
        out.write(("$ " + " ".join(cmd) + "\n").encode())
        out.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the script and its workers (one process group of our own)
            proc.wait()
            rc = "timeout"
    seconds = time.perf_counter() - start
    found = {name: (results / name).is_file() for name in step.results}
    return {"name": step.label, "rc": rc, "seconds": seconds, "results": found, "log": log,
            "ok": rc == 0 and all(found.values())}  # fmt: skip


def select(all_steps: list[Step], only: list[str] | None) -> list[Step]:
    """All steps, or the imports, those named in ``only`` and (transitively) the steps they need, in order."""
    if not only:
        return all_steps
    by_name = {s.name: s for s in all_steps}
    wanted, todo = set(), list(only)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo.extend(by_name[name].needs)
    return [s for s in all_steps if s.command is not None or s.name in wanted]


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    all_steps = steps()
    names = [s.name for s in all_steps if s.command is None]
    parser.add_argument("--only", nargs="+", choices=names, metavar="NAME",
                        help=f"run these only (and the steps they need, and the libraries' imports): {', '.join(names)}")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per script before it is killed (default 600)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (kept anyway after a failure)")
    parser.add_argument("--tmp", type=Path, default=None, help="temporary folder to use (default: a fresh one)")
    args = parser.parse_args()
    chosen = select(all_steps, args.only)

    tmp = args.tmp or Path(tempfile.mkdtemp(prefix="tracin-smoke-"))
    results, work, logs = tmp / "results", tmp / "work", tmp / "logs"
    for d in (results, work, logs):
        d.mkdir(parents=True, exist_ok=True)
    env = environment(results)
    before_files, before_git = fingerprint(RESULTS_DIR), git_status(RESULTS_DIR)
    print(f"smoke run in {tmp} (TRACIN_BENCH_RESULTS={results})", flush=True)
    if before_git:
        print(f"git status benchmarks/results before:\n{before_git}", flush=True)

    started = time.perf_counter()
    rows: list[dict] = []
    failed_names: set[str] = set()
    for step in chosen:
        missing = [n for n in step.needs if n in failed_names]
        if missing:
            row = {"name": step.label, "rc": "skipped", "seconds": 0.0, "results": {n: False for n in step.results},
                   "ok": False, "log": None, "note": f"needs {', '.join(missing)}"}  # fmt: skip
        else:
            row = run_step(step, work, results, logs, env, args.timeout)
        rows.append(row)
        if not row["ok"]:
            failed_names.add(step.name)
        print(line(row), flush=True)
        if not row["ok"] and row["log"] is not None:
            print("    " + tail(row["log"]).replace("\n", "\n    "), flush=True)
    total = time.perf_counter() - started

    after_files, after_git = fingerprint(RESULTS_DIR), git_status(RESULTS_DIR)
    changed = sorted(k for k in set(before_files) | set(after_files) if before_files.get(k) != after_files.get(k))
    print(f"\n{'script':46s} {'exit':>8s} {'seconds':>8s}  results JSON")
    for row in rows:
        print(line(row))
    print(f"total {total:.0f} s")
    if changed or after_git != before_git:
        print(f"benchmarks/results/ CHANGED: {changed}\ngit status benchmarks/results after:\n{after_git}")
    else:
        print("benchmarks/results/ unchanged (files and git status as before)")
    bad = [r["name"] for r in rows if not r["ok"]]
    if bad:
        print(f"FAILED: {', '.join(bad)} (logs and outputs kept in {tmp})")
    elif args.keep or args.tmp:
        print(f"outputs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if bad or changed or after_git != before_git else 0


def line(row: dict) -> str:
    found = ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in row["results"].items()) or "-"
    note = f"  ({row['note']})" if row.get("note") else ""
    return f"{row['name']:46s} {str(row['rc']):>8s} {row['seconds']:8.1f}  {found}{note}"


if __name__ == "__main__":
    sys.exit(main())
