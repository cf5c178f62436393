"""The command line: `train` then `exact` end to end, original flag forms, one-line errors for bad input."""

import json

import pytest
import torch
from conftest import run_cli

from tracin_index.cli import expand_multi_value_options


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_several_values_after_one_flag_become_repeated_flags():
    argv = ["exact", "--test-indices", "0", "1", "2", "--top-k", "3", "--last-layer-names", "a", "b"]
    assert expand_multi_value_options(argv) == [
        "exact", "--test-indices", "0", "--test-indices", "1", "--test-indices", "2", "--top-k", "3",
        "--last-layer-names", "a", "--last-layer-names", "b",
    ]  # fmt: skip


def test_exact_on_a_train_run_prints_labelled_proponents_and_opponents(capsys, tiny_run):
    code, out, err = run_cli(capsys, "exact", "--model-path", tiny_run, "--use-last-layers-only", "--top-k", "3")
    assert code == 0, err
    assert "Proponents of test triple 0" in out and "Opponents of test triple 0" in out
    head, relation, tail = (tiny_run / "test.tsv").read_text().splitlines()[0].split("\t")
    assert f"({head}, {relation}, {tail})" in out


def test_exact_writes_the_result_json_schema(capsys, tiny_run, tmp_path):
    output = tmp_path / "out.json"
    code, _, err = run_cli(
        capsys, "exact", "--model-path", tiny_run, "--use-last-layers-only", "--test-indices", "0", "2",
        "--top-k", "4", "--output", output,
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(output.read_text())
    assert [r["test_index"] for r in data["results"]] == [0, 2]
    train_rows = (tiny_run / "train.tsv").read_text().splitlines()
    for result in data["results"]:
        assert set(result["test_triple"]) == {"head", "relation", "tail"}
        influences = [p["influence"] for p in result["proponents"]]
        assert influences == sorted(influences, reverse=True) and len(influences) == 4
        opp = [o["influence"] for o in result["opponents"]]
        assert opp == sorted(opp)
        for item in result["proponents"] + result["opponents"]:
            assert train_rows[item["train_index"]] == "\t".join((item["head"], item["relation"], item["tail"]))
    assert len(data["config"]["checkpoints"]) == 2


def test_exact_accepts_old_layer_names_and_several_checkpoints_after_one_flag(capsys, tiny_run, tmp_path):
    output = tmp_path / "out.json"
    c1, c2 = sorted((tiny_run / "checkpoints").iterdir())
    code, _, err = run_cli(
        capsys, "exact", "--model-path", tiny_run, "--last-layer-names", "interaction.linear", "interaction.bn2",
        "--checkpoints", c1, c2, "--output", output,
    )  # fmt: skip
    assert code == 0, err
    config = json.loads(output.read_text())["config"]
    assert config["parameters"]["parameters"] == [
        "interaction.hr1d.0.weight", "interaction.hr1d.0.bias", "interaction.hr1d.2.weight", "interaction.hr1d.2.bias",
    ]  # fmt: skip
    assert [c["epoch"] for c in config["checkpoints"]] == [1, 2]


def test_exact_without_last_layers_flag_uses_all_parameters(capsys, tiny_run, tmp_path):
    output = tmp_path / "out.json"
    code, _, err = run_cli(capsys, "exact", "--model-path", tiny_run, "--output", output, "--top-k", "2")
    assert code == 0, err
    assert json.loads(output.read_text())["config"]["parameters"]["mode"] == "all"


# -- bad input: one line, non-zero exit, no traceback -------------------------------------------


def test_missing_model_path(capsys, tmp_path):
    code, _, err = run_cli(capsys, "exact", "--model-path", tmp_path / "nope")
    assert_one_line_error(code, err, "nope")


def test_pickled_model_needs_allow_pickle(capsys, tiny_run, tmp_path, nations):
    from tracin_index.kg.runs import load_model

    path = tmp_path / "model.pkl"
    torch.save(load_model(tiny_run).model, path)
    code, _, err = run_cli(capsys, "exact", "--model-path", path, "--train", tiny_run / "train.tsv")
    assert_one_line_error(code, err, "--allow-pickle", "arbitrary code")


def test_malformed_training_line_names_file_and_line(capsys, tiny_run, tmp_path):
    bad = tmp_path / "train.tsv"
    lines = (tiny_run / "train.tsv").read_text().splitlines()
    lines[4] = "brazil\tembassy"
    bad.write_text("\n".join(lines) + "\n")
    code, _, err = run_cli(capsys, "exact", "--model-path", tiny_run, "--train", bad, "--use-last-layers-only")
    assert_one_line_error(code, err, f"{bad}:5")


def test_unknown_label_in_test_file_suggests_close_labels(capsys, tiny_run, tmp_path):
    test = tmp_path / "test.tsv"
    test.write_text("brazi\tembassy\tuk\n")
    code, _, err = run_cli(capsys, "exact", "--model-path", tiny_run, "--test", test, "--use-last-layers-only")
    assert_one_line_error(code, err, "'brazi'", "'brazil'", f"{test}:1")


def test_test_index_out_of_range(capsys, tiny_run):
    code, _, err = run_cli(capsys, "exact", "--model-path", tiny_run, "--test-indices", "100000")
    assert_one_line_error(code, err, "100000", "out of range")


def test_unknown_layer_name_lists_valid_ones(capsys, tiny_run):
    code, _, err = run_cli(capsys, "exact", "--model-path", tiny_run, "--last-layer-names", "interaction.fc2")
    assert_one_line_error(code, err, "interaction.fc2", "interaction.hr1d.0")


def test_checkpoint_of_another_shape_names_the_parameter(capsys, tiny_run, tmp_path):
    state = torch.load(tiny_run / "model.pt", weights_only=True)["model_state_dict"]
    state["interaction.hr1d.2.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pt"
    torch.save({"model_state_dict": state, "learning_rate": 0.1, "epoch": 1}, path)
    code, _, err = run_cli(capsys, "exact", "--model-path", tiny_run, "--checkpoints", path, "--use-last-layers-only")
    assert_one_line_error(code, err, "interaction.hr1d.2.weight")


def test_only_one_id_map_given(capsys, tiny_run):
    code, _, err = run_cli(capsys, "exact", "--model-path", tiny_run, "--entity-to-id", tiny_run / "entity_to_id.tsv.gz")
    assert_one_line_error(code, err, "--relation-to-id")


def test_train_refuses_unknown_dataset(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--dataset", "fb15k", "--out", tmp_path / "run")
    assert_one_line_error(code, err, "fb15k", "nations")


@pytest.mark.parametrize("loss", ["mse"])
def test_unknown_loss_is_a_usage_error(capsys, tiny_run, loss):
    code, _, err = run_cli(capsys, "exact", "--model-path", tiny_run, "--loss", loss)
    assert code != 0 and "Traceback" not in err and "mse" in err


# -- build, query, self-influence ---------------------------------------------------------------


@pytest.fixture(scope="module")
def built_index(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-index") / "index"
    from tracin_index.cli import main

    main(["build", "--model-path", str(tiny_run), "--out", str(out), "--sketch-dim", "16", "--shard-size", "500"])
    return out


def test_build_then_query_a_labelled_triple(capsys, built_index):
    code, out, err = run_cli(capsys, "query", built_index, "--triple", "brazil", "embassy", "uk", "--top-k", "3")
    assert code == 0, err
    assert "Proponents of (brazil, embassy, uk)" in out and "Opponents of (brazil, embassy, uk)" in out


def test_query_by_ids_equals_query_by_labels(capsys, built_index, tmp_path):
    from tracin_index.index import GradientIndex

    ids = GradientIndex.open(built_index).id_maps().resolve_triple("brazil", "embassy", "uk")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert run_cli(capsys, "query", built_index, "--triple", "brazil", "embassy", "uk", "--output", a)[0] == 0
    assert run_cli(capsys, "query", built_index, "--ids", "--triple", *map(str, ids), "--output", b)[0] == 0
    assert json.loads(a.read_text())["results"] == json.loads(b.read_text())["results"]


def test_query_a_test_file_writes_json_and_tsv(capsys, built_index, tiny_run, tmp_path):
    for output in (tmp_path / "q.json", tmp_path / "q.tsv"):
        code, _, err = run_cli(
            capsys, "query", built_index, "--test", tiny_run / "test.tsv", "--test-indices", "1", "3",
            "--top-k", "4", "--candidates", "20", "--output", output,
        )  # fmt: skip
        assert code == 0, err
    data = json.loads((tmp_path / "q.json").read_text())
    assert data["config"]["scores"] == "exact" and data["config"]["candidates"] == 20
    results = data["results"]
    assert [r["test_index"] for r in results] == [1, 3]
    assert all(len(r["proponents"]) == 4 and len(r["opponents"]) == 4 for r in results)
    lines = (tmp_path / "q.tsv").read_text().splitlines()
    assert lines[0].split("\t")[:5] == ["test_index", "test_head", "test_relation", "test_tail", "kind"]
    assert len(lines) == 1 + 2 * 2 * 4


def test_self_influence_lists_the_top_triples(capsys, built_index, tmp_path):
    code, out, err = run_cli(capsys, "self-influence", built_index, "--top-k", "5")
    assert code == 0, err
    assert "self-influence" in out
    code, _, err = run_cli(capsys, "self-influence", built_index, "--output", tmp_path / "s.tsv")
    assert code == 0, err
    assert len((tmp_path / "s.tsv").read_text().splitlines()) == 1 + 1592


def test_query_with_an_unknown_label(capsys, built_index):
    code, _, err = run_cli(capsys, "query", built_index, "--triple", "brazil", "embasy", "uk")
    assert_one_line_error(code, err, "'embasy'", "'embassy'")


def test_query_of_a_wrong_index_path(capsys, tmp_path):
    code, _, err = run_cli(capsys, "query", tmp_path / "nope", "--triple", "a", "b", "c")
    assert_one_line_error(code, err, "nope", "no such index directory")


def test_query_needs_a_triple_or_a_test_file(capsys, built_index):
    code, _, err = run_cli(capsys, "query", built_index)
    assert_one_line_error(code, err, "--triple", "--test")


def test_query_refuses_candidates_below_top_k(capsys, built_index):
    code, _, err = run_cli(capsys, "query", built_index, "--triple", "brazil", "embassy", "uk", "--top-k", "10",
                           "--candidates", "5")  # fmt: skip
    assert_one_line_error(code, err, "--candidates")


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_a_bad_top_k_is_one_line_not_a_usage_box(capsys, built_index, value):
    code, _, err = run_cli(capsys, "query", built_index, "--triple", "brazil", "embassy", "uk", "--top-k", value)
    assert_one_line_error(code, err, "--top-k")


def test_verify_of_an_intact_index_says_so(capsys, built_index):
    code, out, err = run_cli(capsys, "verify", built_index)
    assert code == 0 and "all files match their checksums" in err


def test_build_with_a_missing_training_file(capsys, tiny_run, tmp_path):
    code, _, err = run_cli(capsys, "build", "--model-path", tiny_run, "--train", tmp_path / "none.tsv",
                           "--out", tmp_path / "index")  # fmt: skip
    assert_one_line_error(code, err, "none.tsv")


# -- input that is not what it should be (issue [2/5]) ---------------------------------------------


def test_a_garbage_checkpoint_is_said_not_to_be_a_checkpoint(capsys, tiny_run, tmp_path):
    garbage = tmp_path / "epoch-9.pt"
    garbage.write_bytes(bytes(range(256)) * 8)
    code, _, err = run_cli(capsys, "exact", "--model-path", tiny_run, "--checkpoints", garbage, "--use-last-layers-only")
    assert_one_line_error(code, err, "epoch-9.pt", "is not a PyTorch file")
    assert "Python objects" not in err


def test_a_header_line_in_the_training_file_is_named_as_such(capsys, tiny_run, tmp_path):
    train = tmp_path / "train.tsv"
    train.write_text("head\trelation\ttail\n" + (tiny_run / "train.tsv").read_text())
    code, _, err = run_cli(capsys, "exact", "--model-path", tiny_run, "--train", train, "--use-last-layers-only")
    assert_one_line_error(code, err, f"{train}:1", "header")


def test_a_file_of_ids_passed_as_labels_says_what_was_expected(capsys, tiny_run, tmp_path):
    ids = tmp_path / "numeric_triples.tsv"
    ids.write_text("0\t3\t5\n1\t2\t4\n")
    code, _, err = run_cli(capsys, "exact", "--model-path", tiny_run, "--train", ids, "--use-last-layers-only")
    assert_one_line_error(code, err, "integer ids", "labels")


def test_duplicate_training_lines_are_counted_and_named(capsys, tiny_run, tmp_path):
    lines = (tiny_run / "train.tsv").read_text().splitlines()
    train = tmp_path / "train.tsv"
    train.write_text("\n".join(lines + [lines[3], lines[7]]) + "\n")
    code, _, err = run_cli(capsys, "exact", "--model-path", tiny_run, "--train", train, "--use-last-layers-only",
                           "--top-k", "2")  # fmt: skip
    assert code == 0, err
    warning = [line for line in err.splitlines() if "repeat an earlier line" in line]
    assert warning and "2 training triples repeat" in warning[0] and f"{len(lines) + 1}, {len(lines) + 2}" in warning[0]
