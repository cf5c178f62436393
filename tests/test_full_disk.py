"""A disk that fills up during the work (after the checks before it passed) ends in one line and exit 1, never a
traceback; nothing recorded as complete is damaged, and the same command resumes to the same files.

The disk is real: a small tmpfs mounted for the test (root only; skipped with the reason elsewhere). The space is
taken by a filler file written right after the command's own checks, as another program would take it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import run_cli

MIB = 2**20


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    """A fresh 16 MiB tmpfs (a file system of its own, so that filling it fills nothing else)."""
    where = tmp_path_factory.mktemp("tmpfs")
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield where
    subprocess.run(["umount", str(where)], check=False)


@pytest.fixture
def folder(disk):
    """An empty folder on the small disk; everything on the disk is removed afterwards."""
    path = disk / uuid.uuid4().hex[:8]
    path.mkdir()
    yield path
    subprocess.run(["rm", "-rf", *map(str, disk.iterdir())], check=True)


def fill(disk: Path, leave: int) -> Path:
    """Take all of ``disk``'s free space but ``leave`` bytes."""
    filler = disk / "filler"
    size = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - leave
    with open(filler, "ab") as f:
        os.posix_fallocate(f.fileno(), 0, (filler.stat().st_size if filler.exists() else 0) + max(0, size))
    return filler


def one_line_error(code: int, err: str, *words: str) -> str:
    assert code == 1, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for word in words:
        assert word in errors[0], err
    return errors[0]


def digests(index: Path) -> dict[str, str]:
    return {str(p.relative_to(index)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(index.rglob("*.h5"))}  # fmt: skip


def after_check(monkeypatch, module, name: str, then):
    """Run ``module.name`` as it is, then ``then()``."""
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        then()
        return result

    monkeypatch.setattr(module, name, wrapped)


@pytest.fixture(scope="module")
def reference(tiny_run, tmp_path_factory):
    """The same build on a disk with room: what the resumed build must equal, file for file."""
    from tracin_index import GradientIndex

    out = tmp_path_factory.mktemp("reference") / "idx"
    GradientIndex.build(out, model_path=tiny_run, shard_size=200)
    return out


def test_a_build_that_fills_the_disk_says_so_in_one_line_and_resumes_to_identical_files(tiny_run, reference, folder,
                                                                                         monkeypatch, capsys):  # fmt: skip
    import tracin_index.build.builder as builder

    index = folder / "idx"
    size = sum(p.stat().st_size for p in reference.rglob("*") if p.is_file())
    after_check(monkeypatch, builder, "check_room", lambda: fill(folder.parent, size // 2))
    code, _, err = run_cli(capsys, "build", "--model-path", tiny_run, "--out", index, "--shard-size", "200")
    line = one_line_error(code, err, "disk is full", "more", "run the same command", "resumes")
    assert str(folder.parent) in line  # the file that could not be written
    assert not list(index.rglob(".tmp-*"))  # no half-written file left taking space

    monkeypatch.undo()
    (folder.parent / "filler").unlink()
    code, _, err = run_cli(capsys, "build", "--model-path", tiny_run, "--out", index, "--shard-size", "200")
    assert code == 0, err
    assert digests(index) == digests(reference)
    code, _, err = run_cli(capsys, "verify", index)
    assert code == 0, err


def test_a_jsonl_stream_that_fills_the_disk_keeps_what_it_wrote_and_resumes(tiny_run, reference, folder, monkeypatch,
                                                                            capsys, tmp_path):  # fmt: skip
    import tracin_index.results as results

    args = ["query", reference, "--test", tiny_run / "test.tsv", "--test-indices", *map(str, range(40)), "--top-k", "200",
            "--batch-size", "5"]  # fmt: skip
    whole = tmp_path / "whole.jsonl"
    code, _, err = run_cli(capsys, *args, "--output", whole)
    assert code == 0, err
    stream = folder / "out.jsonl"
    lines = whole.read_bytes().splitlines(keepends=True)
    after_check(monkeypatch, results.JsonlResults, "open", lambda: fill(folder.parent, len(lines[1]) * 12))
    code, _, err = run_cli(capsys, *args, "--output", stream)
    one_line_error(code, err, "out.jsonl", "disk is full", "kept", "resume")
    kept = stream.read_bytes()
    assert kept.endswith(b"\n") and whole.read_bytes().startswith(kept)  # whole lines only, the first ones
    assert 1 < kept.count(b"\n") < len(lines)

    monkeypatch.undo()
    (folder.parent / "filler").unlink()
    code, _, err = run_cli(capsys, *args, "--output", stream)
    assert code == 0, err
    assert stream.read_bytes() == whole.read_bytes()


def test_a_json_output_on_a_disk_that_filled_up_prints_the_results_and_one_line(tiny_run, reference, folder, monkeypatch,
                                                                                 capsys):  # fmt: skip
    import tracin_index.cli as cli

    after_check(monkeypatch, cli, "_check_output", lambda: fill(folder.parent, 0))
    output = folder / "out.json"
    code, out, err = run_cli(capsys, "query", reference, "--test", tiny_run / "test.tsv", "--test-indices", "0",
                             "--top-k", "3", "--output", output)  # fmt: skip
    one_line_error(code, err, "out.json", "disk is full", "printed above")
    assert "Proponents of test triple 0" in out  # the results are not lost
    assert not output.exists() and not list(folder.glob(".tmp-*"))


def test_train_on_a_disk_that_fills_up_ends_in_one_line(folder, monkeypatch, capsys):
    import tracin_index.kg.training as training

    original = training.train_run

    def filled_first(*args, **kwargs):
        fill(folder.parent, 64 * 2**10)
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "train_run", filled_first)
    run = folder / "run"
    code, _, err = run_cli(capsys, "train", "--out", run, "--model", "DistMult", "--embedding-dim", "64", "--epochs", "2",
                           "--checkpoint-every", "1")  # fmt: skip
    one_line_error(code, err, "disk is full", str(folder), "delete", "starts over")
    assert not list(run.rglob(".tmp-*"))
