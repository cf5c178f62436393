"""TracInAnalyzer scores equal a brute-force loop over checkpoints with their learning rates."""

import numpy as np
import pytest
import torch
from conftest import LEARNING_RATES
from reference import flat, per_triple_gradients

from tracin_index.exact import TracInAnalyzer
from tracin_index.results import top_influences


def brute_force(model, states, test, training, names, loss):
    """sum_c lr_c <g_train, g_test> with one backward per triple, per checkpoint."""
    total = torch.zeros(len(test), len(training), dtype=torch.float64)
    for state, lr in states:
        model.load_state_dict(state)
        g_test = flat(per_triple_gradients(model, test, names, loss))
        g_train = flat(per_triple_gradients(model, training, names, loss))
        total += lr * (g_test @ g_train.T)
    return total


@pytest.mark.parametrize("use_last_layers_only,loss", [(True, "bce"), (True, "ce"), (False, "bce")])
def test_scores_equal_brute_force_over_two_checkpoints(nations, two_checkpoints, use_last_layers_only, loss):
    model, states, checkpoints = two_checkpoints
    training = nations.training.mapped_triples[:40]
    test = nations.testing.mapped_triples[:3]
    analyzer = TracInAnalyzer(
        model, use_last_layers_only=use_last_layers_only, checkpoints=checkpoints, loss=loss, batch_size=16
    )
    scores = analyzer.influence_scores(test, training)
    expected = brute_force(model, states, test, training, analyzer.selection.parameter_names, loss)
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-12)


def test_checkpoints_are_found_in_epoch_order_with_their_learning_rates(two_checkpoints):
    _, _, checkpoints = two_checkpoints
    assert [c.epoch for c in checkpoints] == [1, 2]
    assert [c.learning_rate for c in checkpoints] == list(LEARNING_RATES)


def test_self_influence_equals_brute_force(nations, two_checkpoints):
    model, states, checkpoints = two_checkpoints
    training = nations.training.mapped_triples[:25]
    analyzer = TracInAnalyzer(model, checkpoints=checkpoints, batch_size=8)
    names = analyzer.selection.parameter_names
    expected = torch.zeros(len(training), dtype=torch.float64)
    for state, lr in states:
        model.load_state_dict(state)
        expected += lr * flat(per_triple_gradients(model, training, names, "bce")).pow(2).sum(1)
    torch.testing.assert_close(analyzer.self_influence(training), expected, rtol=1e-9, atol=1e-12)


def test_without_checkpoints_the_model_itself_is_the_only_checkpoint_with_rate_one(nations, small_conve):
    training = nations.training.mapped_triples[:20]
    test = nations.testing.mapped_triples[:2]
    analyzer = TracInAnalyzer(small_conve)
    names = analyzer.selection.parameter_names
    expected = flat(per_triple_gradients(small_conve, test, names, "bce")) @ flat(
        per_triple_gradients(small_conve, training, names, "bce")
    ).T
    torch.testing.assert_close(analyzer.influence_scores(test, training), expected, rtol=1e-9, atol=1e-12)


def test_model_weights_are_restored_after_scoring(nations, two_checkpoints):
    model, _, checkpoints = two_checkpoints
    before = {k: v.clone() for k, v in model.state_dict().items()}
    TracInAnalyzer(model, checkpoints=checkpoints).influence_scores(
        nations.testing.mapped_triples[:1], nations.training.mapped_triples[:10]
    )
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_proponents_descend_and_opponents_ascend_by_influence(nations, two_checkpoints):
    model, _, checkpoints = two_checkpoints
    training = nations.training.mapped_triples[:60]
    analyzer = TracInAnalyzer(model, checkpoints=checkpoints)
    result = analyzer.compute_influences_for_test_triple(nations.testing.mapped_triples[0], training, top_k=5)
    scores = analyzer.influence_scores(nations.testing.mapped_triples[:1], training)[0]
    assert [p.influence for p in result.proponents] == pytest.approx(sorted(scores.tolist(), reverse=True)[:5])
    assert [o.influence for o in result.opponents] == pytest.approx(sorted(scores.tolist())[:5])
    for p in result.proponents:
        assert p.influence == pytest.approx(float(scores[p.train_index]))
        assert (p.head, p.relation, p.tail) == tuple(str(x) for x in training[p.train_index].tolist())


def test_compute_gradient_of_one_triple_matches_autograd(nations, small_conve):
    analyzer = TracInAnalyzer(small_conve)
    triple = nations.training.mapped_triples[3]
    grads = analyzer.compute_gradient(triple)
    expected = per_triple_gradients(small_conve, triple.view(1, 3), analyzer.selection.parameter_names, "bce")
    for name, g in grads.items():
        torch.testing.assert_close(g, expected[name][0])


def test_top_influences_lists_only_scores_of_their_sign():
    scores = torch.tensor([0.3, -1.0, 2.0, 0.0])
    labels = [("a", "r", "b"), ("b", "r", "c"), ("c", "r", "a"), ("a", "r", "a")]
    proponents, opponents = top_influences(scores, 10, labels)
    assert [p.train_index for p in proponents] == [2, 0]
    assert [o.train_index for o in opponents] == [1]
    proponents, opponents = top_influences(torch.tensor([0.5, 0.25]), 3, labels)
    assert [p.train_index for p in proponents] == [0, 1] and opponents == ()


def test_equal_influences_are_listed_by_training_row_at_any_k():
    scores = np.array([1.0, 3.0, 1.0, -2.0, 3.0, 1.0, -2.0, 1.0])
    labels = [("a", "r", "b")] * len(scores)
    for k in range(1, 8):
        proponents, opponents = top_influences(scores, k, labels)
        assert [p.train_index for p in proponents] == [1, 4, 0, 2, 5, 7][:k]
        assert [o.train_index for o in opponents] == [3, 6][:k]
    # a subset of rows, given out of order, is ranked by the rows, not by the positions
    proponents, _ = top_influences(np.array([1.0, 1.0, 1.0]), 2, labels, train_indices=np.array([7, 2, 5]))
    assert [p.train_index for p in proponents] == [2, 5]


def test_exact_results_count_the_triples_of_each_sign(nations, small_conve):
    analyzer = TracInAnalyzer(small_conve)
    training = nations.training.mapped_triples[:300]
    (result,) = analyzer.compute_influences(nations.testing.mapped_triples[:1], training, top_k=5)
    scores = analyzer.influence_scores(nations.testing.mapped_triples[:1], training)[0]
    assert result.num_proponents == int((scores > 0).sum()) and result.num_opponents == int((scores < 0).sum())
    assert all(p.influence > 0 for p in result.proponents) and all(o.influence < 0 for o in result.opponents)
