"""A saturated loss gives zero gradients: said in one line, never printed as a table of zero influences."""

import pytest
import torch
from conftest import run_cli

from tracin_index.errors import VanishingGradientError
from tracin_index.exact import TracInAnalyzer
from tracin_index.kg.runs import ModelConfig, save_run_directory
from tracin_index.kg.triples import IdMaps


def saturated_rescal(training):
    """A RESCAL whose scores are in the hundreds (as trained RESCALs' are): bce's gradient underflows to 0."""
    from pykeen.models import model_resolver

    model = model_resolver.make("RESCAL", dict(embedding_dim=8), triples_factory=training, random_seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.abs() + 1.0)  # positive entries: every score is at least 8 x 8 = 64 ...
        model.entity_representations[0]._embeddings.weight.mul_(3.0)  # ... and with entities x3, over 500
    scores = model.score_hrt(training.mapped_triples[:50]).detach()
    assert scores.min() > 200
    return model.eval()


def test_the_analyzer_refuses_vanished_gradients_and_suggests_ce(nations):
    model = saturated_rescal(nations.training)
    analyzer = TracInAnalyzer(model, use_last_layers_only=False, loss="bce")
    with pytest.raises(VanishingGradientError, match="--loss ce"):
        analyzer.compute_influences(nations.testing.mapped_triples[:2], nations.training.mapped_triples[:200])
    # the 1-N softmax loss is not saturated by large scores: there are influences of both signs
    (result,) = TracInAnalyzer(model, use_last_layers_only=False, loss="ce").compute_influences(
        nations.testing.mapped_triples[:1], nations.training.mapped_triples[:200], top_k=3)
    assert result.proponents and result.opponents


@pytest.fixture
def saturated_run(nations, tmp_path):
    training = nations.training
    run = tmp_path / "run"
    labels = training.label_triples(training.mapped_triples)
    save_run_directory(run, model=saturated_rescal(training),
                       config=ModelConfig("RESCAL", {"embedding_dim": 8}, training.num_entities, training.real_num_relations),
                       id_maps=IdMaps.from_triples_factory(training), training=labels, testing=labels[:3])  # fmt: skip
    return run


def test_exact_says_so_in_one_line(saturated_run, capsys):
    code, out, err = run_cli(capsys, "exact", "--model-path", saturated_run, "--top-k", "3")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "vanish" in errors[0] and "--loss ce" in errors[0]
    assert "Proponents" not in out


def test_a_build_whose_gradients_all_vanish_is_refused_before_writing(saturated_run, tmp_path, capsys):
    code, _, err = run_cli(capsys, "build", "--model-path", saturated_run, "--out", tmp_path / "index")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "vanish" in errors[0] and "--loss ce" in errors[0]
    assert not (tmp_path / "index").exists()
