"""--output is checked before any work, and a write that still fails after the work loses no result."""

from __future__ import annotations

import errno

import pytest
from conftest import run_cli


def _one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for word in words:
        assert word in lines[0], err


@pytest.mark.parametrize("command", ["exact", "query"])
def test_an_unknown_extension_is_refused_before_anything_is_loaded(command, tmp_path, capsys):
    # the model and index do not exist: the output's error coming first shows nothing was loaded before it
    missing = tmp_path / "nope"
    args = ["exact", "--model-path", missing] if command == "exact" else ["query", missing, "--test", missing]
    code, _, err = run_cli(capsys, *args, "--output", tmp_path / "x.weird")
    _one_line_error(code, err, "x.weird", ".json", ".tsv", ".jsonl")
    assert not (tmp_path / "x.weird").exists()


def test_an_output_under_a_file_or_on_a_folder_is_refused_first(tmp_path, capsys):
    a_file = tmp_path / "manifest.json"
    a_file.write_text("{}")
    code, _, err = run_cli(capsys, "exact", "--model-path", tmp_path / "nope", "--output", a_file / "x.json")
    _one_line_error(code, err, "is a file, not a folder")
    assert a_file.read_text() == "{}"
    (tmp_path / "out.json").mkdir()
    code, _, err = run_cli(capsys, "exact", "--model-path", tmp_path / "nope", "--output", tmp_path / "out.json")
    _one_line_error(code, err, "is a folder")


def test_an_output_that_cannot_be_written_is_refused_first(tmp_path, capsys):
    code, _, err = run_cli(capsys, "exact", "--model-path", tmp_path / "nope", "--output", "/proc/e.json")
    _one_line_error(code, err, "/proc", "cannot write")


def test_bad_arguments_are_refused_before_the_model_is_loaded(tmp_path, capsys):
    code, _, err = run_cli(capsys, "exact", "--model-path", tmp_path / "nope", "--top-k", "0")
    _one_line_error(code, err, "--top-k")


def test_a_write_failing_after_the_work_prints_the_results(tiny_run, tmp_path, capsys, monkeypatch):
    import tracin_index.results as results

    def full_disk(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    expected_code, expected_out, _ = run_cli(capsys, "exact", "--model-path", tiny_run, "--use-last-layers-only",
                                             "--top-k", "2")  # fmt: skip
    assert expected_code == 0
    monkeypatch.setattr(results, "write_results", full_disk)
    output = tmp_path / "e.json"
    code, out, err = run_cli(capsys, "exact", "--model-path", tiny_run, "--use-last-layers-only", "--top-k", "2",
                             "--output", output)  # fmt: skip
    assert code == 1
    assert out == expected_out  # the same table as without --output
    assert "No space left on device" in err and "printed above" in err and "Traceback" not in err
    assert not output.exists()


def test_self_influence_output_is_checked_first(tmp_path, capsys):
    code, _, err = run_cli(capsys, "self-influence", tmp_path / "nope", "--output", tmp_path / "x.jsonl")
    _one_line_error(code, err, "x.jsonl", ".tsv", ".json")
    code, _, err = run_cli(capsys, "exact", "--model-path", tmp_path / "nope", "--output", tmp_path / "ok.json")
    assert code == 2 and "ok.json" not in err and "nope" in err  # a good output passes the check: the model fails
