"""Models trained with inverse triples: a training triple is two examples, (h, r, t) and (t, r_inv, h),
in the model's relation ids; each test direction explained. Checked against PyKEEN's own API
(relation inverter, ``score_*_inverse``) in a per-triple autograd loop (tests/reference.py)."""

import numpy as np
import pytest
import torch
from conftest import run_cli
from reference import flat, per_triple_gradients
from test_index import brute_force, expected_rows, run_ids

from tracin_index.errors import InputError
from tracin_index.exact import TracInAnalyzer
from tracin_index.gradients.computer import GradientComputer
from tracin_index.gradients.selection import select_parameters
from tracin_index.index import GradientIndex
from tracin_index.kg.directions import training_examples

DIRECTIONS = ("train", "tail", "head", "both")


def test_the_examples_are_the_ones_pykeen_trains_on(nations):
    from pykeen.triples import TriplesFactory

    factory = TriplesFactory(nations.training.mapped_triples, nations.training.entity_to_id,
                             nations.training.relation_to_id, create_inverse_triples=True)  # fmt: skip
    theirs = factory._add_inverse_triples_if_necessary(factory.mapped_triples)
    ours = training_examples(factory.mapped_triples, inverse=True)
    assert sorted(map(tuple, ours.tolist())) == sorted(map(tuple, theirs.tolist()))
    assert torch.equal(ours[0::2], theirs[: len(factory.mapped_triples)])  # example 0 of each triple: forward


@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_fact_gradients_sum_the_examples_as_trained(tiny_run, loss):
    run, train, _ = run_ids(tiny_run)
    model = run.model.double().eval()
    assert model.use_inverse_triples
    selection = select_parameters(model, mode="last", num_last_layers=2)
    computer = GradientComputer(model, selection, loss)
    batch = train[:12]
    for direction in DIRECTIONS:
        ours = computer.compute(batch, direction)
        reference = flat(per_triple_gradients(model, batch, selection.parameter_names, loss, direction))
        torch.testing.assert_close(ours.dot(ours), reference @ reference.T, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ours.squared_norms(), reference.pow(2).sum(1), rtol=1e-9, atol=1e-12)
    # the two directions are different predictions: neither gradient is the other
    tail, head = (flat(per_triple_gradients(model, batch[:3], selection.parameter_names, loss, d)) for d in ("tail", "head"))
    assert not torch.allclose(tail, head)


@pytest.mark.parametrize("direction", ["head", "both"])
def test_index_and_exact_explain_each_direction(tiny_run, tmp_path, tiny_train_gradients, direction):
    _, train, test = run_ids(tiny_run)
    test = test[:2]
    train_gradients = tiny_train_gradients("bce")
    reference = brute_force(tiny_run, "bce", direction=direction, num_test=2, train_gradients=train_gradients)
    index = GradientIndex.build(tmp_path / "index", model_path=tiny_run, sketch_dim=16)
    assert index.inverse_triples and index.manifest["num_rows"] == 2 * len(train)
    grads = index.test_gradients(test, direction)
    everything = np.arange(index.num_triples)
    for t, (value, error) in enumerate(index.engine.batch_estimates(grads, list(range(len(test))))):
        assert bool(((value - reference[t]).abs() <= error).all())  # the batched scan, both examples of each triple
    for t in range(len(test)):
        value, error = index.estimates(grads, t)
        assert bool(((value - reference[t]).abs() <= error).all())
        value, error = index.estimates(grads, t, rows=everything)  # refined: both examples' inputs recomputed
        assert bool(((value - reference[t]).abs() <= error).all())
    results = index.query(test, top_k=5, direction=direction)
    run, _, _ = run_ids(tiny_run)
    exact = TracInAnalyzer(run.model.double(), checkpoints=run.checkpoints, direction=direction).compute_influences(test, train, top_k=5)
    for t in range(len(test)):
        for sign, ours, theirs in ((+1, results[t].proponents, exact[t].proponents), (-1, results[t].opponents, exact[t].opponents)):
            rows = expected_rows(reference[t], 5, sign)
            assert [i.train_index for i in ours] == rows == [i.train_index for i in theirs]
            assert [i.influence for i in ours] == pytest.approx([float(reference[t, r]) for r in rows], rel=1e-4)
    # self-influence: the squared norm of the sum of a triple's two examples' gradients
    expected = sum(lr * g.pow(2).sum(1) for lr, g in train_gradients).numpy()
    np.testing.assert_allclose(index.self_influences(), expected, rtol=1e-4)


