"""--optimizer adam: TracIn of Adam's steps, sum_c lr_c <g_train / (sqrt(v_hat_c) + eps), g_test>, against
a per-triple autograd loop and Adam's second moments written out from their definition."""

import json

import pytest
import torch
from conftest import run_cli
from reference import flat, per_triple_gradients
from test_index import expected_rows, run_ids

from tracin_index.errors import InputError
from tracin_index.exact import TracInAnalyzer
from tracin_index.kg.checkpoints import optimizer_record

NUM_TEST = 3


def test_the_record_holds_adams_second_moments_as_defined():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-7)
    squares = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for step in range(3):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        for n, p in model.named_parameters():  # v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
            squares[n] = 0.99 * squares[n] + 0.01 * p.grad.detach() ** 2
        optimizer.step()
    record = optimizer_record(optimizer, model)
    assert record["name"] == "Adam" and record["beta2"] == 0.99 and record["eps"] == 1e-7
    assert set(record["exp_avg_sq"]) == set(squares) and set(record["step"].values()) == {3}
    for n, v in squares.items():
        torch.testing.assert_close(record["exp_avg_sq"][n], v)
    assert optimizer_record(torch.optim.SGD(model.parameters(), lr=0.1), model) == {"name": "SGD"}


def adam_reference(run_dir, train_gradients, num_test: int = NUM_TEST, names=None) -> torch.Tensor:
    """sum_c lr_c <g_train / (sqrt(v / (1 - beta2^t)) + eps), g_test>, v read from the checkpoint file."""
    run, _, test = run_ids(run_dir)
    model = run.model.double()
    names = names or [n for n in dict(model.named_parameters()) if n.startswith("interaction.hr1d")]
    scores = torch.zeros(num_test, train_gradients[0][1].shape[0], dtype=torch.float64)
    for checkpoint, (lr, g_train) in zip(run.checkpoints, train_gradients):
        saved = torch.load(checkpoint.path, weights_only=True)
        model.load_state_dict({k: v.double() for k, v in saved["model_state_dict"].items()})
        state = saved["optimizer"]
        assert state["name"] == "Adam"
        factors = []
        for n in names:
            v_hat = state["exp_avg_sq"][n].double() / (1 - state["beta2"] ** state["step"][n])
            factors.append((1 / (v_hat.sqrt() + state["eps"])).reshape(-1))
        g_test = flat(per_triple_gradients(model, test[:num_test], names, "bce", "tail"))
        scores += lr * (g_test * torch.cat(factors)) @ g_train.T
    return scores


def test_adam_aware_scores_match_the_per_triple_loop(tiny_run, tiny_train_gradients, tmp_path, capsys):
    reference = adam_reference(tiny_run, tiny_train_gradients("bce"))
    run, train, test = run_ids(tiny_run)
    analyzer = TracInAnalyzer(run.model.double(), checkpoints=run.checkpoints, optimizer="adam")
    torch.testing.assert_close(analyzer.influence_scores(test[:NUM_TEST], train), reference, rtol=1e-6, atol=1e-9)
    plain = TracInAnalyzer(run.model.double(), checkpoints=run.checkpoints).influence_scores(test[:NUM_TEST], train)
    assert not torch.allclose(plain, reference, rtol=0.1)  # Adam's steps are not the gradients

    out = tmp_path / "adam.json"
    code, _, err = run_cli(capsys, "exact", "--model-path", tiny_run, "--use-last-layers-only", "--optimizer", "adam",
                           "--output", out)  # fmt: skip
    assert code == 0, err
    written = json.loads(out.read_text())
    assert written["config"]["optimizer"] == "adam"
    rows = expected_rows(reference[0], 10, +1)
    assert [p["train_index"] for p in written["results"][0]["proponents"]] == rows
    assert [p["influence"] for p in written["results"][0]["proponents"]] == pytest.approx(
        [float(reference[0, r]) for r in rows], rel=1e-4)


def test_checkpoints_without_optimizer_state_are_refused_in_one_line(tiny_run, tmp_path, capsys):
    run, _, _ = run_ids(tiny_run)
    bare = tmp_path / "checkpoints"
    bare.mkdir()
    for checkpoint in run.checkpoints:
        saved = torch.load(checkpoint.path, weights_only=True)
        del saved["optimizer"]
        torch.save(saved, bare / checkpoint.path.name)
    code, _, err = run_cli(capsys, "exact", "--model-path", tiny_run, "--use-last-layers-only", "--optimizer", "adam",
                           "--checkpoints", bare)  # fmt: skip
    assert code != 0 and "no optimizer state" in err and "--optimizer sgd" in err and "Traceback" not in err
    with pytest.raises(InputError, match="model alone has none"):
        TracInAnalyzer(run.model, optimizer="adam")
    with pytest.raises(InputError, match="unknown --optimizer"):
        TracInAnalyzer(run.model, checkpoints=run.checkpoints, optimizer="adagrad")


def test_the_index_refuses_adam_and_points_to_exact(tiny_run, tmp_path, capsys):
    from tracin_index.index import GradientIndex

    GradientIndex.build(tmp_path / "index", model_path=tiny_run, sketch_dim=16)
    code, _, err = run_cli(capsys, "query", tmp_path / "index", "--test", tiny_run / "test.tsv", "--test-indices", "0",
                           "--optimizer", "adam")  # fmt: skip
    assert code != 0 and "tracin-index exact --optimizer adam" in err and "Traceback" not in err


def test_adam_aware_scores_of_an_embedding_model_keep_its_sparse_rows(tmp_path):
    from test_index import training_gradients

    from tracin_index.gradients.blocks import RowsBlock
    from tracin_index.kg.training import train_run

    run_dir = train_run(tmp_path / "run", dataset="nations", model="DistMult", model_kwargs={"embedding_dim": 8},
                        epochs=2, checkpoint_every=1, learning_rate=0.05, progress=False)  # fmt: skip
    run, train, test = run_ids(run_dir)
    analyzer = TracInAnalyzer(run.model.double(), checkpoints=run.checkpoints, optimizer="adam")
    names = analyzer.selection.parameter_names
    assert all("_embeddings" in n for n in names)
    reference = adam_reference(run_dir, training_gradients(run_dir, "bce", names), names=names)
    torch.testing.assert_close(analyzer.influence_scores(test[:NUM_TEST], train), reference, rtol=1e-6, atol=1e-12)
    preconditioned = analyzer._preconditioners[0].apply(analyzer.gradients.compute(test[:1], "tail"))
    assert all(isinstance(b, RowsBlock) and b.coef is None for b in preconditioned.blocks.values())  # still sparse
