"""What a person reads: --help as written (no value placeholder on flags, bracketed defaults kept), counts in
the singular and the plural, a hint where ids were given as labels, and one line on Ctrl-C saying what next."""

import pytest
from conftest import run_cli

from tracin_index.words import counted


@pytest.mark.parametrize("command", ["train", "build", "query", "exact", "self-influence", "serve", "verify", "demo"])
def test_help_shows_flags_without_a_value_placeholder(capsys, command):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0 and "Usage: tracin-index" in out
    assert "<bool>" not in out and "[OPTIONS]" in out


def test_help_keeps_the_bracketed_defaults_as_written(capsys):
    _, out, _ = run_cli(capsys, "build", "--help")
    flat = " ".join(out.split())  # help text wraps at the terminal's width
    assert "Training triples TSV [run dir's train.tsv]." in flat
    assert "--checkpoints <path>... Checkpoint files or folders [run dir's]." in flat
    assert "(needs the [distributed] extra)" in flat
    _, out, _ = run_cli(capsys, "query", "--help")
    assert "--triple <head> <relation> <tail>" in out


def test_counts_are_singular_for_one_and_plural_otherwise():
    assert [counted(n, "test triple") for n in (0, 1, 2, 12345)] == [
        "0 test triples", "1 test triple", "2 test triples", "12,345 test triples"]  # fmt: skip
    assert counted(1, "entity", "entities") == "1 entity" and counted(3, "entity", "entities") == "3 entities"


def test_the_build_log_counts_checkpoints_in_words(capsys, tiny_run, tmp_path):
    code, _, err = run_cli(capsys, "build", "--model-path", tiny_run, "--out", tmp_path / "i", "--sketch-dim", "16")
    assert code == 0, err
    assert "x 2 checkpoints: about" in err and "(s)" not in err


def test_ids_given_as_labels_suggest_ids(capsys, tiny_index):
    from tracin_index.index import GradientIndex

    ids = GradientIndex.open(tiny_index).id_maps().resolve_triple("brazil", "embassy", "uk")
    code, _, err = run_cli(capsys, "query", tiny_index, "--triple", *map(str, ids))
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert "unknown head entity" in errors[0] and "are valid ids: add --ids" in errors[0]
    code, _, err = run_cli(capsys, "query", tiny_index, "--triple", "brazil", "embasy", "uk")
    assert code == 2 and "--ids" not in err  # labels that are not ids: no such hint


def test_ctrl_c_during_a_build_says_the_same_command_resumes(capsys, tiny_run, tmp_path, monkeypatch):
    import tracin_index.build.task as task

    write_arrays, calls = task.write_arrays, []

    def interrupted_after_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return write_arrays(*args, **kwargs)

    monkeypatch.setattr(task, "write_arrays", interrupted_after_two)
    args = ("build", "--model-path", tiny_run, "--out", tmp_path / "i", "--sketch-dim", "16", "--shard-size", "200")
    code, _, err = run_cli(capsys, *args)
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("interrupted; run the same command to resume: it continues after the "
                                            "shard files already written")  # fmt: skip
    monkeypatch.undo()
    code, _, err = run_cli(capsys, *args)
    assert code == 0 and "already complete" in err, err


def test_a_label_of_thousands_of_digits_is_an_unknown_label_not_a_crash(capsys, tiny_index):
    huge = "9" * 5000
    for extra in ((), ("--ids",)):
        code, _, err = run_cli(capsys, "query", tiny_index, *extra, "--triple", huge, "embassy", "uk")
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("command,flag", [
    ("build", "--batch-size"), ("build", "--shard-size"), ("build", "--sketch-dim"), ("build", "--num-last-layers"),
    ("exact", "--num-last-layers"), ("exact", "--top-k"), ("exact", "--batch-size"),
])  # fmt: skip
def test_a_count_below_one_is_refused_naming_its_flag_before_anything_is_loaded(capsys, tmp_path, command, flag):
    missing = tmp_path / "no-such-run"  # loading it would be the first error otherwise
    args = [command, "--model-path", missing, flag, "0"] + (["--out", tmp_path / "i"] if command == "build" else [])
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and err.strip() == f"error: {flag} must be at least 1, got 0"


def test_a_triple_of_two_values_is_refused_before_the_index_is_opened(capsys, tmp_path):
    code, _, err = run_cli(capsys, "query", tmp_path / "no-such-index", "--triple", "brazil", "embassy")
    assert code == 2 and err.strip() == "error: --triple takes HEAD RELATION TAIL, got 2 values: brazil embassy"