def test_a_direction_the_model_cannot_explain_is_refused(nations, tmp_path, capsys):
    from conftest import make_model

    from tracin_index.kg.runs import ModelConfig, save_run_directory
    from tracin_index.kg.triples import IdMaps

    model = make_model("DistMult", nations.training)
    with pytest.raises(InputError, match="inverse triples"):
        TracInAnalyzer(model, direction="head")
    run = tmp_path / "run"
    config = ModelConfig(model="DistMult", model_kwargs={"embedding_dim": 16}, num_entities=14, num_relations=55)
    save_run_directory(run, model=model.float(), config=config, id_maps=IdMaps.from_triples_factory(nations.training),
                       training=nations.training.mapped_triples, testing=nations.testing.mapped_triples)  # fmt: skip
    code, _, err = run_cli(capsys, "exact", "--model-path", run, "--direction", "head")
    assert code != 0 and "needs a model trained with inverse triples" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "exact", "--model-path", run, "--direction", "sideways")
    assert code != 0 and "sideways" in err


@pytest.mark.parametrize("name", ["TransE", "DistMult"])
def test_embedding_models_trained_with_inverse_triples(nations, tmp_path, name):
    """Through PyKEEN (TransE: no replica) and through the replica (DistMult): a training triple's rows
    are its two examples, and the index's exact lists equal the per-triple autograd loop's."""
    from pykeen.models import model_resolver
    from pykeen.triples import TriplesFactory
    from test_index import brute_force

    from tracin_index.kg.runs import ModelConfig, save_run_directory
    from tracin_index.kg.triples import IdMaps

    training = TriplesFactory(nations.training.mapped_triples, nations.training.entity_to_id,
                              nations.training.relation_to_id, create_inverse_triples=True)  # fmt: skip
    model = model_resolver.make(name, dict(embedding_dim=8), triples_factory=training, random_seed=3)
    assert model.use_inverse_triples
    run = tmp_path / "run"
    config = ModelConfig(name, {"embedding_dim": 8}, training.num_entities, training.real_num_relations,
                         create_inverse_triples=True)  # fmt: skip
    save_run_directory(run, model=model, config=config, id_maps=IdMaps.from_triples_factory(training),
                       training=training.label_triples(training.mapped_triples),
                       testing=nations.testing.label_triples(nations.testing.mapped_triples))  # fmt: skip
    (run / "checkpoints").mkdir()
    torch.save({"model_state_dict": model.state_dict(), "learning_rate": 0.1, "epoch": 1}, run / "checkpoints" / "e1.pt")
    names = [n for n, _ in model.named_parameters()]
    reference = brute_force(run, "bce", names, num_test=3)
    index = GradientIndex.build(tmp_path / "index", model_path=run)
    assert index.inverse_triples and (index.manifest["replica"] is not None) == (name == "DistMult")
    _, _, test = run_ids(run)
    for t, result in enumerate(index.query(test[:3], top_k=5)):
        for items, sign in ((result.proponents, +1), (result.opponents, -1)):
            rows = expected_rows(reference[t], 5, sign)
            assert [float(reference[t, i.train_index]) for i in items] == pytest.approx([float(reference[t, r]) for r in rows], rel=1e-6, abs=1e-12)
            assert [i.influence for i in items] == pytest.approx([float(reference[t, r]) for r in rows], rel=1e-4, abs=1e-9)
