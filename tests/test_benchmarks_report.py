"""docs/benchmarks.md is what benchmarks/report.py renders from benchmarks/results/*.json, and the report's
uncertainty logic (paired differences against their standard error) says what the numbers allow."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DOC = REPO / "docs" / "benchmarks.md"

sys.path.insert(0, str(REPO / "benchmarks"))
import report  # noqa: E402


def test_committed_doc_is_the_rendering():
    text = report.render(RESULTS)
    assert DOC.is_file(), "docs/benchmarks.md is missing: run `python benchmarks/report.py`"
    assert DOC.read_text(encoding="utf-8") == text, "docs/benchmarks.md is out of date: run `python benchmarks/report.py`"


def test_real_results_render_real_numbers():
    text = report.render(RESULTS)
    # every figure the report reads is present in the real files (a renamed key would show as n/a)
    assert report.NA not in text
    for name in sorted(p.stem for p in RESULTS.glob("*.json") if p.stem not in report.SKIP):
        assert f"(`{name}.json`)" in text
    assert "summary.json`)" not in text and "build_cost_threads1" not in text
    # the known case: Adam's delta MRR (-0.56) against the default's (-0.50) is within the noise
    assert "no measurable difference between `proponents` and `adam`" in text


def _per_target(deltas: dict[str, list[float]]) -> list[dict]:
    """Per-target records as faithfulness_defaults.json writes them, from each method's reciprocal rank drop."""
    n = len(next(iter(deltas.values())))
    before = {"rank": 1.0, "rr": 1.0, "hits1": 1.0, "score": 0.0, "log_p": -1.0, "argmax": "x"}
    records = []
    for i in range(n):
        after = {}
        for method, values in deltas.items():
            rr = 1.0 + values[i]
            after[f"{method}@10"] = {"rank": 1.0 / rr, "rr": rr, "hits1": float(rr == 1.0), "score": -1.0, "log_p": -2.0, "argmax": "y"}
        records.append({"target": [f"h{i}", "r", f"t{i}"], "before": dict(before), "removed": {m: [] for m in deltas}, "after": after})
    return records


def _faithfulness_defaults(deltas: dict[str, list[float]]) -> dict:
    n = len(next(iter(deltas.values())))
    tables = {}
    for method, values in deltas.items():
        mean = sum(values) / n
        tables[f"{method}@10"] = {"method": method, "k": 10, "n": n, "delta_mrr": mean, "delta_mrr_sem": None, "delta_hits1": -0.5,
                                  "mean_rank_after": 2.0, "share_score_drop": 1.0, "share_log_p_drop": 1.0, "share_top1_lost": 0.5,
                                  "share_argmax_changed": 0.5, "mean_delta_score": -1.0, "mean_delta_log_p": -1.0}  # fmt: skip
    return {
        "benchmark": "faithfulness_defaults",
        "protocol": {"dataset": "nations", "model": "ConvE", "training": "synthetic", "epochs": 1, "ks": [10], "targets": n,
                     "methods": list(deltas), "index": "synthetic"},  # fmt: skip
        "full_model_test_mrr_filtered_tail": 0.8,
        "num_targets": n,
        "retrains": n * len(deltas),
        "retrain_nothing_removed_max_abs_score_diff": 0.0,
        "overlap": {f"{m}_vs_proponents_top10": 0.5 for m in deltas if m != "proponents"},
        "tables": tables,
        "wilcoxon": {},
        "per_target": _per_target(deltas),
        "machine": {"cpu_model": "Test CPU", "cores": 2, "ram_total_gib": 8.0},
        "versions": {"git_commit": "0123456789abcdef", "git_uncommitted_tracked_files": ["README.md"]},
        "command": "python benchmarks/faithfulness_defaults.py",
        "date": "2026-01-02T03:04:05+00:00",
    }


