"""The demo from the shell, and a query from the shell on its index (issue [1/5] item 4).

Run from the repository root (about a minute and a half on 2 cores)::

    python benchmarks/demo_cli.py

1. ``tracin-index demo --out WORK/demo`` in a fresh folder, timed as the user sees it (a subprocess:
   imports, training, build, query); the bytes it wrote, and those of the index alone.
2. ``tracin-index query WORK/demo/index --triple <the demo's first test triple>`` from the shell,
   ``--repeats`` (5) times, each a fresh process (imports, opening the index, loading the model,
   the query); median wall time. Under the quiet-machine guard of ``common.py``.

Writes ``benchmarks/results/demo_cli.json`` and the summary keys ``demo_s``, ``demo_mb`` and
``cli_query_s_demo``. Targets: the demo under 60 s and 100 MB; the query at most 3 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("PYSTOW_HOME", os.path.join(tempfile.gettempdir(), "pystow-bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QuietGuard, command_line, machine_info, run_measured, update_summary, versions, write_results  # noqa: E402

TARGETS = {"demo_s": 60.0, "demo_mb": 100.0, "cli_query_s_demo": 3.0}


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tracin-demo-cli")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quiet-cores", type=float, default=0.3)
    parser.add_argument("--max-wait", type=float, default=30.0)
    parser.add_argument("--epochs", type=int, default=None, help="passed to `tracin-index demo` (smoke runs; default: its own)")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="passed to `tracin-index demo` (smoke runs)")
    args = parser.parse_args()
    demo = args.work / "demo"
    if demo.exists():
        shutil.rmtree(demo)
    args.work.mkdir(parents=True, exist_ok=True)
    tool = shutil.which("tracin-index") or "tracin-index"
    guard = QuietGuard(args.quiet_cores, args.max_wait, 0)
    guard.wait()
    training = [*(["--epochs", str(args.epochs)] if args.epochs is not None else []),
                *(["--checkpoint-every", str(args.checkpoint_every)] if args.checkpoint_every is not None else [])]
    ran = run_measured([tool, "demo", "--out", str(demo), *training], log_path=args.work / "demo.log")
    if ran["returncode"] != 0:
        raise SystemExit(f"the demo failed:\n{ran['output_tail']}")
    head, relation, tail = (demo / "run" / "test.tsv").read_text().splitlines()[0].split("\t")
    queries = []
    for _ in range(args.repeats):
        guard.wait()
        q = run_measured([tool, "query", str(demo / "index"), "--triple", head, relation, tail])
        if q["returncode"] != 0:
            raise SystemExit(f"the query failed:\n{q['output_tail']}")
        queries.append(q)
    figures = {
        "demo_s": ran["wall_s"],
        "demo_mb": _bytes(demo) / 1e6,
        "demo_index_mb": _bytes(demo / "index") / 1e6,
        "cli_query_s_demo": statistics.median(q["wall_s"] for q in queries),
    }
    results = {
        "machine": machine_info(),
        "versions": versions(),
        "command": command_line(),
        "demo": {k: ran[k] for k in ("command", "wall_s", "user_s", "sys_s", "peak_rss_mb", "foreign_cores")},
        "queries": [{k: q[k] for k in ("command", "wall_s", "peak_rss_mb", "foreign_cores")} for q in queries],
        "figures": figures,
        "targets": TARGETS,
        "targets_met": {k: figures[k] <= v for k, v in TARGETS.items()},
        "timing_guard": guard.describe(),
    }
    path = write_results("demo_cli", results)
    update_summary({k: round(v, 2) for k, v in figures.items()})
    for key, value in figures.items():
        print(f"{key}: {value:.2f}" + (f" (target {TARGETS[key]})" if key in TARGETS else ""))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
