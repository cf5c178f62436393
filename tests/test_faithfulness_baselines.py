"""benchmarks/faithfulness_baselines.py: the gradient-free baselines, the grouping rule and the statistics,
each against facts and numbers worked out by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import faithfulness_baselines as fb  # noqa: E402

# A hand-made graph: entities 0..5, relations 0..2; the target is (0, 0, 4), not a training fact.
TRAIN = np.array([
    [0, 0, 1],  # 0: head 0, relation 0
    [0, 0, 2],  # 1: head 0, relation 0
    [0, 1, 3],  # 2: 0 - 3, and 3 links to 4 twice (rows 3 and 8): on two paths
    [3, 2, 4],  # 3: 3 - 4
    [4, 0, 5],  # 4: 4 - 5, but 5 does not touch 0: on no path
    [1, 0, 4],  # 5: relation 0 into 4; 1 - 4 closes the path 0 - 1 - 4
    [5, 1, 4],  # 6: relation 1 into 4
    [2, 0, 4],  # 7: relation 0 into 4; closes 0 - 2 - 4
    [4, 2, 3],  # 8: 4 - 3 (reversed direction)
    [5, 0, 5],  # 9: touches neither 0 nor 4
])  # fmt: skip
TARGET = (0, 0, 4)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_head_relation_is_the_heads_other_tails_under_the_relation(seed):
    assert sorted(fb.same_head_relation(TRAIN, TARGET, 10, rng(seed))) == [0, 1]
    one = fb.same_head_relation(TRAIN, TARGET, 1, rng(seed))
    assert len(one) == 1 and one[0] in (0, 1)


def test_same_tail_relation_is_the_other_heads_into_the_tail_under_the_relation():
    assert sorted(fb.same_tail_relation(TRAIN, TARGET, 10, rng())) == [5, 7]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_path_2hop_ranks_facts_by_the_number_of_head_to_tail_paths(seed):
    # paths 0-1-4 (rows 0, 5), 0-2-4 (rows 1, 7), 0-3-4 (row 2 with row 3, row 2 with row 8)
    got = fb.path_2hop(TRAIN, TARGET, 10, rng(seed))
    assert got[0] == 2
    assert sorted(got) == [0, 1, 2, 3, 5, 7, 8]
    assert fb.path_2hop(TRAIN, TARGET, 1, rng(seed)) == [2]


def test_path_2hop_is_empty_without_a_path():
    assert fb.path_2hop(TRAIN, (5, 0, 0), 3, rng()) == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_embedding_nearest_sums_the_cosines_of_heads_and_tails(seed):
    # cos to e_0 / e_4: e_0 = (1, 0), e_4 = (0, 1), e_1 = (1, 0), e_2 = (-1, 0), e_3 = (0, -1), e_5 = (1, 1)
    # row scores: 5 -> 2, 6 -> 1.707, 9 -> 1.414, rows 0, 1, 3 -> 1 (a tie), 4 -> 0.707, 2, 7 -> 0, 8 -> -1
    e = np.array([[1, 0], [1, 0], [-1, 0], [0, -1], [0, 1], [1, 1]], dtype=float)
    assert fb.embedding_nearest(TRAIN, TARGET, 3, rng(seed), e) == [5, 6, 9]
    four = fb.embedding_nearest(TRAIN, TARGET, 4, rng(seed), e)
    assert four[:3] == [5, 6, 9] and four[3] in (0, 1, 3)
    assert fb.embedding_nearest(TRAIN, TARGET, 10, rng(seed), e)[-1] == 8


def test_random_neighbours_draw_only_facts_touching_the_head_or_tail():
    assert sorted(fb.random_neighbours(TRAIN, TARGET, 20, rng())) == list(range(9))
    three = fb.random_neighbours(TRAIN, TARGET, 3, rng())
    assert len(set(three)) == 3 and 9 not in three


def test_random_facts_are_distinct_rows_of_the_training_set():
    got = fb.random_facts(TRAIN, TARGET, 4, rng())
    assert len(set(got)) == 4 and all(0 <= x < len(TRAIN) for x in got)
    assert sorted(fb.random_facts(TRAIN, TARGET, 50, rng())) == list(range(10))


def test_baseline_removals_are_reproducible_from_the_seed_and_the_target_key():
    targets = np.array([TARGET, TARGET])
    a = fb.baseline_removals("random_neighbours", TRAIN, targets, [3, 4], 3, seed=0)
    assert a == fb.baseline_removals("random_neighbours", TRAIN, targets, [3, 4], 3, seed=0)
    assert fb.baseline_removals("random", TRAIN, targets, [3, 4], 3, seed=0) != \
        fb.baseline_removals("random", TRAIN, targets, [3, 4], 3, seed=1)  # fmt: skip


@pytest.mark.parametrize("seed", range(6))
def test_grouping_separates_targets_whose_removal_sets_coincide(seed):
    groups = fb.group_targets([{1, 2}, {1, 2}, {3}, {3}], 2, rng(seed))
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3]
    for g in groups:
        assert len(g) == 2 and len({0, 1} & set(g)) == 1 and len({2, 3} & set(g)) == 1


def test_grouping_sizes_differ_by_at_most_one():
    groups = fb.group_targets([{i} for i in range(5)], 2, rng())
    assert sorted(len(g) for g in groups) == [2, 3]
    assert fb.group_targets([{0}, {1}], 5, rng()) in ([[0], [1]], [[1], [0]])


def test_bootstrap_of_a_constant_sample_is_that_constant():
    assert fb.bootstrap_ci([0.3] * 10) == pytest.approx((0.3, 0.3, 0.3))


def test_bootstrap_of_two_values_spans_both():
    # resampled means of (0, 1) are 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4
    mean, low, high = fb.bootstrap_ci([0.0, 1.0], resamples=10_000, seed=0)
    assert (mean, low, high) == (0.5, 0.0, 1.0)


def test_holm_on_a_known_list():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert fb.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert fb.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def test_paired_test_of_five_positive_differences_is_exact_wilcoxon():
    # all five signed ranks positive: 1 of 2^5 sign patterns at each extreme -> p = 2 / 32
    assert fb.paired_test([1, 2, 3, 4, 5], [0, 0, 0, 0, 0]) == pytest.approx(2 / 32)
    assert fb.paired_test([1, 2], [1, 2]) == 1.0


def test_compare_picks_the_baseline_with_the_lowest_delta_mrr():
    n = 6
    deltas = {"proponents@1": {"rr": -np.arange(1, n + 1) / 10, "hits1": -np.ones(n)},
              "random@1": {"rr": np.zeros(n), "hits1": np.zeros(n)},
              "same_head_relation@1": {"rr": -np.full(n, 0.05), "hits1": np.zeros(n)}}  # fmt: skip
    out = fb.compare(deltas, [1], ["proponents", "random", "same_head_relation"], seed=0)
    assert out["best_baseline"] == {"1": "same_head_relation"}
    pairs = {(r["method"], r["against"]) for r in out["comparisons"]}
    assert pairs == {("proponents", "same_head_relation"), ("random", "same_head_relation")}
    assert out["tables"]["random@1"]["delta_mrr_ci95"] == [0.0, 0.0]


def test_target_deltas_average_after_minus_before_over_seeds():
    # two groups {0} and {1}; proponents@1 removed row 5 from group 0 and row 6 from group 1
    jobs = {(5,): [("proponents", 1, 0)], (6,): [("proponents", 1, 1)], (): []}
    m = lambda rr, hits1: {"rr": rr, "hits1": hits1}  # noqa: E731
    after = {(0, ()): {0: m(1.0, 1.0), 1: m(1.0, 1.0)}, (1, ()): {0: m(1.0, 1.0), 1: m(0.5, 0.0)},
             (0, (5,)): {0: m(0.5, 0.0)}, (1, (5,)): {0: m(0.25, 0.0)},
             (0, (6,)): {1: m(1.0, 1.0)}, (1, (6,)): {1: m(0.5, 0.0)}}  # fmt: skip
    out = fb.target_deltas(jobs, [[0], [1]], after, [0, 1], [("proponents", 1)], 2)
    # target 0: ((0.5 - 1) + (0.25 - 1)) / 2 = -0.625, Hits@1 (-1 - 1) / 2; target 1: (0 + 0) / 2
    assert out["proponents@1"]["rr"].tolist() == [-0.625, 0.0]
    assert out["proponents@1"]["hits1"].tolist() == [-1.0, 0.0]


def test_compare_tests_proponents_against_the_noise_reference():
    x = {"rr": -np.ones(5), "hits1": -np.ones(5)}
    zero = {"rr": np.zeros(5), "hits1": np.zeros(5)}
    out = fb.compare({"proponents@3": x, "noise@3": zero, "random@3": zero}, [3], ["proponents", "random"], seed=0)
    noise = [r for r in out["comparisons"] if r["against"] == "noise"]
    assert len(noise) == 1 and noise[0]["p_mrr"] == pytest.approx(2 / 32)
    # two comparisons, both p = 1/16: Holm multiplies the smaller by 2 and keeps the running max
    assert [r["p_mrr_holm"] for r in out["comparisons"]] == pytest.approx([0.125, 0.125])


def test_summary_names_the_graphs_where_proponents_beat_the_best_baseline_significantly():
    def stats(difference, p):
        table = {"delta_mrr": -0.5, "delta_mrr_ci95": [-0.7, -0.3]}
        return {"tables": {"proponents@10": table, "path_2hop@10": {**table, "delta_mrr": -0.5 - difference}},
                "best_baseline": {"10": "path_2hop"},
                "comparisons": [{"method": "proponents", "against": "path_2hop", "k": 10, "mean_difference_mrr": difference,
                                 "p_mrr_holm": p}]}  # fmt: skip

    graphs = {"nations": stats(-0.2, 0.01), "umls": stats(-0.2, 0.2), "kinships": stats(0.1, 0.01)}
    keys = fb.summary_keys(graphs, stats(-0.1, 0.04), 10)
    assert keys["faith3_proponents_beat_best_baseline"] == ["nations"]  # umls: not significant; kinships: the other way
    assert keys["faith3_proponents_beat_best_baseline_pooled"] is True
    assert keys["faith3_best_baseline_umls"] == "path_2hop" and keys["faith3_delta_mrr_best_baseline_umls"] == -0.3
