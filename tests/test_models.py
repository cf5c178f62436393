"""Specifications of tracin_index.kg (runs, checkpoints, callback): run directories, checkpoints, pickles, the training callback."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from tracin_index.errors import InputError, ModelLoadError, PickleRefusedError, TracInWarning
from tracin_index.kg.callback import TracInCheckpointCallback
from tracin_index.kg.checkpoints import Checkpoint, find_checkpoints, load_state_dict_into
from tracin_index.kg.runs import ModelConfig, build_model, load_model

CONVE_KWARGS = {"embedding_dim": 32, "output_channels": 4}


def _distmult_config(nations, dim: int = 16) -> ModelConfig:
    return ModelConfig(
        model="DistMult",
        model_kwargs={"embedding_dim": dim},
        num_entities=nations.training.num_entities,
        num_relations=nations.training.real_num_relations,
        create_inverse_triples=False,
        random_seed=1,
    )


def _save(path, **content):
    torch.save(content, path)
    return path


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name].cpu(), state_b[name].cpu()), name


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """A tiny ConvE trained by pykeen.pipeline with the callback, also saved with save_to_directory."""
    from pykeen.datasets import Nations
    from pykeen.pipeline import pipeline

    root = tmp_path_factory.mktemp("pipeline")
    result = pipeline(
        dataset=Nations(create_inverse_triples=True),
        model="ConvE",
        model_kwargs=CONVE_KWARGS,
        optimizer_kwargs={"lr": 0.0123},
        training_kwargs=dict(
            num_epochs=2,
            batch_size=256,
            use_tqdm=False,
            callbacks=TracInCheckpointCallback(root / "run", frequency=1, model_kwargs=CONVE_KWARGS),
        ),
        evaluation_kwargs=dict(use_tqdm=False),
        random_seed=7,
    )
    result.save_to_directory(root / "pykeen")
    return root, result


# --- the callback -------------------------------------------------------------------------------------


def test_callback_inside_pipeline_writes_a_run_directory_that_loads(pipeline_run):
    root, result = pipeline_run
    run = load_model(root / "run")
    _assert_same_state(run.model, result.model)
    assert run.config.model == "ConvE" and run.config.create_inverse_triples
    assert run.id_maps.entity_to_id == result.training.entity_to_id
    assert run.training_path.read_text().count("\n") == result.training.num_triples


def test_callback_numbers_checkpoints_by_one_based_epoch_with_the_learning_rate(pipeline_run):
    root, _ = pipeline_run
    checkpoints = find_checkpoints([root / "run" / "checkpoints"])
    assert [c.epoch for c in checkpoints] == [1, 2]
    assert [c.path.name for c in checkpoints] == ["epoch-0001.pt", "epoch-0002.pt"]
    assert [c.learning_rate for c in checkpoints] == pytest.approx([0.0123, 0.0123])


def test_callback_records_the_learning_rate_a_scheduler_set_for_each_epoch(nations, tmp_path):
    from pykeen.models import DistMult
    from pykeen.training import SLCWATrainingLoop

    model = DistMult(triples_factory=nations.training, embedding_dim=16, random_seed=1)
    loop = SLCWATrainingLoop(
        model=model,
        triples_factory=nations.training,
        optimizer="adam",
        optimizer_kwargs={"lr": 0.02},
        lr_scheduler="ExponentialLR",
        lr_scheduler_kwargs={"gamma": 0.5},
    )
    callback = TracInCheckpointCallback(tmp_path / "run", frequency=1, model_kwargs={"embedding_dim": 16})
    loop.train(triples_factory=nations.training, num_epochs=3, batch_size=512, use_tqdm=False, callbacks=callback)

    checkpoints = find_checkpoints([tmp_path / "run" / "checkpoints"])
    assert [c.epoch for c in checkpoints] == [1, 2, 3]
    assert [c.learning_rate for c in checkpoints] == pytest.approx([0.02 * 0.5 ** (k - 1) for k in (1, 2, 3)])


def test_callback_warns_when_config_json_would_not_rebuild_the_model(nations, tmp_path):
    from pykeen.models import DistMult
    from pykeen.training import SLCWATrainingLoop

    model = DistMult(triples_factory=nations.training, embedding_dim=16, random_seed=1)
    loop = SLCWATrainingLoop(model=model, triples_factory=nations.training)
    callback = TracInCheckpointCallback(tmp_path / "run")  # no model_kwargs: config.json says dim 50

    with pytest.warns(TracInWarning, match="pass the model_kwargs"):
        loop.train(triples_factory=nations.training, num_epochs=1, batch_size=1024, use_tqdm=False, callbacks=callback)


def test_callback_refuses_a_directory_that_already_holds_a_run(pipeline_run):
    root, _ = pipeline_run
    with pytest.raises(InputError, match="already holds a run"):
        TracInCheckpointCallback(root / "run")


# --- checkpoints --------------------------------------------------------------------------------------


def test_find_checkpoints_sorts_by_recorded_epoch_then_unnumbered_files_by_name(nations, tmp_path):
    state = build_model(_distmult_config(nations)).state_dict()
    _save(tmp_path / "epoch-10.pt", model_state_dict=state, learning_rate=0.1, epoch=10)
    _save(tmp_path / "epoch-2.pt", model_state_dict=state, learning_rate=0.2, epoch=2)
    _save(tmp_path / "b.pth", state_dict=state, learning_rate=0.3)
    _save(tmp_path / "a.ckpt", model_state_dict=state, learning_rate=0.4)
    (tmp_path / "notes.txt").write_text("not a checkpoint")

    checkpoints = find_checkpoints([tmp_path])

    assert [c.path.name for c in checkpoints] == ["epoch-2.pt", "epoch-10.pt", "a.ckpt", "b.pth"]
    assert [c.epoch for c in checkpoints] == [2, 10, None, None]
    assert [c.learning_rate for c in checkpoints] == [0.2, 0.1, 0.4, 0.3]


def test_checkpoint_without_learning_rate_warns_and_counts_with_one(nations, tmp_path):
    state = build_model(_distmult_config(nations)).state_dict()
    path = _save(tmp_path / "epoch-0001.pt", model_state_dict=state, epoch=1)

    with pytest.warns(TracInWarning, match="no learning_rate recorded; using 1.0"):
        (checkpoint,) = find_checkpoints([path])

    assert checkpoint.learning_rate == 1.0


@pytest.mark.parametrize("rate", [-0.001, float("nan"), float("inf")])
def test_a_negative_or_non_finite_learning_rate_is_refused_naming_the_checkpoint(nations, tmp_path, rate):
    state = build_model(_distmult_config(nations)).state_dict()
    path = _save(tmp_path / "epoch-0003.pt", model_state_dict=state, epoch=3, learning_rate=rate)
    with pytest.raises(ModelLoadError, match="epoch-0003.pt: 'learning_rate'"):
        find_checkpoints([path])


def test_checkpoint_state_dict_loads_into_the_model(nations, tmp_path):
    trained = build_model(_distmult_config(nations))
    torch.nn.init.normal_(trained.entity_representations[0]._embeddings.weight)
    path = _save(tmp_path / "c.pt", model_state_dict=trained.state_dict(), learning_rate=0.5, epoch=3)
    fresh = build_model(_distmult_config(nations))

    load_state_dict_into(fresh, Checkpoint(path, 3, 0.5).load_state_dict(), str(path))

    _assert_same_state(fresh, trained)


def test_checkpoint_of_other_shapes_names_the_parameter(nations, tmp_path):
    small = build_model(_distmult_config(nations, dim=8))
    path = _save(tmp_path / "c.pt", model_state_dict=small.state_dict(), learning_rate=0.1, epoch=1)
    (checkpoint,) = find_checkpoints([path])

    with pytest.raises(ModelLoadError) as error:
        load_state_dict_into(build_model(_distmult_config(nations, dim=16)), checkpoint.load_state_dict(), str(path))

    message = str(error.value)
    assert "'entity_representations.0._embeddings.weight' has shape (14, 8) in the file but (14, 16)" in message
    assert str(path) in message


def test_state_dict_of_another_model_names_missing_parameters(nations):
    conve = build_model(
        ModelConfig("ConvE", CONVE_KWARGS, nations.training.num_entities, nations.training.real_num_relations, True)
    )
    with pytest.raises(ModelLoadError, match="missing 'interaction.hr2d"):
        load_state_dict_into(conve, build_model(_distmult_config(nations)).state_dict(), "f.pt")


def test_checkpoint_holding_python_objects_is_refused_without_running_them(nations, tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"model_state_dict": {}, "learning_rate": 0.1, "model": build_model(_distmult_config(nations))}, path)

    with pytest.raises(ModelLoadError, match="only plain tensors and numbers"):
        find_checkpoints([path])


def test_file_that_is_not_a_torch_file_is_a_load_error(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello\n")

    with pytest.raises(ModelLoadError, match="not a PyTorch file"):
        find_checkpoints([path])


def test_missing_checkpoint_path_and_empty_folder_are_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no such checkpoint"):
        find_checkpoints([tmp_path / "nope"])
    with pytest.raises(ModelLoadError, match="no checkpoint files"):
        find_checkpoints([tmp_path])


# --- configs and models ---------------------------------------------------------------------------------


def test_model_config_round_trips_through_json_keeping_extra_keys(nations):
    config = ModelConfig(
        "ConvE", CONVE_KWARGS, 14, 55, True, 3, extra={"dataset": "nations", "training": {"epochs": 2}}
    )
    data = json.loads(json.dumps(config.to_json()))

    assert data["format"] == "tracin-index-run" and data["format_version"] == 1
    assert ModelConfig.from_json(data, "config.json") == config


def test_model_config_missing_key_names_file_and_key():
    data = ModelConfig("DistMult", {}, 14, 55).to_json()
    del data["num_entities"]

    with pytest.raises(ModelLoadError, match="run/config.json: missing key 'num_entities'"):
        ModelConfig.from_json(data, "run/config.json")


def test_build_model_gives_the_configured_shapes_in_eval_mode(nations):
    model = build_model(
        ModelConfig("conve", CONVE_KWARGS, nations.training.num_entities, nations.training.real_num_relations, True)
    )

    assert type(model).__name__ == "ConvE" and not model.training
    assert model.num_entities == 14 and model.num_relations == 2 * 55


def test_build_model_leaves_the_global_random_state_alone(nations):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model(_distmult_config(nations))

    assert torch.equal(torch.rand(3), expected)


def test_unknown_model_name_lists_close_pykeen_names():
    with pytest.raises(ModelLoadError, match="did you mean ConvE"):
        build_model(ModelConfig("ConvEE", {}, 14, 55))


# --- load_model ----------------------------------------------------------------------------------------


def test_pickled_model_is_refused_without_allow_pickle(nations, tmp_path):
    path = tmp_path / "model.pkl"
    torch.save(build_model(_distmult_config(nations)), path)

    with pytest.raises(PickleRefusedError, match="--allow-pickle"):
        load_model(path)


def test_pickled_model_loads_with_allow_pickle(nations, tmp_path):
    model = build_model(_distmult_config(nations))
    path = tmp_path / "model.pkl"
    torch.save(model, path)

    run = load_model(path, allow_pickle=True)

    _assert_same_state(run.model, model)
    assert run.config is None and run.checkpoints == [] and not run.model.training


def test_pykeen_save_to_directory_is_refused_then_loads_with_allow_pickle(pipeline_run):
    root, result = pipeline_run
    with pytest.raises(PickleRefusedError, match="--allow-pickle"):
        load_model(root / "pykeen")

    run = load_model(root / "pykeen", allow_pickle=True)

    _assert_same_state(run.model, result.model)
    assert run.id_maps.entity_to_id == result.training.entity_to_id


def test_state_dict_file_alone_is_not_a_model(nations, tmp_path):
    path = _save(tmp_path / "weights.pt", model_state_dict=build_model(_distmult_config(nations)).state_dict())

    with pytest.raises(ModelLoadError, match="run directory"):
        load_model(path)


def test_missing_model_path_is_a_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        load_model(tmp_path / "nope")


def test_run_directory_without_model_pt_falls_back_to_its_last_checkpoint(pipeline_run, tmp_path):
    import shutil

    root, result = pipeline_run
    copy = tmp_path / "run"
    shutil.copytree(root / "run", copy)
    (copy / "model.pt").unlink()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = load_model(copy)

    assert any(issubclass(w.category, TracInWarning) and "epoch-0002.pt" in str(w.message) for w in caught)
    _assert_same_state(run.model, result.model)


def test_pykeen_trained_model_pkl_given_itself_finds_the_id_maps_beside_it(pipeline_run):
    root, _ = pipeline_run
    run = load_model(root / "pykeen" / "trained_model.pkl", allow_pickle=True)
    assert run.id_maps is not None and run.id_maps.num_entities == run.model.num_entities
