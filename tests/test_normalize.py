"""--normalize: the cosine form of TracIn, sum_c lr_c <g, g'> / (|g| |g'|), against a per-triple autograd loop."""

import json

import numpy as np
import pytest
import torch
from conftest import run_cli
from reference import flat, per_triple_gradients
from test_index import expected_rows, run_ids

from tracin_index.exact import TracInAnalyzer
from tracin_index.index import GradientIndex

NUM_TEST = 3


def normalized_reference(tiny_run, train_gradients) -> torch.Tensor:
    run, _, test = run_ids(tiny_run)
    model = run.model.double()
    names = [n for n in dict(model.named_parameters()) if n.startswith("interaction.hr1d")]
    scores = torch.zeros(NUM_TEST, train_gradients[0][1].shape[0], dtype=torch.float64)
    for checkpoint, (lr, g_train) in zip(run.checkpoints, train_gradients):
        checkpoint.load_into(model)
        model.double().eval()
        g_test = flat(per_triple_gradients(model, test[:NUM_TEST], names, "bce", "tail"))
        scores += lr * (g_test @ g_train.T) / (g_test.norm(dim=1)[:, None] * g_train.norm(dim=1)[None, :])
    return scores


def test_normalized_scores_are_cosines_in_exact_and_in_the_index(tiny_run, tmp_path, tiny_train_gradients, capsys):
    reference = normalized_reference(tiny_run, tiny_train_gradients("bce"))
    run, train, test = run_ids(tiny_run)
    analyzer = TracInAnalyzer(run.model.double(), checkpoints=run.checkpoints, normalize=True)
    torch.testing.assert_close(analyzer.influence_scores(test[:NUM_TEST], train), reference, rtol=1e-6, atol=1e-9)
    # a cosine per checkpoint: never more than the sum of the learning rates
    assert float(reference.abs().max()) <= sum(c.learning_rate for c in run.checkpoints) + 1e-9

    index = GradientIndex.build(tmp_path / "index", model_path=tiny_run, sketch_dim=16)
    grads = index.test_gradients(test[:NUM_TEST])
    for t, (value, error) in enumerate(index.engine.batch_estimates(grads, list(range(NUM_TEST)), normalize=True)):
        assert bool(((value - reference[t]).abs() <= error).all())  # the batched scan
    for t in range(NUM_TEST):
        value, error = index.estimates(grads, t, normalize=True)
        assert bool(((value - reference[t]).abs() <= error).all())
        value, error = index.estimates(grads, t, normalize=True, rows=np.arange(index.num_triples))  # refined
        assert bool(((value - reference[t]).abs() <= error).all())
    results = index.query(test[:NUM_TEST], top_k=10, normalize=True)
    plain = index.query(test[:NUM_TEST], top_k=10)
    for t, result in enumerate(results):
        for items, sign in ((result.proponents, +1), (result.opponents, -1)):
            rows = expected_rows(reference[t], 10, sign)
            assert [i.train_index for i in items] == rows
            assert [i.influence for i in items] == pytest.approx([float(reference[t, r]) for r in rows], rel=1e-4)
    # ranking by direction is not ranking by size here
    assert any([i.train_index for i in a.proponents] != [i.train_index for i in b.proponents] for a, b in zip(results, plain))

    out = tmp_path / "q.json"
    code, _, err = run_cli(capsys, "query", tmp_path / "index", "--test", tiny_run / "test.tsv", "--test-indices", "0",
                           "--normalize", "--output", out)  # fmt: skip
    assert code == 0, err
    written = json.loads(out.read_text())
    assert written["config"]["normalize"] is True
    first = written["results"][0]["proponents"][0]
    assert first["train_index"] == results[0].proponents[0].train_index
    assert first["influence"] == pytest.approx(results[0].proponents[0].influence, rel=1e-6)

    exact_out = tmp_path / "e.json"
    code, _, err = run_cli(capsys, "exact", "--model-path", tiny_run, "--use-last-layers-only", "--test-indices", "0",
                           "--normalize", "--output", exact_out)  # fmt: skip
    assert code == 0, err
    exact = json.loads(exact_out.read_text())
    assert exact["config"]["normalize"] is True
    assert [p["train_index"] for p in exact["results"][0]["proponents"]] == [p["train_index"] for p in written["results"][0]["proponents"]]
