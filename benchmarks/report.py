"""Render ``docs/benchmarks.md`` from the results files ``benchmarks/results/*.json``.

Run from the repository root (standard library only; reads the JSON, runs nothing)::

    python benchmarks/report.py           # writes docs/benchmarks.md
    python benchmarks/report.py --check   # exit 1 if docs/benchmarks.md differs from the rendering

One section per results file (``summary.json``, a derived digest, and ``build_cost_threads1.json`` are
skipped). Each section says what the benchmark measures, the command, commit, date and machine it ran
on, and a table of its headline figures. Where a file holds per-item data (per-target records of the
remove-and-retrain tests, repeats of a timing, per-query latencies) the mean comes with its standard
error (sd / sqrt(n)); methods are compared on the paired per-target differences, and a difference
counts as measurable only when it is at least :data:`MEASURABLE` standard errors. Figures scaled up
from a smaller timed run are labelled "(extrapolated)". A figure missing from a file renders as
"n/a" instead of failing the whole report.

:func:`render` is what ``tests/test_benchmarks_report.py`` compares the committed file with.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DOC = REPO / "docs" / "benchmarks.md"

#: results files that get no section: a derived digest, and a stale run being removed
SKIP = ("summary", "build_cost_threads1")
#: a paired difference counts as measurable when |mean| >= MEASURABLE x its standard error
MEASURABLE = 2.0
NA = "n/a"
NOT_RUN = "not run"  # a figure the flow a run used does not measure (not a missing key)
EXTRAPOLATED = " (extrapolated)"


# -- reading -----------------------------------------------------------------------------------------


def get(data: Any, *path: Any) -> Any:
    """``data[p0][p1]...``, or None where a step is missing (a dict key, a list index)."""
    for key in path:
        if isinstance(data, dict):
            data = data.get(key)
        elif isinstance(data, list) and isinstance(key, int) and -len(data) <= key < len(data):
            data = data[key]
        else:
            return None
        if data is None:
            return None
    return data


def num(x: Any) -> float | None:
    """A finite number as float, else None (booleans are not numbers here)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def numbers(values: Any) -> list[float]:
    """The finite numbers of a list (an empty list for anything else)."""
    return [v for v in (num(x) for x in values) if v is not None] if isinstance(values, list) else []


def ratio(top: Any, bottom: Any, scale: float = 1.0) -> float | None:
    """top / (bottom * scale), or None where either is missing or bottom is 0."""
    top, bottom = num(top), num(bottom)
    return None if top is None or not bottom else top / (bottom * scale)


def mean_se(values: list[float]) -> tuple[float, float | None, int] | None:
    """(mean, standard error sd/sqrt(n) or None below n = 2, n); None for no values."""
    if not values:
        return None
    n = len(values)
    se = statistics.stdev(values) / math.sqrt(n) if n > 1 else None
    return statistics.fmean(values), se, n


# -- formatting --------------------------------------------------------------------------------------


def _decimals3(x: float) -> int:
    """Decimals that show x to 3 significant digits (negative: round to tens, hundreds ...)."""
    if x == 0:
        return 2
    d = 2 - math.floor(math.log10(abs(x)))
    r = round(x, d)
    if r != 0 and math.floor(math.log10(abs(r))) > math.floor(math.log10(abs(x))):
        d -= 1  # 9.996 rounds up to 10.0: one digit fewer after the point
    return d


def sig3(x: Any) -> str:
    """3 significant digits, thousands separators, no exponent (ratios, seconds)."""
    x = num(x)
    if x is None:
        return NA
    d = _decimals3(x)
    return f"{round(x, d):,.{max(d, 0)}f}"


def small(x: Any) -> str:
    """A tiny figure (an error, a difference) to 2 significant digits: 5.7e-07, 0."""
    x = num(x)
    return NA if x is None else "0" if x == 0 else f"{x:.2g}"


def fixed(x: Any, decimals: int = 1) -> str:
    x = num(x)
    return NA if x is None else f"{x:,.{decimals}f}"


def count(x: Any) -> str:
    x = num(x)
    return NA if x is None else f"{round(x):,}"


def signed(x: Any, decimals: int = 3) -> str:
    x = num(x)
    if x is None:
        return NA
    s = f"{x:+.{decimals}f}"
    return "+" + s[1:] if float(s) == 0 else s  # no "-0.000"


def pvalue(p: Any) -> str:
    p = num(p)
    return NA if p is None else f"{p:.2g}"


def yes_no(x: Any) -> str:
    return NA if not isinstance(x, bool) else ("yes" if x else "no")


def pm(stats: tuple[float, float | None, int] | None, fmt: Callable[[float], str], se_fmt: Callable[[float], str] | None = None,
       show_n: bool = True) -> str:
    """``mean ± se (n = k)`` from :func:`mean_se`; the standard error in ``se_fmt`` (default: ``fmt``)."""
    if stats is None:
        return NA
    m, se, n = stats
    text = fmt(m) if se is None else f"{fmt(m)} ± {(se_fmt or fmt)(se)}"
    return f"{text} (n = {n})" if show_n else text


def pm_sig3(stats: tuple[float, float | None, int] | None, show_n: bool = True) -> str:
    """Mean and standard error with the mean's 3-significant-digit decimals."""
    if stats is None:
        return NA
    d = max(_decimals3(stats[0]), 0)
    return pm(stats, lambda v: f"{v:,.{d}f}", show_n=show_n)


