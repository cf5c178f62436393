"""Quiet by default: the warnings and log lines of the libraries below us (PyKEEN, torch) reach the user only
with --verbose; ours stay, each once per command.

Run as a user runs them, in a fresh process: in-process, pytest's log capture would take PyKEEN's log lines
before they reach stderr.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

PYKEEN_CHATTER = "should be trained with inverse triples"  # PyKEEN logs it for every ConvE made without them


def cli(*args) -> subprocess.CompletedProcess:
    code = "import sys; from tracin_index.cli import main; main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def conve_without_inverse(tmp_path_factory):
    """A small ConvE trained without inverse triples (PyKEEN warns about that each time one is made), one checkpoint,
    and a copy of its training file with one line repeated."""
    from conftest import TINY_CONVE

    from tracin_index.kg.training import train_run

    run = train_run(tmp_path_factory.mktemp("quiet") / "run", dataset="nations", model="ConvE", model_kwargs=TINY_CONVE,
                    epochs=1, checkpoint_every=1, inverse_triples=False, progress=False)  # fmt: skip
    lines = (run / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    repeated = run.parent / "train-repeated.tsv"
    repeated.write_text("".join(lines + lines[:1]), encoding="utf-8")
    return run, repeated


def test_library_chatter_is_shown_with_verbose_only(conve_without_inverse):
    run, _ = conve_without_inverse
    args = ["exact", "--model-path", run, "--test-indices", "0", "--top-k", "1"]
    quiet = cli(*args)
    assert quiet.returncode == 0, quiet.stderr
    assert PYKEEN_CHATTER not in quiet.stderr, quiet.stderr
    assert "Warning" not in quiet.stderr, quiet.stderr  # neither torch's nor anyone's FutureWarning/DeprecationWarning
    verbose = cli(*args, "--verbose")
    assert verbose.returncode == 0, verbose.stderr
    assert PYKEEN_CHATTER in verbose.stderr, verbose.stderr
    assert verbose.stdout == quiet.stdout  # the same results either way


def test_our_warnings_stay_and_each_is_shown_once(conve_without_inverse, tmp_path):
    run, repeated = conve_without_inverse
    shutil.copytree(run, tmp_path / "run")
    done = cli("build", "--model-path", tmp_path / "run", "--train", repeated, "--out", tmp_path / "idx")
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len([line for line in warned if "repeats an earlier line" in line]) == 1, done.stderr
    assert len(warned) == len(set(warned)), done.stderr
    assert PYKEEN_CHATTER not in done.stderr, done.stderr