def _write(directory: Path, name: str, data: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_within_the_noise_is_no_measurable_difference(tmp_path):
    # adam removes 0.05 more on average, but the per-target differences swing by +-0.4: SE ~0.09
    proponents = [-0.5] * 20
    adam = [-0.5 + (0.35 if i % 2 else -0.45) for i in range(20)]
    _write(tmp_path, "faithfulness_defaults", _faithfulness_defaults({"proponents": proponents, "adam": adam}))
    text = report.render(tmp_path)
    assert "no measurable difference between `proponents` and `adam`" in text
    assert "removes more than" not in text
    # the provenance line
    assert "`0123456789`" in text and "plus uncommitted changes to 1 file(s)" in text and "2026-01-02" in text
    assert "T03:04" not in text and "2 cores, Test CPU, 8.0 GiB RAM" in text


def test_beyond_the_noise_names_the_one_that_removes_more(tmp_path):
    # adam removes 0.3 more on every target, give or take 0.02 (SE 0.0205 / sqrt(20) = 0.0046)
    proponents = [-0.4] * 20
    adam = [-0.7 + (0.02 if i % 2 else -0.02) for i in range(20)]
    _write(tmp_path, "faithfulness_defaults", _faithfulness_defaults({"proponents": proponents, "adam": adam}))
    text = report.render(tmp_path)
    assert "`adam` removes more than `proponents`: its ΔMRR is lower by 0.300 ± 0.005 (paired, n = 20)" in text
    assert "**Conclusion:** The default `proponents` remove measurably less than `adam`." in text
    assert "no measurable difference" not in text


def test_layers_within_the_noise(tmp_path):
    noise = [0.3 if i % 2 else -0.3 for i in range(20)]
    deltas = {"layers_1": [-0.5 + e for e in noise], "layers_3": [-0.5 - e for e in noise], "layers_all": [-0.45] * 20}
    data = _faithfulness_defaults(deltas)
    data["benchmark"] = "faithfulness_layers"
    _write(tmp_path, "faithfulness_layers", data)
    text = report.render(tmp_path)
    assert "no N is measurably better" in text
    deltas["layers_all"] = [-0.1] * 20
    data = _faithfulness_defaults(deltas)
    _write(tmp_path, "faithfulness_layers", data)
    text = report.render(tmp_path)
    assert "no N is measurably better" not in text
    assert "N = 1 removes more than N = all" in text


def test_missing_fields_show_na_and_extrapolation_is_labelled(tmp_path):
    data = _faithfulness_defaults({"proponents": [-0.5, -0.4, -0.6], "adam": [-0.5, -0.5, -0.5]})
    for key in ("machine", "versions", "date", "tables", "overlap"):
        del data[key]
    _write(tmp_path, "faithfulness_defaults", data)
    _write(tmp_path, "build_cost", {"settings": {"training_triples": 5216, "checkpoints": 3},
                                    "times": {"loop": {"triples": 1000, "full_s": 26.9}}, "ratios": {"build_vs_loop_speedup": 36.0}})  # fmt: skip
    _write(tmp_path, "summary", {"layers_sweep_best_n": 2})
    text = report.render(tmp_path)
    assert "**commit** not recorded; **date** not recorded; **machine** cores not recorded" in text
    # without the recorded tables, the per-target records still give the mean and its standard error
    assert "| `proponents` | -0.500 ± 0.058 (n = 3) | n/a |" in text
    assert "no measurable difference between `proponents` and `adam`" in text
    assert "per-triple loop / index build per checkpoint (speedup) (extrapolated) | 36.0 |" in text
    assert "summary.json`)" not in text


def test_check_mode(tmp_path, capsys):
    results = tmp_path / "results"
    _write(results, "faithfulness_defaults", _faithfulness_defaults({"proponents": [-0.5, -0.4], "adam": [-0.6, -0.5]}))
    out = tmp_path / "benchmarks.md"
    assert report.main(["--results-dir", str(results), "--out", str(out), "--check"]) == 1
    assert len(capsys.readouterr().out.strip().splitlines()) == 1
    assert report.main(["--results-dir", str(results), "--out", str(out)]) == 0
    assert report.main(["--results-dir", str(results), "--out", str(out), "--check"]) == 0


@pytest.mark.parametrize("x, expected", [(36.0466, "36.0"), (0.17757, "0.178"), (2591.6, "2,590"), (9.996, "10.0"), (1.0, "1.00")])
def test_three_significant_digits(x, expected):
    assert report.sig3(x) == expected
