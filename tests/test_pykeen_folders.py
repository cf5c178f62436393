"""Specifications of PyKEEN's artifacts as they are: a ``save_to_directory`` folder as a model path, its
``numeric_triples.tsv.gz`` as training triples, and the callback's run directory with its splits.

Every folder is written by a real ``pipeline()`` run on Nations (DistMult, 1 epoch), with and without
inverse triples; numbers are checked against one autograd backward per triple (tests/reference.py).
"""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from conftest import run_cli
from reference import flat, per_triple_gradients

from tracin_index.kg.callback import TracInCheckpointCallback
from tracin_index.kg.runs import load_model
from tracin_index.kg.triples import IdMaps, read_id_map, read_labeled_triples, write_id_map, write_labeled_triples

KWARGS = {"embedding_dim": 4}


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "inverse"])
def pykeen_run(request, tmp_path_factory):
    """One pipeline() run, kept both ways: the callback's run directory and save_to_directory's folder."""
    from pykeen.datasets import Nations
    from pykeen.pipeline import pipeline

    root = tmp_path_factory.mktemp("inverse" if request.param else "plain")
    dataset = Nations(create_inverse_triples=request.param)
    result = pipeline(
        dataset=dataset,
        model="DistMult",
        model_kwargs=KWARGS,
        training_kwargs=dict(num_epochs=1, batch_size=512, use_tqdm=False, callbacks=TracInCheckpointCallback(
            root / "run", model_kwargs=KWARGS, dataset=dataset)),
        evaluation_kwargs=dict(use_tqdm=False),
        random_seed=3,
    )  # fmt: skip
    result.save_to_directory(root / "pkl")
    return root, dataset, result


def _exact(capsys, out, *args) -> dict:
    code, _, err = run_cli(capsys, "exact", *args, "--top-k", "5", "--output", out)
    assert code == 0, err
    return json.loads(out.read_text())


def _lists(results: dict) -> list:
    return [(r["test_triple"], r["proponents"], r["opponents"]) for r in results["results"]]


def _reference_scores(model, test_triple: torch.Tensor, training: torch.Tensor) -> torch.Tensor:
    """<g(test), g(train_j)> over all parameters, one backward per triple (the model is its only checkpoint)."""
    names = [name for name, _ in model.named_parameters()]
    test = flat(per_triple_gradients(model, test_triple.view(1, 3), names, "bce", direction="tail"))
    train = flat(per_triple_gradients(model, training, names, "bce"))
    return (train.double() @ test[0].double()).float()


# --- save_to_directory's folder --------------------------------------------------------------------------


def test_a_save_to_directory_folder_gives_the_training_triples_in_pykeens_row_order(pykeen_run):
    from pykeen.triples import TriplesFactory

    root, _, result = pykeen_run
    run = load_model(root / "pkl", allow_pickle=True)

    read_by_pykeen = TriplesFactory.from_path_binary(root / "pkl" / "training_triples")
    assert torch.equal(run.training_ids, result.training.mapped_triples)
    assert torch.equal(run.training_ids, read_by_pykeen.mapped_triples)
    assert run.id_maps == IdMaps.from_triples_factory(result.training)
    assert run.training_path == root / "pkl" / "training_triples" / "numeric_triples.tsv.gz"


def test_exact_on_a_save_to_directory_folder_needs_no_train_and_matches_per_triple_autograd(pykeen_run, capsys, tmp_path):
    root, dataset, result = pykeen_run
    got = _exact(capsys, tmp_path / "out.json", "--model-path", root / "pkl", "--allow-pickle",
                 "--test", root / "run" / "test.tsv", "--test-indices", "0")["results"][0]  # fmt: skip

    scores = _reference_scores(result.model.cpu(), dataset.testing.mapped_triples[0], dataset.training.mapped_triples)
    for listed, ranked in ((got["proponents"], scores.sort(descending=True).values),
                           (got["opponents"], scores.sort().values)):  # fmt: skip
        assert len(listed) == 5
        assert [p["influence"] for p in listed] == pytest.approx(ranked[:5].tolist(), rel=1e-4, abs=1e-7)
        assert [p["influence"] for p in listed] == pytest.approx([float(scores[p["train_index"]]) for p in listed],
                                                                 rel=1e-4, abs=1e-7)  # fmt: skip
        labels = dataset.training.label_triples(dataset.training.mapped_triples[[p["train_index"] for p in listed]])
        assert [[p["head"], p["relation"], p["tail"]] for p in listed] == labels.tolist()


def test_a_save_to_directory_folder_answers_as_its_triples_given_as_a_labelled_tsv(pykeen_run, capsys, tmp_path):
    root, dataset, _ = pykeen_run
    labelled = tmp_path / "train.tsv"
    write_labeled_triples(dataset.training.label_triples(dataset.training.mapped_triples), labelled)
    common = ["--model-path", root / "pkl", "--allow-pickle", "--test", root / "run" / "test.tsv", "--test-indices", "0", "3"]

    from_folder = _exact(capsys, tmp_path / "folder.json", *common)
    from_labels = _exact(capsys, tmp_path / "labels.json", *common, "--train", labelled)

    assert _lists(from_folder) == _lists(from_labels)


