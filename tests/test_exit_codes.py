"""Failures named truthfully: bad input exits 2, a failure of the machine 1 (one line each, no traceback), and a bug
shows its traceback and says so (exit 1)."""

from __future__ import annotations

import errno

from conftest import run_cli


def _query_raising(monkeypatch, error: BaseException):
    import tracin_index.index as index

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(index.GradientIndex, "open", broken)


def test_a_bug_shows_its_traceback_and_says_it_is_one(monkeypatch, tmp_path, capsys):
    _query_raising(monkeypatch, ZeroDivisionError("division by zero"))
    code, _, err = run_cli(capsys, "query", tmp_path, "--triple", "a", "r", "b")
    assert code == 1
    assert "Traceback" in err and "ZeroDivisionError: division by zero" in err
    assert err.strip().splitlines()[-1].startswith("error: this is a bug in tracin-index"), err


def test_a_full_disk_outside_our_writers_is_one_line_and_exit_1(monkeypatch, tmp_path, capsys):
    _query_raising(monkeypatch, OSError(errno.ENOSPC, "No space left on device", "/data/cache.bin"))
    code, _, err = run_cli(capsys, "query", tmp_path, "--triple", "a", "r", "b")
    assert code == 1 and "Traceback" not in err, err
    assert err.strip().splitlines() == ["error: /data/cache.bin: could not be written, the disk is full; free some space "
                                        "and run the same command again"]  # fmt: skip


def test_bad_input_is_exit_2_and_a_machine_failure_exit_1(monkeypatch, tmp_path, capsys):
    from tracin_index.errors import MachineError

    code, _, err = run_cli(capsys, "query", tmp_path / "missing", "--triple", "a", "r", "b")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    _query_raising(monkeypatch, MachineError("shard-00001.h5: failed on the cluster after 2 retries (MemoryError: x)"))
    code, _, err = run_cli(capsys, "query", tmp_path, "--triple", "a", "r", "b")
    assert code == 1 and err.strip() == "error: shard-00001.h5: failed on the cluster after 2 retries (MemoryError: x)"
