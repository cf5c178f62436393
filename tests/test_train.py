"""Specifications of tracin_index.kg.training.train_run (``tracin-index train``)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_CONVE

from tracin_index.errors import InputError
from tracin_index.kg.checkpoints import find_checkpoints
from tracin_index.kg.runs import load_model
from tracin_index.kg.training import train_run
from tracin_index.kg.triples import read_labeled_triples


@pytest.fixture
def conve_run(tiny_run):
    """ConvE on Nations (named "Nations"), 2 epochs, a checkpoint every epoch, learning rate 0.01 (not the default)."""
    return tiny_run


def _write_tsv(path, rows):
    path.write_text("".join("\t".join(row) + "\n" for row in rows))
    return path


def test_train_run_writes_a_run_directory_that_load_model_reads_back_identically(conve_run):
    run = load_model(conve_run)

    saved = torch.load(conve_run / "model.pt", weights_only=True)["model_state_dict"]
    final = run.checkpoints[-1].load_state_dict()  # the final epoch's checkpoint is the trained model
    for name, value in run.model.state_dict().items():
        assert torch.equal(value, saved[name]), name
        assert torch.equal(value, final[name]), name
    assert run.training_path == conve_run / "train.tsv" and run.test_path == conve_run / "test.tsv"
    assert run.id_maps.num_entities == run.config.num_entities == 14


def test_train_run_checkpoints_every_epoch_with_the_learning_rate_used(conve_run):
    checkpoints = find_checkpoints([conve_run / "checkpoints"])

    assert [c.epoch for c in checkpoints] == [1, 2]
    assert [c.learning_rate for c in checkpoints] == pytest.approx([0.01, 0.01])


def test_train_run_records_the_training_in_config_json(conve_run):
    config = json.loads((conve_run / "config.json").read_text())

    assert config["model"] == "ConvE" and config["model_kwargs"] == TINY_CONVE
    assert config["create_inverse_triples"] is True  # PyKEEN's advice for ConvE
    assert config["dataset"] == "nations" and config["random_seed"] == 42
    training = config["training"]
    assert training["epochs"] == 2 and training["learning_rate"] == 0.01 and training["optimizer"] == "adam"
    assert training["loss"] == "BCEAfterSigmoidLoss"  # the model's PyKEEN default
    assert len(training["losses"]) == 2


def test_train_run_writes_train_tsv_in_training_index_order(conve_run, nations):
    from pykeen.datasets import Nations

    labels = read_labeled_triples(conve_run / "train.tsv").labels
    factory = Nations(create_inverse_triples=True).training

    assert labels.tolist() == factory.label_triples(factory.mapped_triples).tolist()


def test_train_run_checkpoints_the_final_epoch_even_off_the_schedule(tmp_path):
    rows = [("a", "likes", "b"), ("b", "likes", "c"), ("c", "hates", "a"), ("a", "hates", "c")]
    train = _write_tsv(tmp_path / "train.tsv", rows)
    out = train_run(tmp_path / "run", train_path=train, model="DistMult", model_kwargs={"embedding_dim": 16},
                    epochs=3, checkpoint_every=2, batch_size=2, progress=False)  # fmt: skip

    assert [c.epoch for c in find_checkpoints([out / "checkpoints"])] == [2, 3]


def test_train_run_on_tsv_files_numbers_labels_over_all_splits_and_keeps_row_order(tmp_path):
    train_rows = [("b", "likes", "a"), ("a", "likes", "c"), ("c", "hates", "b")]
    train = _write_tsv(tmp_path / "train.tsv", train_rows)
    valid = _write_tsv(tmp_path / "valid.tsv", [("d", "likes", "a")])
    test = _write_tsv(tmp_path / "test.tsv", [("a", "fears", "e")])

    out = train_run(tmp_path / "run", train_path=train, valid_path=valid, test_path=test, model="DistMult",
                    model_kwargs={"embedding_dim": 16}, epochs=1, checkpoint_every=1, batch_size=2, progress=False)  # fmt: skip
    run = load_model(out)

    assert run.id_maps.entity_to_id == {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4}
    assert run.id_maps.relation_to_id == {"fears": 0, "hates": 1, "likes": 2}
    assert read_labeled_triples(out / "train.tsv").labels.tolist() == [list(r) for r in train_rows]
    assert run.config.create_inverse_triples is False and run.config.extra["dataset"] is None
    assert (out / "valid.tsv").is_file() and run.test_path == out / "test.tsv"


def test_train_run_refuses_an_unknown_dataset_naming_the_bundled_ones(tmp_path):
    with pytest.raises(InputError) as error:
        train_run(tmp_path / "run", dataset="fb15k237", progress=False)

    message = str(error.value)
    assert all(name in message for name in ("nations", "umls", "kinships")) and "TSV" in message
    assert not (tmp_path / "run").exists()


def test_train_run_refuses_a_non_empty_output_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")

    with pytest.raises(InputError, match="not empty; choose another output path"):
        train_run(tmp_path, dataset="nations", progress=False)


def test_train_run_refuses_an_unknown_model_suggesting_close_names(tmp_path):
    with pytest.raises(InputError, match="did you mean.*DistMult"):
        train_run(tmp_path / "run", model="DistMul", progress=False)


def test_train_warns_of_repeated_training_lines_naming_them(tmp_path):
    from tracin_index.errors import TracInWarning

    rows = [("b", "likes", "a"), ("a", "likes", "c"), ("b", "likes", "a"), ("c", "hates", "b")]
    train = _write_tsv(tmp_path / "train.tsv", rows)
    with pytest.warns(TracInWarning) as caught:
        train_run(tmp_path / "run", train_path=train, model="DistMult", model_kwargs={"embedding_dim": 8}, epochs=1,
                  checkpoint_every=1, batch_size=2, progress=False)  # fmt: skip
    (said,) = [str(w.message) for w in caught if "repeat" in str(w.message)]
    assert said.startswith(f"{train}: 1 training triple repeats an earlier line (lines 3)")
    assert "is trained on" in said