def test_build_verify_and_query_of_a_save_to_directory_folder_answer_as_exact_does(pykeen_run, capsys, tmp_path):
    root, _, _ = pykeen_run
    index = tmp_path / "idx"
    code, _, err = run_cli(capsys, "build", "--model-path", root / "pkl", "--allow-pickle", "--out", index)
    assert code == 0, err
    code, _, err = run_cli(capsys, "verify", index)  # re-reads the numeric triples the index was built from
    assert code == 0, err
    test = ["--test", root / "run" / "test.tsv", "--test-indices", "0", "3", "--top-k", "5"]
    code, _, err = run_cli(capsys, "query", index, *test, "--allow-pickle", "--output", tmp_path / "query.json")
    assert code == 0, err
    exact = _exact(capsys, tmp_path / "exact.json", "--model-path", root / "pkl", "--allow-pickle", *test)

    queried = json.loads((tmp_path / "query.json").read_text())
    for q, e in zip(queried["results"], exact["results"]):
        for side in ("proponents", "opponents"):
            assert [p["train_index"] for p in q[side]] == [p["train_index"] for p in e[side]]
            assert [p["influence"] for p in q[side]] == pytest.approx([p["influence"] for p in e[side]], rel=1e-4, abs=1e-7)


# --- numeric_triples.tsv.gz as --train --------------------------------------------------------------------


def test_pykeens_numeric_triples_read_as_ids_are_its_rows_in_order(pykeen_run):
    root, _, result = pykeen_run
    maps = IdMaps.from_triples_factory(result.training)

    ids = maps.read_ids(root / "pkl" / "training_triples" / "numeric_triples.tsv.gz")

    assert torch.equal(ids, result.training.mapped_triples)


def test_numeric_triples_given_as_train_answer_as_the_labelled_train_tsv(pykeen_run, capsys, tmp_path):
    root, _, _ = pykeen_run
    numeric = root / "pkl" / "training_triples" / "numeric_triples.tsv.gz"
    common = ["--model-path", root / "run", "--test-indices", "0", "3"]

    from_ids = _exact(capsys, tmp_path / "ids.json", *common, "--train", numeric)
    from_labels = _exact(capsys, tmp_path / "labels.json", *common)  # the run directory's train.tsv

    assert _lists(from_ids) == _lists(from_labels)
    assert from_ids["config"]["train"] == str(numeric)


def test_numeric_triples_beside_other_id_maps_are_refused(pykeen_run, capsys, tmp_path):
    root, _, _ = pykeen_run
    folder = tmp_path / "training_triples"
    shutil.copytree(root / "pkl" / "training_triples", folder)
    entities = read_id_map(folder / "entity_to_id.tsv.gz")
    first, second = sorted(entities, key=entities.get)[:2]
    entities[first], entities[second] = entities[second], entities[first]
    write_id_map(entities, folder / "entity_to_id.tsv.gz")

    code, _, err = run_cli(capsys, "exact", "--model-path", root / "run", "--train", folder / "numeric_triples.tsv.gz")

    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "entity_to_id" in errors[0] and "numbered by" in errors[0], err


class _Planted:
    """Unpickling this writes a file: proof that a pickle ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_numeric_triples_as_train_never_unpickle_the_base_pth_beside_them(pykeen_run, capsys, tmp_path):
    root, _, _ = pykeen_run
    folder = tmp_path / "training_triples"
    shutil.copytree(root / "pkl" / "training_triples", folder)
    ran = tmp_path / "the-pickle-ran"
    (folder / "base.pth").write_bytes(pickle.dumps(_Planted(str(ran))))

    out = tmp_path / "out.json"
    code, _, err = run_cli(capsys, "exact", "--model-path", root / "run", "--train", folder / "numeric_triples.tsv.gz",
                           "--top-k", "1", "--output", out)  # fmt: skip

    assert code == 0, err
    assert not ran.exists()


# --- the callback's run directory -------------------------------------------------------------------------


def test_the_callback_given_the_dataset_writes_its_validation_and_test_splits(pykeen_run):
    root, dataset, _ = pykeen_run
    run = load_model(root / "run")

    for name, split in (("valid.tsv", dataset.validation), ("test.tsv", dataset.testing)):
        written = read_labeled_triples(root / "run" / name).labels
        assert written.tolist() == split.label_triples(split.mapped_triples).tolist(), name
    assert run.test_path == root / "run" / "test.tsv"
    assert json.loads((root / "run" / "config.json").read_text())["dataset"] == "nations"


def test_exact_on_the_callbacks_run_needs_neither_train_nor_test(pykeen_run, capsys, tmp_path):
    root, _, _ = pykeen_run
    results = _exact(capsys, tmp_path / "out.json", "--model-path", root / "run", "--test-indices", "0")
    assert results["config"]["test"] == str(root / "run" / "test.tsv")
    assert results["config"]["train"] == str(root / "run" / "train.tsv")