def ms_from_s(x: Any) -> str:
    x = num(x)
    return NA if x is None else fixed(x * 1000, 1)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table (a cell's ``|`` escaped)."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "|".join("---" for _ in header) + "|"] + [line(r) for r in rows] + [""]


def code(x: Any) -> str:
    return NA if x is None else f"`{x}`"


# -- the line every section starts with --------------------------------------------------------------


def machine_text(machine: Any) -> str:
    cores = get(machine, "cores")
    cpu = get(machine, "cpu_model")
    ram = num(get(machine, "ram_total_gib"))
    parts = [f"{cores} cores" if cores is not None else "cores not recorded",
             str(cpu) if cpu else "CPU model not recorded",
             f"{ram:.1f} GiB RAM" if ram is not None else "RAM not recorded"]  # fmt: skip
    return ", ".join(parts)


def commit_text(versions: Any) -> str:
    commit = get(versions, "git_commit")
    text = f"`{str(commit)[:10]}`" if commit else "not recorded"
    dirty = get(versions, "git_uncommitted_tracked_files")
    if isinstance(dirty, list) and dirty:
        text += f" plus uncommitted changes to {len(dirty)} file(s)"
    return text


def date_text(date: Any) -> str:
    return str(date)[:10] if isinstance(date, str) and len(date) >= 10 else "not recorded"


def provenance(data: dict) -> str:
    command = data.get("command")
    line = (f"**Command** {code(command) if command else 'not recorded'}; **commit** {commit_text(data.get('versions'))}; "
            f"**date** {date_text(data.get('date'))}; **machine** {machine_text(data.get('machine'))}")
    foreign = num(data.get("other_processes_cores_during_run"))
    if foreign is not None:
        line += f"; other processes used {foreign:.2f} cores on average during the run"
    return line + "."


# -- paired comparisons of remove-and-retrain methods ------------------------------------------------


def target_deltas(records: Any, key: str, metric: str = "rr") -> list[float | None]:
    """Per target: ``after[key][metric] - before[metric]`` (ΔMRR for ``rr``), None where missing."""
    out: list[float | None] = []
    for record in records if isinstance(records, list) else []:
        before, after = num(get(record, "before", metric)), num(get(record, "after", key, metric))
        out.append(None if before is None or after is None else after - before)
    return out


def present(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def paired(a: list[float | None], b: list[float | None]) -> list[float]:
    """Per-target differences a - b where both are known."""
    return [x - y for x, y in zip(a, b) if x is not None and y is not None]


def compare(name_a: str, name_b: str, diffs: list[float]) -> tuple[str, bool | None]:
    """The conclusion sentence for paired ΔMRR differences (a - b per target), and whether it is measurable.

    Lower ΔMRR = the removal lowered the target's reciprocal rank more = that method "removes more"."""
    stats = mean_se(diffs)
    if stats is None or stats[1] is None:
        return f"{name_a} vs {name_b}: too few paired targets to compare (n = {len(diffs)}).", None
    m, se, n = stats
    if all(v == 0 for v in diffs):
        return f"no measurable difference between {name_a} and {name_b}: identical on every target (n = {n}).", False
    if abs(m) < 1e-12 or abs(m) < MEASURABLE * se:
        return (f"no measurable difference between {name_a} and {name_b}: paired ΔMRR difference "
                f"{signed(m)} ± {se:.3f} (n = {n}).", False)  # fmt: skip
    better, worse = (name_a, name_b) if m < 0 else (name_b, name_a)
    return f"{better} removes more than {worse}: its ΔMRR is lower by {abs(m):.3f} ± {se:.3f} (paired, n = {n}).", True


def wilcoxon_text(entry: Any) -> str:
    """The recorded paired Wilcoxon test, two-sided p per value compared."""
    parts = [f"{what} p = {pvalue(get(entry, key, 'p_two_sided'))}"
             for key, what in (("rr", "reciprocal rank"), ("score", "score"), ("log_p", "log-probability")) if get(entry, key) is not None]
    return ", ".join(parts) if parts else NA


def method_label(m: str) -> str:
    return f"`{m}`"


# -- sections ----------------------------------------------------------------------------------------


def section_agreement(d: dict, results_dir: Path) -> list[str]:
    rows = []
    for setting, r in (d.get("results") or {}).items():
        exact = num(get(r, "exact_analyzer_seconds"))
        for name, idx in (get(r, "indexes") or {}).items():
            default = get(idx, "default")
            rows.append([setting, _sketch_label(name, get(idx, "sketch_dim")),
                         fixed(get(default, "recall_at_10_proponents"), 3), fixed(get(default, "recall_at_10_opponents"), 3),
                         small(get(default, "largest_relative_error")), fixed(get(default, "candidates_per_test_triple_mean"), 1),
                         ms_from_s(get(default, "seconds_per_test_triple")),
                         fixed(get(idx, "approximate", "recall_at_10_proponents"), 3),
                         ms_from_s(get(idx, "approximate", "seconds_per_test_triple")),
                         count(get(idx, "bytes_per_triple_checkpoint")), sig3(get(idx, "build_seconds")),
                         sig3(exact)])  # fmt: skip
    out = ["Per setting and sketch dimension (the index's default and fixed ones): the exact query (default) and the "
           "approximate one (sketch scores only), each over the setting's test triples; recall@10 is the share of "
           "exact TracIn's top 10 found.", ""]
    out += table(["setting", "sketch", "recall@10 proponents", "recall@10 opponents", "largest relative error",
                  "candidates rescored (mean)", "query ms / test triple", "approximate recall@10 proponents",
                  "approximate ms / test triple", "bytes / triple / checkpoint", "build s", "exact TracIn s (all test triples)"], rows)  # fmt: skip
    tests = sorted({str(get(r, "test_triples")) for r in (d.get("results") or {}).values()})
    out.append(f"Recall and errors are means over the test triples ({', '.join(tests)} per setting); the file records no "
               "per-test values, so no standard error is given (a recall of 1.000 means every test triple's top 10 matched). "
               "Timings are one run each.")
    return out


def _sketch_label(name: str, dim: Any) -> str:
    if name != "default":
        return str(name)
    return "default (no sketch)" if dim == 0 else f"default (dim {count(dim)})"


def _times_rows(times: Any, names: list[tuple[str, str]]) -> list[list[str]]:
    rows = []
    for key, label in names:
        t = get(times, key)
        if t is None:
            continue
        rows.append([label, sig3(get(t, "median_s")), pm_sig3(mean_se(numbers(get(t, "per_repeat_s")))),
                     count(get(t, "triples")), count(get(t, "triples_per_s"))])  # fmt: skip
    return rows


def loop_extrapolated(loop: Any, total: Any) -> bool:
    """A per-triple loop timed on fewer triples than the whole and scaled up."""
    if get(loop, "full_s_extrapolated") is True:
        return True
    timed, total = num(get(loop, "triples")), num(total)
    return timed is not None and total is not None and timed < total


def section_build_cost(d: dict, results_dir: Path) -> list[str]:
    times, ratios, settings = d.get("times"), d.get("ratios"), d.get("settings")
    total = get(settings, "training_triples")
    ckpts = num(get(settings, "checkpoints"))
    loop = get(times, "loop")
    loop_x = loop_extrapolated(loop, total)
    x = EXTRAPOLATED if loop_x else ""
    out = [f"Model: {get(settings, 'model') or NA}; {count(total)} training triples, {count(ckpts)} checkpoints; "
           f"selection: {get(settings, 'selection') or NA}; {get(settings, 'threads') or NA} threads; "
           f"{get(settings, 'repeats') or NA} repeats (Captum {get(settings, 'captum_repeats') or NA}), methods rotated each repeat.", ""]
    rows = _times_rows(times, [("build", "index build (all checkpoints)"), ("gradients", "gradients, one checkpoint"),
                               ("epoch", "training epoch"), ("loop", "per-triple autograd loop"),
                               ("captum", "Captum TracInCPFastRandProj (all checkpoints)")])  # fmt: skip
    rows.append(["index build per checkpoint", sig3(get(times, "build", "per_checkpoint_s")), NA if ckpts is None else
                 pm_sig3(mean_se([v / ckpts for v in numbers(get(times, "build", "per_repeat_s"))])), count(get(settings, "training_triples")), ""])
    rows.append([f"per-triple loop over all {count(total)} triples{x}", sig3(get(loop, "full_s")), "", count(total), ""])
    out += table(["timed", "median s", "mean s ± SE (repeats)", "triples", "triples / s"], rows)
    loop_note = (f"The per-triple loop was timed on {count(get(loop, 'triples'))} of the {count(total)} triples and scaled up, "
                 "so its full time and the speedup against it are extrapolated." if loop_x else "")
    out += table(["ratio (from the medians, measured side by side in this run)", "value"], [
        ["index build per checkpoint / training epoch", sig3(get(ratios, "build_vs_epoch_ratio"))],
        ["gradients of one checkpoint / training epoch", sig3(get(ratios, "gradients_vs_epoch_ratio"))],
        [f"per-triple loop / index build per checkpoint (speedup){x}", sig3(get(ratios, "build_vs_loop_speedup"))],
        ["Captum per checkpoint / index build per checkpoint (speed)", sig3(get(ratios, "build_vs_captum_speed"))],
        ["index bytes per triple and checkpoint", count(d.get("index_bytes_per_triple_checkpoint"))],
        ["index bytes in all", count(get(times, "build", "breakdown_median_s", "index_bytes"))],
    ])  # fmt: skip
    breakdown = get(times, "build", "breakdown_median_s") or {}
    parts = [f"{k.removesuffix('_s')} {sig3(v)} s" for k, v in breakdown.items() if k.endswith("_s")]
    out.append("Build breakdown (medians): " + (", ".join(parts) if parts else NA) + ".")
    out.append("")
    out.append("Targets: " + _targets(d) + ". " + loop_note)
    return [line.rstrip() for line in out]


def _targets(d: dict) -> str:
    met = d.get("targets_met")
    if not isinstance(met, dict) or not met:
        return NA
    return ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in sorted(met.items()))


def section_dask_cluster(d: dict, results_dir: Path) -> list[str]:
    f, p = d.get("figures"), d.get("protocol")
    one = numbers(get(f, "query_times_ms_one_index"))
    shards = numbers(get(f, "query_times_ms_search_shards"))
    diffs = [b - a for a, b in zip(one, shards)] if len(one) == len(shards) else []
    fmt1 = lambda v: f"{v:,.1f}"
    out = [f"{count(get(p, 'training_triples'))} training triples, {count(get(p, 'checkpoints'))} checkpoints, "
           f"{count(get(p, 'workers'))} workers; {count(get(p, 'queries'))} queries; threads: {get(p, 'threads') or NA}.", ""]
    out += table(["figure", "value"], [
        ["single-process build s", sig3(get(f, "single_process_build_s"))],
        [f"Dask build s ({count(get(p, 'workers'))} workers)", sig3(get(f, "dask_build_s"))],
        ["Dask build speedup", sig3(get(f, "dask_build_speedup_2_workers"))],
        ["Dask cluster start s", sig3(get(f, "dask_cluster_start_s"))],
        ["shards identical to the single-process build", yes_no(get(f, "shards_identical"))],
        ["Dask overhead per task ms", fixed(get(f, "dask_task_overhead_ms"), 1)],
        ["bytes moved per task", count(get(f, "bytes_moved_per_task"))],
        ["query p50 ms, one index", fixed(get(f, "query_p50_ms_one_index"), 1)],
        [f"query p50 ms, {count(get(f, 'search_shards'))} search shards", fixed(get(f, "query_p50_ms_search_shards"), 1)],
        ["query mean ms ± SE, one index", pm(mean_se(one), fmt1)],
        ["query mean ms ± SE, search shards", pm(mean_se(shards), fmt1)],
        ["sharded minus one index, paired per query, mean ms ± SE", pm(mean_se(diffs), fmt1)],
    ])  # fmt: skip
    out.append("The builds are one run each (no repeats, so no standard error for them or for the speedup).")
    return out


def section_demo_cli(d: dict, results_dir: Path) -> list[str]:
    demo, f = d.get("demo"), d.get("figures")
    queries = d.get("queries") if isinstance(d.get("queries"), list) else []
    walls = numbers([get(q, "wall_s") for q in queries])
    rss = numbers([get(q, "peak_rss_mb") for q in queries])
    cpu = [num(get(demo, "user_s")), num(get(demo, "sys_s"))]
    out = ["The demo trains a small model, builds its index and writes the explorer, in one cold command.", ""]
    out += table(["figure", "value"], [
        ["demo wall s", sig3(get(demo, "wall_s"))],
        ["demo CPU s (user + sys)", NA if None in cpu else sig3(sum(cpu))],
        ["demo peak RSS MB", fixed(get(demo, "peak_rss_mb"), 1)],
        ["demo folder MB", fixed(get(f, "demo_mb"), 1)],
        ["demo index MB", fixed(get(f, "demo_index_mb"), 1)],
        [f"cold `tracin-index query` s, median of {len(walls)}", sig3(get(f, "cli_query_s_demo"))],
        ["cold `tracin-index query` s, mean ± SE", pm_sig3(mean_se(walls))],
        ["cold `tracin-index query` peak RSS MB (max)", fixed(max(rss), 1) if rss else NA],
    ])  # fmt: skip
    out.append("Targets: " + _targets(d) + ". The demo is one run.")
    return out


def _faith_setting_methods(r: dict) -> list[str]:
    methods = r.get("methods")
    return [str(m) for m in methods] if isinstance(methods, list) else sorted({k.rsplit("@", 1)[0] for k in (r.get("tables") or {})})


def _delta_stats(r: dict, method: str, k: int) -> tuple[float, float | None, int] | None:
    """ΔMRR of ``method@k``: from the per-target records where there are any, else the recorded table."""
    key = f"{method}@{k}"
    values = present(target_deltas(r.get("per_target"), key))
    if values:
        return mean_se(values)
    row = get(r, "tables", key)
    m, se, n = num(get(row, "delta_mrr")), num(get(row, "delta_mrr_sem")), get(row, "n")
    return None if m is None else (m, se, n if isinstance(n, int) else 0)


def _main_k(d: dict) -> int:
    ks = get(d, "protocol", "ks")
    ks = [k for k in ks if isinstance(k, int)] if isinstance(ks, list) else []
    return max(ks) if ks else 10


def section_faithfulness(d: dict, results_dir: Path) -> list[str]:
    results = d.get("results") or {}
    k = _main_k(d)
    settings = list(results)
    methods: list[str] = []
    for r in results.values():
        methods += [m for m in _faith_setting_methods(r) if m not in methods]
    out = [f"Per setting, the targets are test triples the full model ranks first; ΔMRR at k = {k} is the mean change of "
           f"the target's filtered reciprocal rank after removing k training triples and retraining (0 = no effect, "
           f"-1 = every target lost rank 1 entirely); ± is the standard error over the targets. Protocol: "
           f"{get(d, 'protocol', 'index') or NA}.", ""]
    rows = [["model", *[str(get(results, s, "model") or NA) for s in settings]],
            ["training triples", *[count(get(results, s, "num_train")) for s in settings]],
            ["targets", *[count(get(results, s, "num_targets")) for s in settings]],
            ["full-model test MRR (filtered, tail)", *[fixed(get(results, s, "full_model_test_mrr_filtered_tail"), 3) for s in settings]]]
    for m in methods:
        rows.append([f"ΔMRR@{k} {method_label(m)}", *[pm(_delta_stats(results[s], m, k), lambda v: f"{v:.3f}", show_n=False)
                                                     if m in _faith_setting_methods(results[s]) else "—" for s in settings]])  # fmt: skip
    rows.append([f"index top {k} = exact top {k} (share)", *[fixed(get(results, s, "proponent_overlap", f"proponents_vs_exact_top{k}"), 3) for s in settings]])
    rows.append([f"approximate top {k} vs exact (overlap)",
                 *[fixed(get(results, s, "proponent_overlap", f"proponents_approximate_vs_exact_top{k}"), 3) for s in settings]])
    rows.append([f"Wilcoxon p, proponents vs random_neighbours@{k} (reciprocal rank)",
                 *[pvalue(get(results, s, "wilcoxon", f"proponents_vs_random_neighbours@{k}", "rr", "p_two_sided")) for s in settings]])
    out += table(["", *settings], rows)
    out.append("— = not run in that setting. The k = 3 tables and the per-target records are in the JSON.")
    out.append("")
    out.append(f"Paired comparisons at k = {k} (per target; measurable = at least {MEASURABLE:g} standard errors of the paired differences):")
    out.append("")
    pairs = [("proponents", "random_neighbours"), ("proponents", "random"), ("proponents", "proponents_exact"),
             ("proponents", "proponents_approximate"), ("proponents_exact_all", "proponents_exact")]  # fmt: skip
    tally: dict[tuple[str, str], dict[str, list[str]]] = {}
    for s in settings:
        r = results[s]
        have = _faith_setting_methods(r)
        for a, b in pairs:
            if a in have and b in have:
                diffs = paired(target_deltas(r.get("per_target"), f"{a}@{k}"), target_deltas(r.get("per_target"), f"{b}@{k}"))
                text, measurable = compare(method_label(a), method_label(b), diffs)
                out.append(f"- {s}: {text}")
                verdict = "unknown" if measurable is None else "same" if not measurable else "a" if statistics.fmean(diffs) < 0 else "b"
                tally.setdefault((a, b), {"a": [], "b": [], "same": [], "unknown": []})[verdict].append(s)
    main = [s for s in (get(d, "protocol", "main_settings") or []) if s in results]
    if main:
        diffs: list[float] = []
        for s in main:
            pt = results[s].get("per_target")
            diffs += paired(target_deltas(pt, f"proponents@{k}"), target_deltas(pt, f"random_neighbours@{k}"))
        text, _ = compare("`proponents`", "`random_neighbours`", diffs)
        pooled = [pm(mean_se(present(sum((target_deltas(results[s].get("per_target"), f"{m}@{k}") for s in main), []))),
                     lambda v: f"{v:.3f}") for m in ("proponents", "random_neighbours")]  # fmt: skip
        out.append(f"- {' + '.join(main)} pooled (the summary's `faith_delta_mrr_*`): ΔMRR {pooled[0]} for `proponents`, "
                   f"{pooled[1]} for `random_neighbours`; {text}")
    out.append("")
    out.append("**Conclusion:** " + " ".join(_tally_sentence(a, b, t) for (a, b), t in tally.items()))
    return out


def _tally_sentence(a: str, b: str, t: dict[str, list[str]]) -> str:
    """How a paired comparison came out across settings, in one sentence."""
    total = sum(len(v) for v in t.values())

    def where(names: list[str]) -> str:
        if total == 1:
            return f"the one setting that ran both ({names[0]})"
        return f"{len(names)} of {total} settings" + (f" ({', '.join(names)})" if len(names) < total else "")

    parts = []
    if t["a"]:
        parts.append(f"{method_label(a)} removes measurably more than {method_label(b)} in {where(t['a'])}")
    if t["b"]:
        parts.append(f"{method_label(b)} removes measurably more than {method_label(a)} in {where(t['b'])}")
    if t["same"]:
        parts.append(f"no measurable difference between {method_label(a)} and {method_label(b)} in {where(t['same'])}")
    if t["unknown"]:
        parts.append(f"{method_label(a)} and {method_label(b)} cannot be compared (too few targets) in {where(t['unknown'])}")
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "." if text.startswith("no") else text + "."


def _faith_defaults_rows(d: dict, methods: list[str], k: int, label: Callable[[str], str],
                         overlap_key: Callable[[str], str], extra: Callable[[str], str] | None = None) -> list[list[str]]:
    rows = []
    for m in methods:
        row = get(d, "tables", f"{m}@{k}")
        cells = [label(m), pm(_delta_stats(d, m, k), lambda v: f"{v:.3f}"), signed(get(row, "delta_hits1"), 2),
                 fixed(get(row, "mean_rank_after"), 2), fixed(get(row, "share_argmax_changed"), 2),
                 fixed(get(d, "overlap", overlap_key(m)), 2) if overlap_key(m) else "—"]  # fmt: skip
        if extra is not None:
            cells.append(extra(m))
        rows.append(cells)
    return rows


def section_faithfulness_baselines(d: dict, results_dir: Path) -> list[str]:
    p = d.get("protocol") or {}
    out = [f"{count(get(p, 'targets'))} targets per graph in {count(get(p, 'groups'))} groups, one retrain per method, "
           f"k, group and seed ({', '.join(str(s) for s in get(p, 'seeds') or [])}), {count(get(p, 'epochs'))} epochs; "
           f"noise: {get(p, 'noise') or NA}. Delta = after minus before (negative: the prediction fell), mean over "
           "targets with its 95% paired bootstrap interval; p: Wilcoxon signed-rank, Holm-adjusted over each graph's "
           "comparisons.", ""]  # fmt: skip

    def interval(t: Any, key: str) -> str:
        ci = get(t, f"{key}_ci95")
        low, high = (num(ci[0]), num(ci[1])) if isinstance(ci, list) and len(ci) == 2 else (None, None)
        return f"{signed(get(t, key))} [{signed(low)}, {signed(high)}]"

    for name, g in (d.get("graphs") or {}).items():
        tables = get(g, "tables") or {}
        seconds = get(g, "seconds_per_explained_prediction") or {}
        out.append(f"**{name}** ({count(get(g, 'retrains'))} distinct retrains of {sig3(get(g, 'retrain_seconds_mean'))} s "
                   f"on average; a retrain with nothing removed differs from the full model by at most "
                   f"{small(get(g, 'retrain_nothing_removed_max_abs_score_diff'))} in score):")
        out.append("")
        rows = [[key, interval(t, "delta_mrr"), interval(t, "delta_hits1"), count(get(t, "n")),
                 "(reference)" if key.startswith("noise@") else sig3(seconds.get(key.split("@")[0])) if isinstance(seconds, dict) else NA]
                for key, t in sorted(tables.items(), key=lambda kv: (int(kv[0].split("@")[1]), num(get(kv[1], "delta_mrr")) or 0.0))]
        out += table(["method@k", "delta MRR [95% CI]", "delta Hits@1 [95% CI]", "targets", "s per prediction"], rows)
        best = get(g, "best_baseline") or {}
        tests = [r for r in get(g, "comparisons") or [] if get(r, "method") == "proponents"]
        out += table(["k", "proponents against", "mean difference in delta MRR", "p (Holm)"],
                     [[count(get(r, "k")), f"{get(r, 'against')}" + (" (best baseline)" if best.get(str(get(r, 'k'))) == get(r, "against") else ""),
                       signed(get(r, "mean_difference_mrr")), pvalue(get(r, "p_mrr_holm"))] for r in tests])  # fmt: skip
    return out


def section_faithfulness_defaults(d: dict, results_dir: Path) -> list[str]:
    p = d.get("protocol") or {}
    k = _main_k(d)
    methods = [str(m) for m in p.get("methods") or []] or sorted({key.rsplit("@", 1)[0] for key in (d.get("tables") or {})})
    out = [f"{p.get('model') or NA} on {p.get('dataset') or NA}, {count(p.get('epochs'))} epochs, trained as users train "
           f"({p.get('training') or NA}); index: {p.get('index') or NA}; {count(d.get('num_targets'))} targets ranked first by the "
           f"full model (test MRR {fixed(d.get('full_model_test_mrr_filtered_tail'), 3)}); {count(d.get('retrains'))} retrains, "
           f"retrain with nothing removed reproduces the scores (max abs difference {small(d.get('retrain_nothing_removed_max_abs_score_diff'))}).", ""]
    out += table(["method", f"ΔMRR@{k} ± SE", "ΔHits@1", "mean rank after", "share argmax changed", f"top-{k} overlap with `proponents`"],
                 _faith_defaults_rows(d, methods, k, method_label,
                                      lambda m: "" if m == "proponents" or m.startswith("random") else f"{m}_vs_proponents_top{k}"))  # fmt: skip
    w = get(d, "wilcoxon", f"proponents_vs_random_neighbours@{k}")
    if w is not None:
        out.append(f"Recorded paired Wilcoxon signed-rank test, `proponents` vs `random_neighbours` at k = {k} "
                   f"(n = {get(w, 'n')}), two-sided: {wilcoxon_text(w)}.")
        out.append("")
    out.append(f"Paired comparisons with the default `proponents` at k = {k} (per target; measurable = at least "
               f"{MEASURABLE:g} standard errors of the paired differences):")
    out.append("")
    base = target_deltas(d.get("per_target"), f"proponents@{k}")
    verdicts: dict[str, list[str]] = {"more": [], "less": [], "same": [], "unknown": []}
    for m in methods:
        if m != "proponents":
            diffs = paired(base, target_deltas(d.get("per_target"), f"{m}@{k}"))
            text, measurable = compare("`proponents`", method_label(m), diffs)
            out.append(f"- {text}")
            verdict = "unknown" if measurable is None else "same" if not measurable else "more" if statistics.fmean(diffs) < 0 else "less"
            verdicts[verdict].append(method_label(m))
    out.append("")
    out.append("**Conclusion:** " + _verdict_sentence("the default `proponents`", verdicts))
    return out


def _verdict_sentence(subject: str, verdicts: dict[str, list[str]]) -> str:
    parts = []
    if verdicts["more"]:
        parts.append(f"remove measurably more than {', '.join(verdicts['more'])}")
    if verdicts["less"]:
        parts.append(f"remove measurably less than {', '.join(verdicts['less'])}")
    if verdicts["same"]:
        parts.append(f"show no measurable difference from {', '.join(verdicts['same'])}")
    if verdicts["unknown"]:
        parts.append(f"have too few targets to compare with {', '.join(verdicts['unknown'])}")
    text = f"{subject} " + "; ".join(parts) if parts else "nothing to compare"
    return text[0].upper() + text[1:] + "."


def _layer_key(n: str) -> tuple[int, int]:
    return (1, 0) if n == "all" else (0, int(n)) if n.isdigit() else (2, 0)


def section_faithfulness_layers(d: dict, results_dir: Path) -> list[str]:
    k = _main_k(d)
    methods = [str(m) for m in get(d, "protocol", "methods") or []]
    layers = {m.removeprefix("layers_"): m for m in methods if m.startswith("layers_")}
    per_target = {n: target_deltas(d.get("per_target"), f"{m}@{k}") for n, m in layers.items()}
    stats = {n: _delta_stats(d, m, k) for n, m in layers.items()}
    sel = d.get("layer_selections") or {}
    rows = {n: [f"N = {n}", str(sel.get(m) or NA), pm(stats[n], lambda v: f"{v:.3f}"),
                signed(get(d, "tables", f"{m}@{k}", "delta_hits1"), 2), fixed(get(d, "tables", f"{m}@{k}", "mean_rank_after"), 2),
                fixed(get(d, "overlap", f"{m}_vs_proponents_top{k}"), 3), sig3(get(d, "timings", f"{m}_s"))]
            for n, m in layers.items()}  # fmt: skip
    note = ""
    defaults_path = results_dir / "faithfulness_defaults.json"
    if defaults_path.is_file() and "2" not in layers:
        dd = json.loads(defaults_path.read_text(encoding="utf-8"))
        same = [get(t, "target") for t in dd.get("per_target") or []] == [get(t, "target") for t in d.get("per_target") or []]
        deltas = target_deltas(dd.get("per_target"), f"proponents@{k}")
        if same and present(deltas):
            per_target["2"] = deltas
            stats["2"] = mean_se(present(deltas))
            how = "paired with the others by target (same protocol and targets; retraining is deterministic)"
        else:
            stats["2"] = _delta_stats(dd, "proponents", k)
            how = "not paired: its targets differ from this file's"
        rows["2"] = ["N = 2 (default)", str(dd.get("index_parameters") or NA), pm(stats["2"], lambda v: f"{v:.3f}"),
                     signed(get(dd, "tables", f"proponents@{k}", "delta_hits1"), 2),
                     fixed(get(dd, "tables", f"proponents@{k}", "mean_rank_after"), 2), "1.000", sig3(get(dd, "timings", "query_s"))]  # fmt: skip
        note = (f"N = 2 (the default, `proponents`) comes from `faithfulness_defaults.json`, a separate run at commit "
                f"{commit_text(dd.get('versions'))}, {how}.")
    p = d.get("protocol") or {}
    out = [f"{p.get('model') or NA} on {p.get('dataset') or NA}, the protocol of `faithfulness_defaults.json`: remove the top {k} "
           f"proponents of exact TracIn over the last N layers' gradients, retrain, measure ΔMRR; "
           f"{count(d.get('num_targets'))} targets.", ""]
    order = sorted(rows, key=_layer_key)
    out += table(["N", "parameters", f"ΔMRR@{k} ± SE", "ΔHits@1", "mean rank after", f"top-{k} overlap with N = 2", "query s"],
                 [rows[n] for n in order])  # fmt: skip
    if note:
        out += [note, ""]
    out.append(f"Paired comparisons at k = {k} (per target; measurable = at least {MEASURABLE:g} standard errors of the paired differences):")
    out.append("")
    measurable, largest = [], None
    comparable = [n for n in order if n in per_target]
    for i, a in enumerate(comparable):
        for b in comparable[i + 1:]:
            diffs = paired(per_target[a], per_target[b])
            text, is_measurable = compare(f"N = {a}", f"N = {b}", diffs)
            out.append(f"- {text}")
            s = mean_se(diffs)
            if s is not None and s[1]:
                z = abs(s[0]) / s[1]
                largest = z if largest is None else max(largest, z)
            if is_measurable:
                measurable.append(text)
    out.append("")
    if not measurable and largest is not None:
        out.append(f"**Conclusion:** no N is measurably better: every paired difference lies within {MEASURABLE:g} standard "
                   f"errors (the largest is {largest:.2f} standard errors).")
    elif measurable:
        out.append("**Conclusion:** measurable differences: " + " ".join(measurable))
    else:
        out.append("**Conclusion:** too few paired targets to compare the N.")
    return out


def section_gradient_throughput(d: dict, results_dir: Path) -> list[str]:
    times, ratios, s = d.get("times"), d.get("ratios"), d.get("settings")
    total = get(s, "training_triples")
    loop = get(times, "loop")
    timed = get(s, "loop_triples")
    loop_x = get(loop, "full_s_extrapolated") is True or (num(timed) is not None and num(total) is not None and num(timed) < num(total))
    x = EXTRAPOLATED if loop_x else ""
    out = [f"{get(s, 'dataset') or NA}, {get(s, 'model') or NA}, {count(total)} training triples; selection: "
           f"{get(s, 'selection') or NA}; loss {get(s, 'loss') or NA}, batch {count(get(s, 'batch_size'))}, "
           f"{count(get(s, 'threads'))} threads, {count(get(s, 'repeats'))} repeats, methods rotated each repeat.", ""]
    rows = _times_rows(times, [("batched", "batched per-triple gradients (GradientComputer)"),
                               ("loop", f"per-triple autograd loop{x}"), ("epoch", "training epoch"),
                               ("forward", "forward pass")])  # fmt: skip
    out += table(["timed (all training triples)", "median s", "mean s ± SE (repeats)", "triples", "triples / s"], rows)
    out += table(["ratio (from the medians, measured side by side in this run)", "value"], [
        ["batched gradients / training epoch", sig3(get(ratios, "batched_vs_epoch"))],
        [f"per-triple loop / batched gradients (speedup){x}", sig3(get(ratios, "batched_vs_loop_speedup"))],
        ["batched gradients / forward pass", sig3(get(ratios, "batched_vs_forward"))],
        ["max relative difference, batched vs loop (squared gradient norms, first 16 triples)",
         small(get(d, "consistency_check", "max_rel_diff"))],
    ])  # fmt: skip
    out.append("Targets: " + _targets(d) + "." + (f" The loop timed {count(timed)} of {count(total)} triples." if loop_x else
                                                 " The loop timed every training triple (nothing extrapolated)."))
    return out


def section_last_vs_all(d: dict, results_dir: Path) -> list[str]:
    a, s = d.get("agreement"), d.get("settings")
    spearman = numbers(get(a, "spearman_per_test"))
    last = numbers([get(t, "seconds") for t in get(d, "timings", "last") or []])
    every = numbers([get(t, "seconds") for t in get(d, "timings", "all") or []])
    out = [f"Setting {get(s, 'setting') or NA}: {count(get(s, 'num_test'))} test triples, {count(get(s, 'num_train'))} training "
           f"triples, {count(len(get(s, 'checkpoints') or []))} checkpoints, loss {get(s, 'loss') or NA}, "
           f"{count(get(s, 'threads'))} thread(s); last = {count(get(d, 'num_parameters', 'last'))} parameters, all = "
           f"{count(get(d, 'num_parameters', 'all'))}.", ""]
    out += table(["figure", "value"], [
        ["top-10 overlap, proponents", fixed(get(a, "top10_overlap_proponents"), 3)],
        ["top-10 overlap, opponents", fixed(get(a, "top10_overlap_opponents"), 3)],
        ["top-10 overlap, both", fixed(get(a, "top10_overlap"), 3)],
        ["top-50 overlap, both", fixed(get(a, "top50_overlap"), 3)],
        ["Spearman per test triple, mean ± SE", pm(mean_se(spearman), lambda v: f"{v:.3f}")],
        ["Spearman, lowest test triple", fixed(get(a, "spearman_min"), 3)],
        ["sign agreement", fixed(get(a, "sign_agreement"), 3)],
        ["exact TracIn s, last layers: median", sig3(get(d, "median_seconds", "last"))],
        ["exact TracIn s, last layers: mean ± SE (repeats)", pm_sig3(mean_se(last))],
        ["exact TracIn s, all parameters: median", sig3(get(d, "median_seconds", "all"))],
        ["exact TracIn s, all parameters: mean ± SE (repeats)", pm_sig3(mean_se(every))],
        ["speedup of last layers over all (medians)", sig3(d.get("speedup_all_over_last"))],
    ])  # fmt: skip
    out.append("The overlaps are means over the test triples; the file records no per-test overlaps, so only the "
               "Spearman correlation has a standard error.")
    return out


def section_layers_sweep(d: dict, results_dir: Path) -> list[str]:
    s, results = d.get("settings"), d.get("results") or {}
    order = sorted(results, key=_layer_key)
    rows = [[f"N = {n}", count(get(results, n, "num_parameters")), fixed(get(results, n, "top10_overlap_proponents"), 3),
             fixed(get(results, n, "top10_overlap_opponents"), 3), fixed(get(results, n, "spearman_proponents"), 3),
             fixed(get(results, n, "spearman_opponents"), 3), sig3(get(results, n, "exact_seconds")),
             sig3(get(results, n, "speed_vs_all")), count(get(results, n, "gradient_triples_per_s")),
             count(get(results, n, "index_bytes_per_triple_checkpoint")), sig3(get(results, n, "build_seconds"))]
            for n in order]  # fmt: skip
    out = [f"Setting {get(s, 'setting') or NA}: {count(get(s, 'num_test'))} test triples, {count(get(s, 'num_train'))} training "
           f"triples, {count(get(s, 'checkpoints'))} checkpoints, loss {get(s, 'loss') or NA}; overlaps and Spearman against all parameters.", ""]
    out += table(["N", "parameters", "top-10 overlap proponents", "top-10 overlap opponents", "Spearman proponents",
                  "Spearman opponents", "exact s", "speed vs all", "gradients triples / s", "index bytes / triple / checkpoint",
                  "build s"], rows)  # fmt: skip
    out.append(f"The overlaps are means over the {count(get(s, 'num_test'))} test triples and each timing is one run; the file "
               "records no per-test values or repeats, so no standard error can be given and this file cannot show that "
               "any N is measurably better. The remove-and-retrain comparison across N is in `faithfulness_layers.json` (below).")
    out.append("")
    best = d.get("best_n")
    summary_path = results_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    recommended = summary.get("layers_sweep_best_n") if isinstance(summary, dict) else None
    text = (f"`best_n` recorded in this file: **{best if best is not None else NA}** (the N with the highest mean top-10 overlap "
            f"with all parameters, proponents and opponents; the smaller N on ties). ")
    if recommended is None:
        text += "`summary.json` records no `layers_sweep_best_n`."
    elif str(recommended) == str(best):
        text += f"`summary.json`'s `layers_sweep_best_n` agrees: {recommended}."
    else:
        text += (f"It disagrees with `summary.json`'s `layers_sweep_best_n`, **{recommended}**, the N the README recommends "
                 "(the smallest N whose remove-and-retrain ΔMRR is within 0.05 of the best N's and whose top-10 proponents "
                 "overlap all-parameter TracIn's at least 0.8): the two use different criteria.")
    out.append(text)
    return out


def section_scale(d: dict, results_dir: Path) -> list[str]:
    results = d.get("results") or {}
    sizes = sorted(results, key=lambda n: num(get(results, n, "training_triples")) or 0.0)
    targets = d.get("targets_ms") or {}

    def col(fn: Callable[[str, Any], str]) -> list[str]:
        return [fn(n, results[n]) for n in sizes]

    def warm(fn: Callable[[str, Any], str]) -> list[str]:  # the warm single-query flow: not run on --batched sizes
        return [NOT_RUN if get(results[n], "flow") == "batched" else fn(n, results[n]) for n in sizes]

    def batched(fn: Callable[[str, Any], str]) -> list[str]:  # the command line's batches: only on --batched sizes
        return [fn(n, results[n]) if get(results[n], "batched_queries") else NOT_RUN for n in sizes]

    def epoch_s(r: Any) -> Any:  # timed on its own, or the whole training when it was one epoch
        if get(r, "epoch_s") is not None or num(get(r, "training", "epochs")) != 1:
            return get(r, "epoch_s")
        return get(r, "training", "train_seconds")

    def epoch_x(r: Any) -> bool:
        timed, every = num(get(r, "epoch", "timed_rows")), num(get(r, "epoch", "all_rows"))
        return timed is not None and every is not None and timed < every

    rows = [
        ["measured at commit", *col(lambda n, r: f"`{str(get(r, 'measured', 'git_commit') or get(d, 'versions', 'git_commit'))[:10]}`")],
        ["measured by", *col(lambda n, r: code(get(r, "measured", "command") or d.get("command")))],
        ["measured on", *col(lambda n, r: date_text(get(r, "measured", "date") or d.get("date")))],
        ["training triples", *col(lambda n, r: count(get(r, "training_triples")))],
        ["entities", *col(lambda n, r: count(get(r, "entities")))],
        ["checkpoints", *col(lambda n, r: count(get(r, "training", "checkpoints")))],
        ["model test MRR (a random ranking's)", *col(lambda n, r: f"{fixed(get(r, 'model_quality', 'mrr'), 3)} ({fixed(get(r, 'model_quality', 'random_mrr'), 4)})")],
        ["training epoch s", *col(lambda n, r: sig3(epoch_s(r)) + (EXTRAPOLATED if epoch_x(r) else ""))],
        ["index build wall s (all checkpoints)", *col(lambda n, r: sig3(get(r, "build", "wall_s")))],
        ["index build per checkpoint s", *col(lambda n, r: sig3(get(r, "build", "per_checkpoint_s")))],
        ["build per checkpoint / epoch", *col(lambda n, r: sig3(get(r, "build_per_checkpoint_vs_epoch") or ratio(get(r, "build", "per_checkpoint_s"), epoch_s(r))) + (EXTRAPOLATED if epoch_x(r) else ""))],
        ["build peak RSS MB", *col(lambda n, r: count(get(r, "build", "peak_rss_mb")))],
        ["index bytes", *col(lambda n, r: count(get(r, "build", "bytes", "total")))],
        ["index bytes per triple and checkpoint", *col(lambda n, r: count(get(r, "build", "bytes_per_triple_checkpoint")))],
        ["sketch dim", *col(lambda n, r: count(get(r, "build", "sketch_dim")))],
        ["query p50 ms (warm) [target]", *warm(lambda n, r: f"{fixed(get(r, 'queries', 'p50_ms'), 1)} [{fixed(targets.get(n), 0)}]")],
        ["query p95 ms (warm)", *warm(lambda n, r: fixed(get(r, "queries", "p95_ms"), 1))],
        ["first query s (opens the index)", *warm(lambda n, r: sig3(get(r, "queries", "first_query_s")))],
        ["cold CLI query s, mean ± SE", *warm(lambda n, r: pm_sig3(mean_se(numbers(get(r, "queries", "cold_cli_s")))))],
        ["query process peak RSS MB", *warm(lambda n, r: count(get(r, "queries", "process", "peak_rss_mb")))],
        *([  # sizes measured by scale.py --batched (the command line's batches at its default settings)
            ["batched: test triples through the command line (default settings)", *batched(lambda n, r: count(get(r, "batched_queries", "test_triples")))],
            ["batched: ms per test triple (wall, whole command)", *batched(lambda n, r: fixed(get(r, "batched_queries", "ms_per_test_triple"), 1))],
            ["batched: query process peak RSS MB", *batched(lambda n, r: count(get(r, "batched_queries", "peak_rss_mb")))],
            ["batched: speedup vs exact", *batched(lambda n, r: sig3(ratio(get(r, "exact", "seconds_per_test_triple"),
                                                                       get(r, "batched_queries", "ms_per_test_triple"), 1e-3)))],
        ] if any(get(results[n], "batched_queries") for n in sizes) else []),
        ["exact TracIn s per test triple", *col(lambda n, r: sig3(get(r, "exact", "seconds_per_test_triple")))],
        ["query speedup vs exact (p50)", *warm(lambda n, r: sig3(get(r, "speedup_vs_exact")))],
        ["recall@10 proponents / opponents", *col(lambda n, r: f"{fixed(get(r, 'indexes', 'default', 'default', 'recall_at_10_proponents'), 3)} / "
                                                            f"{fixed(get(r, 'indexes', 'default', 'default', 'recall_at_10_opponents'), 3)}")],
        ["largest relative error", *col(lambda n, r: small(get(r, "indexes", "default", "default", "largest_relative_error")))],
        ["test triples checked", *col(lambda n, r: count(get(r, "indexes", "default", "default", "test_triples_checked")))],
    ]  # fmt: skip
    out = ["Planted ConvE graphs; each size was measured by its own run (commit and date per column).", ""]
    out += table(["", *sizes], rows)
    notes = []
    for n in sizes:
        r = results[n]
        if epoch_x(r):
            notes.append(f"{n}: the epoch was timed on {count(get(r, 'epoch', 'timed_rows'))} of {count(get(r, 'epoch', 'all_rows'))} "
                         f"triples and scaled up ({get(r, 'epoch', 'how') or NA}), so the epoch time and the build/epoch ratio are extrapolated.")
        if get(r, "batched_queries") and num(get(r, "training", "epochs")) == 1:
            notes.append(f"{n}: trained {count(get(r, 'training', 'epochs'))} epoch ({sig3(get(r, 'training', 'train_seconds'))} s) "
                         f"into {count(get(r, 'training', 'checkpoints'))} checkpoints spread over its optimizer steps; the "
                         "model is barely trained (its MRR against a random ranking's above), which changes what the "
                         "gradients are, not what the index must store or scan.")
    notes.append("Warm query latencies are percentiles without per-query values in the file; the cold CLI query has "
                 f"{len(numbers(get(results, sizes[0], 'queries', 'cold_cli_s'))) if sizes else 0} repeats. Recall is "
                 "over the checked test triples (1.000 = all matched).")
    if NOT_RUN in str(rows):
        notes.append(f"{NOT_RUN}: not part of the flow that size was measured with (warm single queries, or the command "
                     "line's batches with --batched).")
    out += [" ".join(notes)]
    return out


def section_serve_load(d: dict, results_dir: Path) -> list[str]:
    p, f = d.get("protocol"), d.get("figures")
    out = [f"{count(get(p, 'clients'))} concurrent clients for {sig3(get(p, 'seconds'))} s: {get(p, 'request') or NA}; "
           f"server: {get(p, 'server') or NA}.", ""]
    out += table(["figure", "value"], [
        ["requests", count(get(f, "requests"))],
        ["requests / s", sig3(get(f, "requests_per_s"))],
        ["latency p50 ms", fixed(get(f, "serve_p50_ms"), 1)],
        ["latency p99 ms", fixed(get(f, "serve_p99_ms"), 1)],
        ["errors", count(get(f, "serve_errors"))],
        ["server RSS MB before / after", f"{fixed(get(f, 'server_rss_mb_before'), 1)} / {fixed(get(f, 'server_rss_mb_after'), 1)}"],
        ["server RSS growth MB", fixed(get(f, "serve_rss_growth_mb"), 2)],
        ["server startup s", sig3(get(f, "server_startup_s"))],
        ["requests / s without batching (the run right after, --no-batching)", sig3(get(d, "no_batching", "requests_per_s"))],
        ["latency p50 / p99 ms without batching",
         f"{fixed(get(d, 'no_batching', 'serve_p50_ms'), 1)} / {fixed(get(d, 'no_batching', 'serve_p99_ms'), 1)}"],
        ["throughput with batching / without (`serve_batch_throughput_speedup`)", sig3(get(f, "serve_batch_throughput_speedup"))],
    ])  # fmt: skip
    out.append("One run; the file records percentiles, not per-request latencies, so no standard error is given. The "
               "latencies include the wait behind other clients' queries (the server answers one at a time).")
    return out


def section_scan_kernels(d: dict, results_dir: Path) -> list[str]:
    rows = [r for r in d.get("results") or [] if isinstance(r, dict)]
    out = [f"Random float16 rows of width {count(get(d, 'settings', 'width'))}, {count(get(d, 'settings', 'threads'))} "
           f"threads, median of {count(get(d, 'settings', 'repeats'))} timings; columns = test triples per product.", ""]
    body = []
    for r in sorted(rows, key=lambda r: (r.get("rows", 0), r.get("columns", 0), str(r.get("kernel")))):
        spread = mean_se(numbers(r.get("ms_per_column_all")))
        body.append([count(r.get("rows")), count(r.get("columns")), code(r.get("kernel")), fixed(r.get("ms_per_column"), 2),
                     pm(spread, lambda x: fixed(x, 2), show_n=False) if spread else NA,
                     sig3(r.get("speedup_vs_mv_fp16_one_column")), small(r.get("max_relative_deviation"))])  # fmt: skip
    out += table(["rows", "columns", "kernel", "ms per column (median)", "mean ± SE", "speedup vs one mv column",
                  "largest deviation / largest product"], body)  # fmt: skip
    out.append("Deviation: from float64 products of the same float16 rows, relative to the largest product. bfloat16 "
               "(an 8-bit mantissa) deviates about ten times more than the float16 kernels: a scan in bfloat16 needs "
               "a looser bound, so more candidates refined.")
    return out


def section_batch_query(d: dict, results_dir: Path) -> list[str]:
    st, f = d.get("settings"), d.get("figures")
    out = [f"Planted graph of {count(get(st, 'size'))} training triples (ConvE, {count(get(st, 'training', 'epochs'))} "
           f"epochs, {count(get(st, 'training', 'checkpoints'))} checkpoints), {count(get(f, 'test_triples'))} test "
           f"triples, {count(get(st, 'threads'))} threads, index not packed, scan batches of "
           f"{count(get(st, 'scan_batch'))}; median of {count(get(st, 'rounds'))} alternating rounds.", ""]
    spread = {m: numbers(get(f, "seconds_all", m)) for m in ("one_by_one", "batched")}
    n = num(get(f, "test_triples")) or 1
    out += table(["figure", "value"], [
        ["ms per test triple, one by one", fixed(get(f, "ms_per_test_triple_one_by_one"), 1)],
        ["ms per test triple, batched", fixed(get(f, "ms_per_test_triple_batched"), 1)],
        ["rounds, one by one (ms per test triple)", ", ".join(fixed(1000 * x / n, 1) for x in spread["one_by_one"]) or NA],
        ["rounds, batched (ms per test triple)", ", ".join(fixed(1000 * x / n, 1) for x in spread["batched"]) or NA],
        ["speedup (one by one / batched)", sig3(get(f, "batch_speedup"))],
        ["test triples with identical lists", f"{count(get(f, 'lists_identical'))} of {count(get(f, 'test_triples'))}"],
        ["largest relative difference of a printed influence", small(get(f, "largest_relative_influence_difference"))],
        ["peak RSS MB", fixed(get(f, "peak_rss_mb"), 0)],
    ])  # fmt: skip
    line = get(f, "command_line")
    if isinstance(line, dict):
        out += ["", "The command line (`tracin-index query --test FILE --output x.jsonl`) on the same test triples in its "
                "own process, at its default memory budget and held in memory (`--max-memory 1T`), alternating; wall "
                "time median of the rounds, peak RSS (`wait4`) the largest:", ""]
        out += table(["setting", "wall s", "rounds (s)", "peak RSS MB"], [
            [name, fixed(get(line, name, "wall_s"), 1),
             ", ".join(fixed(get(r, "wall_s"), 1) for r in (get(line, name, "runs") or [])) or NA,
             fixed(get(line, name, "peak_rss_mb"), 0)] for name in ("default", "held")])  # fmt: skip
        out += ["", f"Throughput at the default budget over held: {sig3(get(line, 'default_vs_held_throughput'))}; the "
                f"same lists: {get(line, 'outputs_identical')}; largest relative difference of a printed influence: "
                f"{small(get(line, 'largest_relative_influence_difference'))}."]
    return out


def section_unknown(d: dict, results_dir: Path) -> list[str]:
    return ["This results file has no renderer in `benchmarks/report.py` yet; see the JSON."]


SECTIONS: dict[str, tuple[str, str, Callable[[dict, Path], list[str]]]] = {
    "agreement": ("Agreement of the index with exact TracIn",
                  "How closely the gradient index's top-10 proponents and opponents match exact TracIn (the `TracInAnalyzer`) "
                  "on small trained models, and what a query costs.", section_agreement),
    "batch_query": ("Many test triples per query call",
                    "The same test triples answered one query call each and in one call (the batched scan), side by "
                    "side in one process.", section_batch_query),
    "batch_query_1m": ("Many test triples per query call, 1M training triples",
                       "As above on the 1M planted graph, and the command line at its default memory budget (the "
                       "index read from its files in passes) against the index held in memory.", section_batch_query),
    "build_cost": ("Build cost",
                   "What building the index costs on UMLS ConvE, against a training epoch, a per-triple `torch.autograd.grad` "
                   "loop and Captum's `TracInCPFastRandProj`, all timed in one run.", section_build_cost),
    "dask_cluster": ("Build on a Dask cluster, query over search shards",
                     "The 100k-triple build on a local Dask cluster against one process, and the cost of querying an index "
                     "split into search shards.", section_dask_cluster),
    "demo_cli": ("Demo and CLI",
                 "Wall time, memory and disk of `tracin-index demo`, and of a cold `tracin-index query` on the demo's index.",
                 section_demo_cli),
    "faithfulness": ("Faithfulness: remove and retrain",
                     "Whether removing a target's top-k proponents and retraining with the same seed lowers the target's rank "
                     "more than removing random neighbours, random triples or opponents, on five small settings.",
                     section_faithfulness),
    "faithfulness_defaults": ("Faithfulness under the tool's defaults",
                              "Remove and retrain on Nations ConvE trained as `tracin-index train` trains, with the index's "
                              "default proponents against variants of the score (forward only, Adam, normalized) and random removals.",
                              section_faithfulness_defaults),
    "faithfulness_baselines": ("Faithfulness against gradient-free baselines",
                               "Kelpie's grouped remove-and-retrain on ConvE trained as `tracin-index train` trains: the "
                               "default proponents, TracIn's variants and the explanations a user would pick by rule, "
                               "with paired statistics.", section_faithfulness_baselines),
    "faithfulness_layers": ("Faithfulness by number of last layers",
                            "Remove and retrain on Nations ConvE with the proponents of exact TracIn over the last N layers, "
                            "to choose N.", section_faithfulness_layers),
    "gradient_throughput": ("Gradient throughput",
                            "Per-triple gradients computed batched (`GradientComputer`) against a per-triple autograd loop, a "
                            "forward pass and a training epoch on UMLS ConvE.", section_gradient_throughput),
    "last_vs_all": ("Last layers against all parameters",
                    "Exact TracIn over the last 2 layers against all parameters on UMLS ConvE: agreement of the top lists, "
                    "rank correlation and speed.", section_last_vs_all),
    "layers_sweep": ("Sweep of the number of last layers",
                     "Exact TracIn over the last N layers (N = 1, 2, 3, 5) against all parameters on UMLS ConvE: agreement, "
                     "speed and index size.", section_layers_sweep),
    "scale": ("Scale: 100k, 1M and 5M training triples",
              "Build and query the index on planted ConvE graphs of 100k, 1M and 5M training triples: build time against an "
              "epoch, memory, size, query latency and recall against exact TracIn.", section_scale),
    "scan_kernels": ("The scan's products, one test triple against many",
                     "The matrix products of the scan for one test triple at a time and for batches of them: what a "
                     "batched scan can buy.", section_scan_kernels),
    "serve_load": ("Serve under load",
                   "`tracin-index serve` under concurrent clients: latency, throughput, errors and memory growth.",
                   section_serve_load),
}

HEADER = """# Benchmarks

Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`; do not edit by hand.

Rule: a speed claim comes with its benchmark; compare ratios measured side by side in one run.

How to read it: "± x" is a standard error (sd / sqrt(n)) over the n items named; two methods differ
measurably only when the mean of their paired per-target differences is at least {k:g} standard errors;
"(extrapolated)" marks a figure scaled up from a smaller timed run, not measured. The files come from
different runs, commits and machines (each section's first lines say which), so figures from different
sections are not comparable ratios.
"""


def render(results_dir: Path) -> str:
    """The Markdown of ``docs/benchmarks.md`` for the results files in ``results_dir``."""
    results_dir = Path(results_dir)
    lines = [HEADER.format(k=MEASURABLE), ""]
    for path in sorted(results_dir.glob("*.json")):
        name = path.stem
        if name in SKIP:
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a results file holds a JSON object, not {type(data).__name__}")
        title, what, body = SECTIONS.get(name, (name, "A results file without a description.", section_unknown))
        lines += [f"## {title} (`{path.name}`)", "", what, "", provenance(data), ""]
        lines += body(data, results_dir)
        lines.append("")
    text = "\n".join(line.rstrip() for line in lines)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from the rendering; write nothing")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=DOC, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    text = render(args.results_dir)
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else None
        if current != text:
            print(f"{args.out} is out of date with {args.results_dir}: run `python benchmarks/report.py`")
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
